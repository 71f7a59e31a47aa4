"""The fused disentangled-attention kernels (models/flash_attention.py), GPU and TPU sets.

On CPU the Pallas kernels run in the interpreter, so these tests check their arithmetic (forward,
every gradient, padding, dropout, sharding) against plain jnp; separate tests lower them for
their targets (Triton IR for CUDA, Mosaic for TPU), which catches what only the accelerator's
lowering path would reject (tile shapes, unsupported operations, indexing).
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deberta_jax.runtime import sharding
from deberta_jax.models import attention
from deberta_jax.models.kernels import flash_attention as fa
from deberta_jax.models import hash_dropout
from deberta_jax.models.config import ModelConfig


def _native(backend: str) -> bool:
  """Whether `backend`'s kernels run compiled here (on their accelerator) rather than interpreted.

  The file also runs on a GPU (`JAX_PLATFORMS=cuda python -m pytest tests/test_flash_attention.py`):
  there the Triton kernels run for real, the Mosaic ones interpreted, and float32 matmuls may
  use TF32 on both sides of a comparison, hence the looser tolerance.
  """
  return jax.default_backend() == {"triton": "gpu", "mosaic": "tpu"}[backend]


def _tolerance(backend: str, tight: float) -> float:
  return 1e-2 if _native(backend) else tight


def _inputs(batch=2, heads=2, length=40, head_dim=16, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape, scale=1.0: (jax.random.normal(key, shape) * scale).astype(dtype)
  q = normal(keys[0], (batch, heads, length, head_dim), 0.3)
  k = normal(keys[1], (batch, heads, length, head_dim))
  v = normal(keys[2], (batch, heads, length, head_dim))
  qr = normal(keys[3], (2 * length - 1, heads, head_dim), 0.3)
  kr = normal(keys[4], (2 * length - 1, heads, head_dim))
  mask = np.ones((batch, length), np.int32)
  mask[-1, length * 3 // 4:] = 0  # a padded sequence
  return (q, k, v, qr, kr), jnp.asarray(mask)


def _weighted_sum(fn, mask, weights, **kwargs):
  return lambda *args: jnp.sum(fn(*args, mask, **kwargs).astype(jnp.float32) * weights)


@pytest.mark.parametrize("backend,length,rate", [
    ("triton", 40, 0.0), ("triton", 48, 0.1), ("triton", 17, 0.2),
    ("mosaic", 40, 0.0), ("mosaic", 48, 0.1)])
def test_kernels_equal_plain_attention_forward_and_backward(backend, length, rate):
  """Context and the gradients of q, k, v and both relative tables, with padding (40 and 17 are
  not multiples of the 16-row tile), masked keys and dropout."""
  args, mask = _inputs(length=length)
  seed = jnp.uint32(1234)
  weights = jax.random.normal(jax.random.key(9), args[0].shape)
  kw = dict(dropout_rate=rate, dropout_seed=seed)
  interpret = not _native(backend)
  ours = fa.fused_attention(*args, mask, block=16, backend=backend, interpret=interpret, **kw)
  ref = fa.reference_attention(*args, mask, **kw)
  chex.assert_shape(ours, args[0].shape)
  chex.assert_trees_all_close(ours, ref, atol=_tolerance(backend, 2e-6),
                              rtol=_tolerance(backend, 1e-5))
  # Pad query rows give exactly zero, like masked_softmax's zeroed rows.
  np.testing.assert_array_equal(np.asarray(ours)[-1, :, length * 3 // 4:], 0.0)
  grads = jax.grad(_weighted_sum(fa.fused_attention, mask, weights, block=16, backend=backend,
                                 interpret=interpret, **kw),
                   argnums=range(5))(*args)
  ref_grads = jax.grad(_weighted_sum(fa.reference_attention, mask, weights, **kw),
                       argnums=range(5))(*args)
  for name, g, r in zip(("q", "k", "v", "qr", "kr"), grads, ref_grads):
    scale = float(jnp.max(jnp.abs(r)))
    assert scale > 0, name
    chex.assert_trees_all_close(g, r, atol=_tolerance(backend, 1e-5) * scale,
                                rtol=_tolerance(backend, 1e-5), custom_message=name)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_multiple_tiles_per_row_in_bfloat16(backend):
  """bf16 operands, 4 x 4 tiles of 16: the online softmax across key tiles, and 16-bit tables."""
  args, mask = _inputs(batch=1, heads=3, length=64, head_dim=32, dtype=jnp.bfloat16)
  ours = fa.fused_attention(*args, mask, block=16, backend=backend,
                            interpret=not _native(backend))
  chex.assert_type(ours, jnp.bfloat16)
  ref = fa.reference_attention(*[a.astype(jnp.float32) for a in args], mask)
  sel = np.asarray(mask, bool)
  a, b = np.asarray(ours, np.float32), np.asarray(ref)
  rel = np.linalg.norm((a - b)[:, :, sel[0]]) / np.linalg.norm(b[:, :, sel[0]])
  assert rel < 1e-2, rel


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_bfloat16_gradients_with_16_bit_table_gradients(backend):
  """bf16 operands, 4 x 4 tiles: the gradients of q, k, v and both relative tables against the
  float32 reference. The table gradients are rounded to bf16 tile by tile (the TPU kernels round
  before their permutation matmul, which is then exact in one bf16 pass)."""
  args, mask = _inputs(batch=1, heads=2, length=64, head_dim=32, dtype=jnp.bfloat16)
  weights = jax.random.normal(jax.random.key(3), args[0].shape)
  ours = jax.grad(_weighted_sum(fa.fused_attention, mask, weights, block=16, backend=backend,
                                interpret=not _native(backend)), argnums=range(5))(*args)
  ref = jax.grad(_weighted_sum(fa.reference_attention, mask, weights),
                 argnums=range(5))(*[a.astype(jnp.float32) for a in args])
  for name, g, r in zip(("q", "k", "v", "qr", "kr"), ours, ref):
    chex.assert_type(g, jnp.bfloat16)
    g, r = np.asarray(g, np.float32), np.asarray(r)
    rel = np.linalg.norm(g - r) / np.linalg.norm(r)
    assert rel < 2e-2, (name, rel)


def test_dropout_mask_rate_and_streams():
  """The hash keeps 1 - rate of the entries, and differs by seed, batch row and head."""
  rows = jnp.arange(256, dtype=jnp.int32)[:, None]
  cols = jnp.arange(256, dtype=jnp.int32)[None, :]
  keep = lambda seed, stream: np.asarray(
      fa.keep_mask(jnp.uint32(seed), jnp.int32(stream), rows, cols, 256, 0.1))
  a = keep(7, 0)
  sd = np.sqrt(0.1 * 0.9 / a.size)
  assert abs((1 - a.mean()) - 0.1) < 5 * sd
  for other in (keep(8, 0), keep(7, 1)):
    # Independent masks agree on about 0.9^2 + 0.1^2 = 82% of the entries, identical ones on all.
    assert abs(np.mean(a == other) - 0.82) < 0.02
  assert fa.keep_scale(0.1) == pytest.approx(1 / 0.9, rel=1e-6)


def test_dropout_needs_a_seed():
  args, mask = _inputs(length=16)
  with pytest.raises(ValueError, match="dropout_seed"):
    fa.fused_attention(*args, mask, dropout_rate=0.1)


def _attention_module(impl):
  config = ModelConfig(vocab_size=100, hidden_size=32, num_layers=1, num_heads=4,
                       intermediate_size=64, position_buckets=16, max_position_embeddings=64,
                       attention_impl=impl)
  return attention.DisentangledSelfAttention(config)


def _module_inputs(batch=4, length=24):
  hidden = jax.random.normal(jax.random.key(1), (batch, length, 32))
  rel_table = jax.random.normal(jax.random.key(2), (32, 32))
  tokens = np.ones((batch, length), np.int32)
  tokens[1, 10:] = 0
  return hidden, rel_table, attention.pair_mask(jnp.asarray(tokens))


# Micro-batch 1 of 3: rows 1, 4, 7, ... of the global batch (hash_dropout.RowLayout).
MICRO_ROWS = hash_dropout.RowLayout(1, 3)


@pytest.mark.parametrize("deterministic", [True, False])
def test_module_flash_equals_skew_and_gather(deterministic):
  """Every attention_impl computes the same layer, with dropout too: the XLA forms draw the
  kernels' hash mask (hash_dropout.drop_probabilities) from the same RNG draw, for rows placed
  anywhere in the global batch (a micro-batch's offset and stride)."""
  hidden, rel_table, mask = _module_inputs()
  skew, flash, gather = (_attention_module(i) for i in ("skew", "flash", "gather"))
  params = skew.init(jax.random.key(0), hidden, hidden, rel_table, mask, True)
  rngs = {"dropout": jax.random.key(5)}
  run = lambda module, p: module.apply(p, hidden, hidden, rel_table, mask, deterministic,
                                       MICRO_ROWS, rngs=rngs)
  native = _native(fa.default_backend())
  out_skew = run(skew, params)
  chex.assert_trees_all_close(run(flash, params), out_skew, atol=1e-2 if native else 2e-6)
  chex.assert_trees_all_close(run(gather, params), out_skew, atol=2e-6)
  if not deterministic:  # the dropout is really on: another key gives another output
    other = skew.apply(params, hidden, hidden, rel_table, mask, False,
                       rngs={"dropout": jax.random.key(6)})
    assert float(jnp.max(jnp.abs(other - out_skew))) > 1e-2
  loss = lambda module: lambda p: jnp.sum(run(module, p) ** 2)
  chex.assert_trees_all_close(jax.grad(loss(flash))(params), jax.grad(loss(skew))(params),
                              atol=1e-2 if native else 1e-5, rtol=1e-2 if native else 1e-4)


def test_drop_probabilities_is_the_kernels_mask():
  """The XLA forms' attention dropout keeps exactly the entries keep_mask keeps for each global
  (batch, head) stream, and scales them by keep_scale."""
  batch, heads, length, seed = 3, 2, 24, jnp.uint32(123)
  dropped = hash_dropout.drop_probabilities(jnp.ones((batch, heads, length, length)), seed, 0.2,
                                            rows=MICRO_ROWS)
  rows = jnp.arange(length, dtype=jnp.int32)
  for b in range(batch):
    global_row = MICRO_ROWS.offset + MICRO_ROWS.stride * b
    for h in range(heads):
      keep = fa.keep_mask(seed, jnp.int32(global_row * heads + h), rows[:, None], rows[None, :],
                          length, 0.2)
      np.testing.assert_array_equal(np.asarray(dropped[b, h] > 0), np.asarray(keep))
  np.testing.assert_allclose(np.unique(np.asarray(dropped)), [0.0, fa.keep_scale(0.2)],
                             rtol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "mosaic"])
def test_sharded_kernels_equal_one_device_with_dropout(backend, monkeypatch):
  """Under a data=2, fsdp=2, tensor=2 mesh each device runs the kernels on its rows and heads
  (shard_map); with dropout on, equal outputs and gradients show that the stream offsets make
  the shards' masks, forward and backward, the single-device mask, also for a micro-batch's rows
  (offset and stride). Both kernel sets (the one not native here through the interpreter)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (CPU runs fake them, see conftest.py)")
  if not _native(backend):
    monkeypatch.setattr(fa, "default_backend", lambda: backend)
  hidden, rel_table, mask = _module_inputs(batch=4)
  module = _attention_module("flash")
  params = module.init(jax.random.key(0), hidden, hidden, rel_table, mask, True)
  rngs = {"dropout": jax.random.key(5)}
  weights = jax.random.normal(jax.random.key(6), hidden.shape)
  apply = lambda p, h, r, m: module.apply(p, h, h, r, m, False, MICRO_ROWS, rngs=rngs)
  loss = lambda p, h, r, m: jnp.sum(apply(p, h, r, m) * weights)
  outputs_and_grads = lambda *a: (apply(*a), jax.grad(loss, argnums=(0, 1, 2))(*a))
  one_device = outputs_and_grads(params, hidden, rel_table, mask)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    batch_sharded = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded = jax.jit(outputs_and_grads)(params, jax.device_put(hidden, batch_sharded),
                                         rel_table, jax.device_put(mask, batch_sharded))
  tol = 1e-2 if _native(fa.default_backend()) else 2e-5
  chex.assert_trees_all_close(sharded, one_device, atol=tol, rtol=tol)
  # Dropout did act: the deterministic output differs.
  assert not np.allclose(np.asarray(one_device[0]),
                         np.asarray(module.apply(params, hidden, hidden, rel_table, mask, True)))


def _lower(platform, batch, heads, length, head_dim):
  """The MLIR of forward + backward (dropout on, bf16) lowered for `platform` on this CPU."""
  export = pytest.importorskip("jax.export")
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  backend = {"cuda": "triton", "tpu": "mosaic"}[platform]
  call = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]

  def loss(q, k, v, qr, kr, mask, seed):
    out = fa.fused_attention(q, k, v, qr, kr, mask, dropout_rate=0.1, dropout_seed=seed,
                             backend=backend, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  args = ((shape(batch, heads, length, head_dim),) * 3
          + (shape(2 * length - 1, heads, head_dim),) * 2
          + (shape(batch, length, dtype=jnp.int32), shape(dtype=jnp.uint32)))
  exported = export.export(
      jax.jit(jax.value_and_grad(loss, argnums=range(5))), platforms=[platform],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(call)])(*args)
  return exported.mlir_module(), call


@pytest.mark.parametrize("batch,heads,length,head_dim", [(2, 12, 512, 64), (4, 4, 100, 16)])
def test_gpu_kernels_lower_to_triton(batch, heads, length, head_dim):
  """Lowering for CUDA runs the Pallas Triton lowering on this CPU: power-of-two tiles,
  supported ops and the gather/scatter indexing are all checked, three kernels come out.
  Compiling the Triton IR to PTX needs a GPU."""
  text, call = _lower("cuda", batch, heads, length, head_dim)
  for kernel in ("disentangled_attention_forward", "disentangled_attention_dq",
                 "disentangled_attention_dkv"):
    assert f'name = "{kernel}"' in text, kernel
  assert text.count(f"@{call}") == 3


@pytest.mark.parametrize("batch,heads,length,head_dim", [(2, 12, 512, 64), (2, 4, 100, 64)])
def test_tpu_kernels_lower_to_mosaic(batch, heads, length, head_dim):
  """Lowering for TPU runs the Pallas Mosaic lowering on this CPU (block shapes, the strided
  rotations, the permutation matmul, VMEM scratch): the forward and the two backward kernels.
  experiments/tpu_aot_check.py goes on to compile them with libtpu."""
  text, call = _lower("tpu", batch, heads, length, head_dim)
  assert text.count(f"@{call}") == 3
  for kernel in ("disentangled_attention_forward_tpu", "disentangled_attention_dq_tpu",
                 "disentangled_attention_dkv_tpu"):
    assert kernel in text, kernel
  # Each kernel tells XLA's cost model what it executes (the config JSON is escaped in the text):
  # every kernel computes Q K^T and both [T, 2T] table windows (2 + 8 FLOPs per entry and head
  # dimension); then P V (forward), dP and dQ (dq), or dV, dP and dK (dkv), and in the backward
  # the permutation matmul of every [T, T] tile (T = 128) and the fold of the table gradient's
  # row strips into dQ or dK and the rows' gradient (8); one exp per score entry.
  estimates = [dict(re.findall(r"\\22(\w+)\\22:(\d+)", body))
               for body in re.findall(r"cost_estimate\\22: \{([^}]*)\}", text)]
  tile = 128
  area = (-(-length // tile) * tile) ** 2
  pairs = batch * heads
  assert sorted(int(e["flops"]) for e in estimates) == [
      pairs * area * (12 * head_dim), pairs * area * (22 * head_dim + 2 * tile),
      pairs * area * (24 * head_dim + 2 * tile)]
  assert [int(e["transcendentals"]) for e in estimates] == [pairs * area] * 3
  assert all(int(e["bytes_accessed"]) > 0 for e in estimates)
  # XLA may fuse the lane broadcasts (query mask; log-sum-exp and delta) into the kernels' reads
  # and nothing else: the forward's last operand, the backward kernels' last two.
  fusible = [body.split(",") for body in re.findall(r"allow_input_fusion\\22: \[([^\]]*)\]", text)]
  assert [f.count("true") for f in fusible] == [1, 2, 2]
  assert all(f[-f.count("true"):] == ["true"] * f.count("true") for f in fusible)


def test_encoder_gradients_with_remat_and_scanned_layers():
  """The kernels' custom VJP inside jax.checkpoint (remat='dots') and lax.scan (scan_layers):
  the encoder's loss and parameter gradients equal the skew path's."""
  from flax.linen import meta  # pylint: disable=g-import-not-at-top
  from deberta_jax.models import DebertaEncoder  # pylint: disable=g-import-not-at-top
  base = dict(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64,
              position_buckets=16, max_position_embeddings=64, position_table=False)
  ids = jnp.asarray(np.random.default_rng(0).integers(4, 100, (2, 24)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, 12:].set(0)
  skew = ModelConfig(**base, attention_impl="skew")
  params = meta.unbox(DebertaEncoder(skew).init(jax.random.key(0), ids, mask)["params"])

  def loss_and_grads(config):
    loss = lambda p: jnp.sum(DebertaEncoder(config).apply({"params": p}, ids, mask) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  flash = ModelConfig(**base, attention_impl="flash", remat="dots", scan_layers=True)
  tol = 1e-2 if _native(fa.default_backend()) else 1e-4
  chex.assert_trees_all_close(loss_and_grads(flash), loss_and_grads(skew), atol=tol, rtol=tol)


def test_backend_checks_name_the_field():
  """'flash' is refused, with the field named, where no kernels exist or the head size does not
  suit the Triton kernels."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from deberta_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.attention_impl = "flash"
  for backend in ("cpu", "gpu", "tpu"):
    config_lib.check_backend(config, backend)
  with pytest.raises(config_lib.ConfigError, match="config.model.attention_impl"):
    config_lib.check_backend(config, "metal")
  config.model.hidden_size, config.model.num_heads = 96, 2  # head size 48
  config_lib.check_backend(config, "tpu")
  with pytest.raises(config_lib.ConfigError, match="power-of-two head size"):
    config_lib.check_backend(config, "gpu")
  config.model.attention_impl = "skew"
  config_lib.check_backend(config, "metal")


def test_backward_recomputes_the_tables_behind_a_barrier():
  """The backward pass recomputes the tables from q, k, qr and kr routed through an optimization
  barrier together with the incoming gradient. Without it XLA may merge the recomputation with
  the forward's identical matmuls (common-subexpression elimination) and so keep every layer's
  [B, n, L, 2L] tables alive until the backward pass (docs/CHANGELOG.md, "Memory")."""
  (q, k, v, qr, kr), mask = _inputs(length=32)
  loss = lambda q, k, qr, kr: jnp.sum(fa.fused_attention(q, k, v, qr, kr, mask))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, qr, kr).jaxpr
  barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 1
  behind = set(barriers[0].outvars)
  width = 2 * 32
  tables = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"
            and e.outvars[0].aval.shape[-1] == width]
  recomputed = [e for e in tables if any(x in behind for x in e.invars)]
  assert len(tables) == 4 and len(recomputed) == 2, (len(tables), len(recomputed))


def test_tpu_kernels_keep_tables_and_their_gradients_out_of_hbm():
  """The Mosaic path hands the kernels the [n, 2L, d] distance rows, not [B, n, L, 2L] tables,
  and gets back the rows' gradients: no XLA matmul in its forward or backward pass produces or
  consumes a table or a table gradient. The Triton path builds its tables twice (forward pass,
  backward recomputation) and turns their gradients into dq, dk, dqr and dkr with 4 matmuls."""
  (q, k, v, qr, kr), mask = _inputs(length=32)
  width = 2 * 32

  def gradient_jaxpr(backend):
    loss = lambda q, k, qr, kr: jnp.sum(fa.fused_attention(q, k, v, qr, kr, mask,
                                                           backend=backend, interpret=True))
    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, qr, kr).jaxpr

  def table_matmuls(jaxpr):
    touches_table = lambda e: any(getattr(x, "aval", None) is not None and x.aval.ndim == 4
                                  and x.aval.shape[-1] == width for x in e.invars + e.outvars)
    return sum(e.primitive.name == "dot_general" and touches_table(e) for e in jaxpr.eqns)

  mosaic = gradient_jaxpr("mosaic")
  assert table_matmuls(mosaic) == 0
  assert table_matmuls(gradient_jaxpr("triton")) == 8
  # The rows' gradients leave the backward kernels already summed over the batch: [n, 2L, d],
  # not a [B, n, 2L, d] array for XLA to write and reduce.
  backward = [e for e in mosaic.eqns if e.primitive.name == "pallas_call"
              and e.params["name"] in ("disentangled_attention_dq_tpu",
                                       "disentangled_attention_dkv_tpu")]
  assert len(backward) == 2
  assert all(e.outvars[-1].aval.shape[::2] == (q.shape[1], q.shape[-1]) for e in backward)


def _pallas_calls(jaxpr):
  """(name, interpret) of every pallas_call in a jaxpr, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found.append((eqn.params["name"], bool(eqn.params["interpret"])))
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", None)
      if inner is not None:
        found += _pallas_calls(getattr(inner, "jaxpr", inner))
  return found


def test_kernels_follow_the_mesh_platform_not_the_default_backend():
  """A step compiled for devices this process does not run on (compile-only TPU devices, as in
  experiments/tpu_aot_check.py) gets the TPU kernel, not the CPU interpreter's version of the GPU
  kernels: the choice follows the mesh in context, not jax.default_backend() (which would make
  a deviceless TPU compile measure the interpreter's kernels)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  (q, k, v, qr, kr), mask = _inputs(length=128)
  trace = lambda: jax.make_jaxpr(lambda q: fa.fused_attention(q, k, v, qr, kr, mask))(q).jaxpr
  assert fa.target_platform() == "cpu"
  assert _pallas_calls(trace()) == [("disentangled_attention_forward", True)]
  cpu = Mesh(np.array(jax.devices()[:1]), ("x",)).abstract_mesh
  device = dataclasses.replace(cpu.abstract_device, platform="tpu", device_kind="TPU v5p")
  tpu = jax.sharding.AbstractMesh(cpu.axis_sizes, cpu.axis_names, abstract_device=device)
  with jax.sharding.use_abstract_mesh(tpu):
    assert fa.target_platform() == "tpu" and fa.default_backend() == "mosaic"
    assert _pallas_calls(trace()) == [("disentangled_attention_forward_tpu", False)]

"""Attention micro-benchmark: disentangled vs plain dot-product attention, fwd and fwd+bwd.

  python -m benchmarks.attention_bench --batch 32 --seq_len 512 --heads 12 --head_dim 64

Times, at one shape [batch, seq_len, heads x head_dim] and with the same Q/K/V projections in
every variant (the output projection belongs to the layer, not to attention, in all of them):

  skew         our DisentangledSelfAttention, relative shift of per-distance products
  gather       our DisentangledSelfAttention, the reference's [B, H, L, L] index gather
  flash        our DisentangledSelfAttention, fused Pallas kernels (Triton on GPU, Mosaic on
               TPU; on CPU they run in Pallas' interpreter, which checks them but says nothing
               about speed, so the default list leaves them out there)
  plain        Q K^T / sqrt(d), the same masked float32 softmax as ours, P V (einsum)
  dpa_xla      jax.nn.dot_product_attention(implementation='xla'), no mask
  dpa_cudnn    jax.nn.dot_product_attention(implementation='cudnn'), no mask (GPU, fp16/bf16)

"fwd" is the forward pass; "fwd_bwd" is the gradient of sum(output) with respect to the
projection parameters, the hidden states and (ours) the relative table, i.e. a training step of
the attention block. Dropout is off. The batch has no padding (the mask is all ones but is an
input, as in training). The last line of stdout is one JSON object with the milliseconds, the
ratios of skew and gather to `plain` and to the fastest plain variant, and the attention-core
TFLOP/s of each variant under the FlashAttention convention of the spec (section 2.2): forward
B H (4 L^2 D + 4 L R D), backward B H (10 L^2 D + 12 L R D) with R = 0 for plain attention.
"""

from __future__ import annotations

import json
import math
import time

from absl import flags
from flax.linen import meta
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax import cli
from deberta_jax.models import attention
from deberta_jax.models import layers
from deberta_jax.models.config import ModelConfig
from deberta_jax.pretraining import flops

_BATCH = flags.DEFINE_integer("batch", 32, "Sequences.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Sequence length.")
_HEADS = flags.DEFINE_integer("heads", 12, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Size of one head.")
_BUCKETS = flags.DEFINE_integer("position_buckets", 256, "Relative position buckets (v3: 256).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "bfloat16", "float32", "float16"],
                           "Compute dtype; auto = bfloat16 on accelerators, float32 on CPU.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls per variant.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls per variant after compilation.")
_FLASH_BLOCK = flags.DEFINE_integer("flash_block", 64, "Tile rows of the flash kernels.")
_CHECK = flags.DEFINE_bool(
    "check", True, "Before timing, compare each of our variants' output and gradients with the "
    "gather form in float32 (the formulation the HF parity tests pin) on this device.")
_IMPLS = flags.DEFINE_list("impls", None, "Variants to time (default: all; on CPU all but flash).")

OURS = ("skew", "gather", "flash")
PLAIN = ("plain", "dpa_xla", "dpa_cudnn")


def _build(impl: str, batch: int, length: int, heads: int, head_dim: int, buckets: int, dtype,
           flash_block: int = 64):
  """(fn(params, hidden, rel_table) -> output, params) for one variant."""

  hidden_size = heads * head_dim
  cfg = ModelConfig(vocab_size=128, hidden_size=hidden_size, num_layers=1, num_heads=heads,
                    intermediate_size=4 * hidden_size, max_position_embeddings=max(512, length),
                    position_buckets=buckets, hidden_dropout=0.0, attention_dropout=0.0,
                    dtype=dtype, attention_impl=impl if impl in OURS else "skew",
                    flash_block=flash_block)
  mask = attention.pair_mask(jnp.ones((batch, length), jnp.int32))

  class Plain(nn.Module):
    """Same projections as ours, then plain scaled dot-product attention."""

    @nn.compact
    def __call__(self, hidden, query, rel_table, mask, deterministic):
      del rel_table, deterministic
      proj = lambda name: layers.dense(cfg, hidden_size, ("embed", "heads"), name)
      shape = (batch, length, heads, head_dim)
      q = proj("query_proj")(query).reshape(shape)
      k = proj("key_proj")(hidden).reshape(shape)
      v = proj("value_proj")(hidden).reshape(shape)
      if impl == "plain":
        q = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(q.dtype)
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
        probs = attention.masked_softmax(scores, mask)
        context = jnp.einsum("bnqk,bknd->bqnd", probs.astype(q.dtype), v)
      else:
        context = jax.nn.dot_product_attention(q, k, v, implementation=impl.split("_", 1)[1])
      return context.reshape(batch, length, hidden_size)

  module = attention.DisentangledSelfAttention(cfg) if impl in OURS else Plain()
  hidden = jnp.zeros((batch, length, hidden_size), cfg.compute_dtype)
  rel_table = jnp.zeros((2 * buckets, hidden_size), cfg.compute_dtype)
  params = meta.unbox(module.init(jax.random.key(0), hidden, hidden, rel_table, mask, True))

  def fn(p, h, r):
    return module.apply(p, h, h, r, mask, True)
  return fn, params


def _time(fn, args, steps: int, warmup: int) -> float:
  """Milliseconds per call of a jitted fn (one block at the end of the timed loop)."""
  out = None
  for _ in range(max(1, warmup)):
    out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps * 1e3


def core_flops(batch: int, length: int, heads: int, head_dim: int, relative_slots: int,
               backward: bool) -> float:
  """Attention-core FLOPs, FlashAttention convention (spec 2.2); relative_slots = 0 for plain."""
  fwd = batch * heads * (4 * length**2 * head_dim + 4 * length * relative_slots * head_dim)
  if not backward:
    return fwd
  return fwd + batch * heads * (10 * length**2 * head_dim + 12 * length * relative_slots * head_dim)


def check(batch: int, length: int, heads: int, head_dim: int, buckets: int, dtype: str,
          impls, flash_block: int = 64) -> dict:
  """Relative L2 errors of each of our variants against the float32 gather form, same weights.

  A speed figure is only worth reporting for a kernel that computes the right thing on the
  device at hand (the CPU tests run the flash kernels in an interpreter, not on the GPU).
  """

  key = jax.random.key(2)
  hidden = jax.random.normal(key, (batch, length, heads * head_dim), jnp.float32)
  rel = jax.random.normal(jax.random.fold_in(key, 1), (2 * buckets, heads * head_dim))
  weights = jax.random.normal(jax.random.fold_in(key, 2), hidden.shape)

  def outputs(impl, dt):
    fn, params = _build(impl, batch, length, heads, head_dim, buckets, dt, flash_block)
    cast = lambda x: x.astype(jnp.dtype(dt))
    loss = lambda p, h, r: jnp.sum(fn(p, h, r).astype(jnp.float32) * weights)
    out = jax.jit(fn)(params, cast(hidden), cast(rel))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, cast(hidden), cast(rel))
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float32))
                                        for x in jax.tree.leaves(tree)])
    return flat(out), flat(grads)

  ref_out, ref_grads = outputs("gather", "float32")
  rel_err = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
  results = {}
  for impl in (i for i in OURS if i in impls):
    try:
      out, grads = outputs(impl, dtype)
      results[impl] = {"output_rel_err": rel_err(out, ref_out),
                       "grad_rel_err": rel_err(grads, ref_grads)}
    except Exception as e:  # pylint: disable=broad-except  # reported, timing goes on
      results[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  return results


def measure(batch: int, length: int, heads: int, head_dim: int, buckets: int, dtype: str,
            impls, steps: int, warmup: int, flash_block: int = 64) -> dict:

  device = jax.local_devices()[0]
  if dtype == "auto":
    dtype = "float32" if device.platform == "cpu" else "bfloat16"
  r = flops.relative_slots(buckets, length)
  key = jax.random.key(1)
  ms, errors, tflops = {}, {}, {}
  for impl in impls:
    try:
      fn, params = _build(impl, batch, length, heads, head_dim, buckets, dtype, flash_block)
      dt = jnp.dtype(dtype)
      hidden = jax.random.normal(key, (batch, length, heads * head_dim), jnp.float32).astype(dt)
      rel = jax.random.normal(key, (2 * buckets, heads * head_dim), jnp.float32).astype(dt)
      fwd = jax.jit(fn)
      loss = lambda p, h, t: jnp.sum(fn(p, h, t).astype(jnp.float32))
      fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      args = (params, hidden, rel)
      ms[impl] = {"fwd": _time(fwd, args, steps, warmup),
                  "fwd_bwd": _time(fwd_bwd, args, steps, warmup)}
      slots = r if impl in OURS else 0
      tflops[impl] = {
          "fwd": core_flops(batch, length, heads, head_dim, slots, False) / ms[impl]["fwd"] / 1e9,
          "fwd_bwd": (core_flops(batch, length, heads, head_dim, slots, True)
                      / ms[impl]["fwd_bwd"] / 1e9)}
    except Exception as e:  # pylint: disable=broad-except  # e.g. cudnn on CPU
      errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  ratios = {}
  plain_done = [p for p in PLAIN if p in ms]
  for ours in OURS:
    if ours not in ms:
      continue
    for kind in ("fwd", "fwd_bwd"):
      if "plain" in ms:
        ratios[f"{ours}_vs_plain_{kind}"] = ms[ours][kind] / ms["plain"][kind]
      if plain_done:
        best = min(ms[p][kind] for p in plain_done)
        ratios[f"{ours}_vs_best_plain_{kind}"] = ms[ours][kind] / best
  return {"batch": batch, "seq_len": length, "heads": heads, "head_dim": head_dim,
          "position_buckets": buckets, "relative_slots": r, "dtype": dtype,
          "flash_block": flash_block,
          "device": device.device_kind, "platform": device.platform,
          "jax_version": jax.__version__, "ms": ms, "ratios": ratios,
          "core_tflops_per_second": tflops, "errors": errors}


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  impls = _IMPLS.value
  unknown = [i for i in impls or () if i not in OURS + PLAIN]
  if unknown:
    raise cli.app.UsageError(f"--impls: unknown {unknown}; choose from {OURS + PLAIN}")
  if impls is None:
    impls = [i for i in OURS + PLAIN if not (i == "flash" and jax.default_backend() == "cpu")]
  r = measure(_BATCH.value, _SEQ_LEN.value, _HEADS.value, _HEAD_DIM.value, _BUCKETS.value,
              _DTYPE.value, impls, _STEPS.value, _WARMUP.value, _FLASH_BLOCK.value)
  if _CHECK.value:
    r["check"] = check(_BATCH.value, _SEQ_LEN.value, _HEADS.value, _HEAD_DIM.value,
                       _BUCKETS.value, r["dtype"], impls, _FLASH_BLOCK.value)
  print(f"attention B={r['batch']} L={r['seq_len']} heads={r['heads']} d={r['head_dim']} "
        f"R={r['relative_slots']} {r['dtype']} on {r['device']} (jax {r['jax_version']})")
  for impl, t in r["ms"].items():
    rate = r["core_tflops_per_second"][impl]
    print(f"  {impl:10s} fwd {t['fwd']:9.3f} ms  fwd+bwd {t['fwd_bwd']:9.3f} ms   "
          f"core {rate['fwd']:7.2f} / {rate['fwd_bwd']:7.2f} TFLOP/s")
  for impl, err in r["errors"].items():
    print(f"  {impl:10s} skipped: {err}")
  for name, value in r["ratios"].items():
    print(f"  {name}: {value:.2f}x")
  for impl, errs in r.get("check", {}).items():
    print(f"  check {impl:6s} vs float32 gather: "
          + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in errs.items()))
  print(json.dumps(r), flush=True)


if __name__ == "__main__":
  cli.run(main)

"""Fused disentangled attention: Pallas kernels that add the c2p and p2c terms tile by tile.

Why: the `skew` and `gather` paths build the scores, the softmax, the dropout mask and the
probabilities as [B, n, L, L] float32 tensors, and `skew` adds relayout copies of the
[B, n, L, 2L-1] products. On a GPU that traffic, not the matmuls, sets the step time (the H100
profile in docs/benchmarks.md: 68% of the base step is attention). Here a score never exists
beyond a [T, T] tile in registers or VMEM, as in FlashAttention-2:

  forward   one program per (batch, head, query block) loops over key blocks with an online
            softmax and writes the context and the log-sum-exp per query;
  backward  two kernels recompute the tiles from the log-sum-exp: one per key block writes dK,
            dV and the p2c table's gradient, one per query block writes dQ and the c2p table's.

The relative terms need no [L, L] gather. Both depend on (i, j) through the distance i - j only,
so the per-distance products are plain matmuls against the [2L, d] distance rows:

  c2p[b, n, i, u] = q_i . kr(distance (L-1) - u)   term of (i, j) at u = (L-1) - i + j
  p2c[b, n, j, t] = k_j . qr(distance t - (L-1))   term of (i, j) at t = (L-1) + i - j

The GPU kernels (gpu.py) read a tile's terms from these [B, n, L, 2L] tables with
computed-index loads. The TPU kernels (tpu.py) never see a table: each tile
multiplies its query (or key) block by the two [T, d] blocks of distance rows its [T, 2T] window
spans, on the MXU, and takes the tile out of the window with a strided lane rotation; on a TPU
the matmul costs less than writing the tables and reading them back (`relative_operands`).
The c2p table is stored with its distance axis reversed so that, in both tables, the entries a
tile needs run contiguously along one tile axis (along keys for c2p, along queries for p2c). In
the backward pass each table entry receives the score gradient of exactly one (i, j) pair, so the
table gradients are written without atomics (deterministic). The GPU kernels write them and XLA
turns them into dq, dk, dqr and dkr with the same batched matmuls it uses for the forward
products; the TPU kernels do that multiplication themselves on each finished row strip in
VMEM. The GPU tables are recomputed in the backward pass, behind an optimization barrier that
keeps XLA from merging the recomputation with the forward's matmuls, so the residuals per layer
are q, k, v, the context and the log-sum-exp, as in FlashAttention.

Attention dropout is regenerated from a counter-based hash of (seed, batch, head, i, j)
(hash_dropout.py), so the backward kernels rebuild the forward's mask without storing it. The
XLA forms (`skew`, `gather`) draw the same mask from the same seed, so switching
`attention_impl` does not change the numbers, dropout included.

Status: on CPU the kernels run in Pallas' interpreter, which is what the tests use, and both
kernel sets are lowered for their targets (Triton IR for CUDA, Mosaic for TPU) in the tests;
experiments/ compiles them further (sm_90 cubins with PyPI's Triton, a v5p executable with
libtpu), without an accelerator.
Neither has yet run on an accelerator (docs/benchmarks.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deberta_jax.models.kernels import gpu as flash_kernels_gpu
from deberta_jax.models.kernels import tpu as flash_kernels_tpu
from deberta_jax.models.hash_dropout import keep_mask, keep_scale
from deberta_jax.models.layers import target_platform

__all__ = ["block_size", "default_backend", "fused_attention", "keep_mask", "keep_scale",
           "reference_attention", "relative_operands", "relative_tables", "relative_tables_vjp",
           "target_platform"]

_KERNELS = {"triton": flash_kernels_gpu, "mosaic": flash_kernels_tpu}


def _power_of_two_at_least_16(n: int) -> bool:
  return n >= 16 and not n & (n - 1)


def block_size(length: int, preferred: int = 64) -> int:
  """A power of two in [16, preferred]; Triton tiles must be powers of two and dots >= 16."""
  size = 16
  while size < preferred and size < length:
    size *= 2
  return size


def _distance_rows(rel, reverse):
  """[2L-1, n, d] by distance -> [n, 2L, d]: optionally reversed, one zero padding row last."""
  rel = jnp.flip(rel, axis=0) if reverse else rel
  return jnp.swapaxes(jnp.pad(rel, ((0, 1), (0, 0), (0, 0))), 0, 1)


def _distance_rows_cotangent(rows, reverse):
  """The adjoint of `_distance_rows`: [n, 2L, d] -> [2L-1, n, d]."""
  rel = jnp.swapaxes(rows, 0, 1)[:-1]
  return jnp.flip(rel, axis=0) if reverse else rel


def _per_sequence(rows, batch):
  """[n, R, d] -> [B, n, R, d], laid out like q and k (a broadcast): batched matmuls over
  (batch, head) whose results need no transpose."""
  return jnp.broadcast_to(rows[None], (batch,) + rows.shape)


def relative_tables(q, k, qr_by_distance, kr_by_distance):
  """The per-distance products the kernels read: (c2p reversed, p2c), each [B, n, L, 2L].

  q, k: [B, n, L, d]; row t of *_by_distance [2L-1, n, d] holds distance t - (L-1). The last
  column is zero padding (a power-of-two row length keeps rows aligned). Plain batched matmuls
  with float32 accumulation, stored in the compute dtype.
  """
  batch = q.shape[0]
  kr_rows = _per_sequence(_distance_rows(kr_by_distance, reverse=True), batch)
  qr_rows = _per_sequence(_distance_rows(qr_by_distance, reverse=False), batch)
  c2p = jnp.einsum("bnid,bnud->bniu", q, kr_rows,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  p2c = jnp.einsum("bnjd,bntd->bnjt", k, qr_rows,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return c2p, p2c


def relative_operands(kernels, q, k, qr_by_distance, kr_by_distance):
  """What a kernel set reads the relative terms from (its RELATIVE_OPERANDS): the tables of
  `relative_tables`, or the [n, 2L, d] distance rows (key rows reversed, for c2p; query rows,
  for p2c) from which the kernels compute each tile's table windows themselves."""
  if kernels.RELATIVE_OPERANDS == "distance_rows":
    return _distance_rows(kr_by_distance, reverse=True), _distance_rows(qr_by_distance, False)
  return relative_tables(q, k, qr_by_distance, kr_by_distance)


def relative_tables_vjp(q, k, qr_by_distance, kr_by_distance, d_c2p, d_p2c, *,
                        c2p_reversed=True, p2c_reversed=False):
  """(dq, dk) in float32 and (dqr, dkr) from the table gradients the GPU kernels write, each in
  the distance order they were written in (`relative_tables`' layout: c2p reversed, p2c not):
  four batched matmuls, and no reversal of a [B, n, L, 2L] gradient when the order differs."""
  batch = q.shape[0]
  f32 = jnp.float32
  kr_rows = _distance_rows(kr_by_distance, c2p_reversed)
  qr_rows = _distance_rows(qr_by_distance, p2c_reversed)
  dq = jnp.einsum("bniu,bnud->bnid", d_c2p, _per_sequence(kr_rows, batch),
                  preferred_element_type=f32)
  dk = jnp.einsum("bnjt,bntd->bnjd", d_p2c, _per_sequence(qr_rows, batch),
                  preferred_element_type=f32)
  dkr_rows = jnp.einsum("bniu,bnid->nud", d_c2p, q, preferred_element_type=f32)
  dqr_rows = jnp.einsum("bnjt,bnjd->ntd", d_p2c, k, preferred_element_type=f32)
  dqr = _distance_rows_cotangent(dqr_rows, p2c_reversed).astype(qr_by_distance.dtype)
  dkr = _distance_rows_cotangent(dkr_rows, c2p_reversed).astype(kr_by_distance.dtype)
  return dq, dk, dqr, dkr


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _fused(seed, q, k, v, qr, kr, mask, rate, tile, backend, interpret):
  return _fused_fwd(seed, q, k, v, qr, kr, mask, rate, tile, backend, interpret)[0]


def _fused_fwd(seed, q, k, v, qr, kr, mask, rate, tile, backend, interpret):
  # Tables (GPU) are recomputed in the backward pass rather than saved: two matmuls are cheaper
  # than keeping 2 x [B, n, L, 2L] per layer alive until the backward pass.
  kernels = _KERNELS[backend]
  c2p_source, p2c_source = relative_operands(kernels, q, k, qr, kr)
  out, lse = kernels.forward(seed, q, k, v, c2p_source, p2c_source, mask, rate=rate, tile=tile,
                             interpret=interpret)
  return out, (seed, q, k, v, qr, kr, mask, out, lse)


def _fused_bwd(rate, tile, backend, interpret, residuals, d_out):
  seed, q, k, v, qr, kr, mask, out, lse = residuals
  # The barrier ties the recomputation to this layer's incoming gradient. Without it XLA is free
  # to merge it with the forward's identical matmuls (CSE), which keeps every layer's tables
  # alive from the forward to the backward pass: the memory the recomputation is meant to save
  # (docs/CHANGELOG.md, "Memory"). The log-sum-exp goes through it too, or XLA schedules its
  # lane broadcasts for the TPU kernels early and keeps several layers' of them alive at once.
  q, k, qr, kr, lse, d_out = jax.lax.optimization_barrier((q, k, qr, kr, lse, d_out))
  kernels = _KERNELS[backend]
  c2p_source, p2c_source = relative_operands(kernels, q, k, qr, kr)
  # Pad query rows were zeroed in the forward pass, so nothing flows back through them.
  d_out = jnp.where(mask[:, None, :, None] > 0, d_out, 0).astype(q.dtype)
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  if kernels.RELATIVE_OPERANDS == "distance_rows":
    # The kernels fold the table gradients into dq, dk and the rows' gradients themselves.
    layout = kernels.GRADIENT_LAYOUT
    dq, dk, dv, dkr_rows, dqr_rows = kernels.backward(
        seed, q, k, v, c2p_source, p2c_source, _distance_rows(kr, layout["c2p_reversed"]),
        _distance_rows(qr, layout["p2c_reversed"]), mask, lse, d_out, delta, rate=rate,
        tile=tile, interpret=interpret)
    dqr = _distance_rows_cotangent(dqr_rows, layout["p2c_reversed"]).astype(qr.dtype)
    dkr = _distance_rows_cotangent(dkr_rows, layout["c2p_reversed"]).astype(kr.dtype)
    return None, dq, dk, dv, dqr, dkr, None
  dq, dk, dv, dc2p, dp2c = kernels.backward(
      seed, q, k, v, c2p_source, p2c_source, mask, lse, d_out, delta, rate=rate, tile=tile,
      interpret=interpret)
  dq_rel, dk_rel, dqr, dkr = relative_tables_vjp(q, k, qr, kr, dc2p, dp2c,
                                                 **kernels.GRADIENT_LAYOUT)
  dq = (dq.astype(jnp.float32) + dq_rel).astype(q.dtype)
  dk = (dk.astype(jnp.float32) + dk_rel).astype(k.dtype)
  return None, dq, dk, dv, dqr, dkr, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point


def default_backend() -> str:
  """'mosaic' on TPU, else 'triton' (GPU, and CPU through the interpreter)."""
  return "mosaic" if target_platform() == "tpu" else "triton"


def fused_attention(q, k, v, qr_by_distance, kr_by_distance, token_mask, *,
                    dropout_rate: float = 0.0, dropout_seed=None, block: int = 64,
                    backend: str | None = None, interpret: bool | None = None,
                    stream_offset=(0, 0), total_heads=None, batch_stride=1):
  """Disentangled attention context [B, n, L, d] with the relative terms added per tile.

  q (pre-scaled), k, v: [B, n, L, d]; qr_by_distance (pre-scaled), kr_by_distance: [2L-1, n, d],
  row t = distance t - (L-1); token_mask: [B, L] (pair mask m_i m_j, as `masked_softmax`).
  dropout_seed: uint32 scalar, required when dropout_rate > 0. Sequences are padded to a
  multiple of the tile (padding is masked). backend: 'triton' | 'mosaic' (default: the target
  platform's, `target_platform`). interpret: run the kernels in Pallas' interpreter (default:
  when compiling for CPU). stream_offset (first batch row, first head), batch_stride (global
  rows between consecutive local rows) and total_heads place a shard in the global dropout
  stream (hash_dropout.RowLayout).
  """
  batch, heads, length, head_dim = q.shape
  if dropout_rate > 0.0 and dropout_seed is None:
    raise ValueError("fused_attention: dropout_rate > 0 needs a dropout_seed")
  backend = backend or default_backend()
  if backend not in _KERNELS:
    raise ValueError(f"fused_attention: backend {backend!r} is not one of {sorted(_KERNELS)}")
  if interpret is None:
    interpret = target_platform() == "cpu"
  if backend == "triton" and not interpret and not _power_of_two_at_least_16(head_dim):
    raise ValueError(f"fused_attention: the Triton kernels need a power-of-two head size >= 16, "
                     f"not {head_dim}")
  tile = block_size(length, block)
  if backend == "mosaic" and not interpret:
    tile = max(tile, 128)  # TPU lanes: a tile row of scores spans at least one vreg row
  padded = -(-length // tile) * tile
  extra = padded - length
  if extra:
    pad_seq = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0)))
    q, k, v = pad_seq(q), pad_seq(k), pad_seq(v)
    pad_dist = lambda x: jnp.pad(x, ((extra, extra), (0, 0), (0, 0)))
    qr_by_distance, kr_by_distance = pad_dist(qr_by_distance), pad_dist(kr_by_distance)
    token_mask = jnp.pad(token_mask, ((0, 0), (0, extra)))
  seed = jnp.zeros((), jnp.uint32) if dropout_seed is None else dropout_seed
  int32 = lambda x: jnp.asarray(x, jnp.int32)
  seed_info = jnp.stack(
      [jax.lax.bitcast_convert_type(jnp.asarray(seed, jnp.uint32), jnp.int32),
       int32(stream_offset[0]), int32(stream_offset[1]), int32(total_heads or heads),
       int32(length), int32(batch_stride), int32(0), int32(0)])
  out = _fused(seed_info, q, k, v, qr_by_distance, kr_by_distance,
               token_mask.astype(jnp.int32), float(dropout_rate), tile, backend, bool(interpret))
  return out[:, :, :length]


def reference_attention(q, k, v, qr_by_distance, kr_by_distance, token_mask, *,
                        dropout_rate: float = 0.0, dropout_seed=None):
  """The same function in plain jnp ([B, n, L, L] tensors), with the kernels' dropout mask.

  For tests: it shares no code with the kernels except `keep_mask`.
  """
  batch, heads, length, _ = q.shape
  distance = jnp.arange(length)[:, None] - jnp.arange(length)[None, :] + (length - 1)
  kr_at = kr_by_distance[distance]  # [L, L, n, d]
  qr_at = qr_by_distance[distance]
  f32 = lambda x: x.astype(jnp.float32)
  scores = (jnp.einsum("bnid,bnjd->bnij", f32(q), f32(k))
            + jnp.einsum("bnid,ijnd->bnij", f32(q), f32(kr_at))
            + jnp.einsum("bnjd,ijnd->bnij", f32(k), f32(qr_at)))
  m = token_mask.astype(bool)
  pair = m[:, None, :, None] & m[:, None, None, :]
  probs = jax.nn.softmax(jnp.where(pair, scores, jnp.finfo(jnp.float32).min), axis=-1)
  probs = jnp.where(pair, probs, 0.0)
  if dropout_rate > 0.0:
    bh = (jnp.arange(batch)[:, None] * heads + jnp.arange(heads)[None, :]).astype(jnp.int32)
    rows = jnp.arange(length, dtype=jnp.int32)
    keep = jax.vmap(jax.vmap(lambda s: keep_mask(jnp.asarray(dropout_seed, jnp.uint32), s,
                                                 rows[:, None], rows[None, :], length,
                                                 dropout_rate)))(bh)
    probs = jnp.where(keep, probs * keep_scale(dropout_rate), 0.0)
  return jnp.einsum("bnij,bnjd->bnid", probs, f32(v)).astype(q.dtype)


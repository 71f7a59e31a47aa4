"""Fused disentangled attention: Pallas kernels that add the c2p and p2c terms tile by tile.

Why: the `skew` and `gather` paths build the scores, the softmax, the dropout mask and the
probabilities as [B, n, L, L] float32 tensors, and `skew` adds relayout copies of the
[B, n, L, 2L-1] products. On a GPU that traffic, not the matmuls, sets the step time (the H100
profile in docs/benchmarks.md: 68% of the base step is attention). Here a score never exists
beyond a [block_q, block_k] tile in registers, as in FlashAttention-2:

  forward   one program per (batch, head, query block) loops over key blocks with an online
            softmax and writes the context and the log-sum-exp per query;
  backward  two kernels recompute the tiles from the log-sum-exp: one per key block writes dK,
            dV and the p2c table's gradient, one per query block writes dQ and the c2p table's.

The relative terms need no [L, L] gather. Both depend on (i, j) through the distance i - j only,
so the per-distance products are plain batched matmuls computed by XLA outside the kernels:

  c2p[b, n, i, u] = q_i . kr(distance (L-1) - u)   term of (i, j) at u = (L-1) - i + j
  p2c[b, n, j, t] = k_j . qr(distance t - (L-1))   term of (i, j) at t = (L-1) + i - j

and a tile reads its terms from them with computed indices. The c2p table is stored with its
distance axis reversed so that, in both tables, the entries a tile needs run contiguously along
one tile axis (along keys for c2p, along queries for p2c): the loads coalesce, and the kernels
transpose in registers where the other orientation is needed. In the backward pass each table
entry receives the score gradient of exactly one (i, j) pair, so the table gradients are written
with plain stores (no atomics, deterministic) into zero-initialised buffers, and XLA turns them
into dq, dk, dqr and dkr with the same batched matmuls it uses for the forward products.

Attention dropout is regenerated from a counter-based hash of (seed, batch, head, i, j), so the
backward kernels rebuild the forward's mask without storing it. Its random stream differs from
`layers.Dropout`'s (the keep rate and the scaling are the same).

The kernels target the Pallas Triton backend (GPU). On CPU they run in Pallas' interpreter,
which is what the tests use; TPU is refused (the `skew` path is the TPU path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# A finite "minus infinity" for masked scores: exp(NEG - m) underflows to exactly 0 for any
# real row maximum m, and NEG - NEG = 0 keeps fully masked rows finite.
_NEG = -1e30
_DROPOUT_BITS = 23  # keep decisions compare 23 hash bits, so the threshold fits an int32


def block_size(length: int, preferred: int = 64) -> int:
  """A power of two in [16, preferred]; Triton tiles must be powers of two and dots >= 16."""
  size = 16
  while size < preferred and size < length:
    size *= 2
  return size


# ----------------------------------------------------------------------------------------------
# Dropout mask from a counter-based hash (the same function in the kernels and in tests)


def _mix32(x):
  """A 32-bit integer finaliser (xorshift-multiply, "lowbias32"): each output bit depends on all
  input bits, so consecutive counters give independent-looking words."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_threshold(rate: float) -> int:
  """Entries whose 23-bit hash is below this are dropped (rate quantized to 2^-23)."""
  return min(int(round(rate * (1 << _DROPOUT_BITS))), (1 << _DROPOUT_BITS) - 1)


def keep_mask(seed, batch_head, rows, cols, length, rate: float):
  """Boolean keep decisions for query positions `rows` and key positions `cols` (broadcast).

  seed: uint32 scalar; batch_head: the global index b * heads + h (int32 scalar); length: the
  unpadded sequence length (the counter is i * length + j, so tile padding changes nothing).
  """
  stream = _mix32(seed ^ (batch_head.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))
  counter = (rows * length + cols).astype(jnp.uint32)
  bits = (_mix32(stream + counter) >> (32 - _DROPOUT_BITS)).astype(jnp.int32)
  return bits >= dropout_threshold(rate)


def keep_scale(rate: float) -> float:
  """1 / the exact (quantized) keep probability."""
  return float(1 << _DROPOUT_BITS) / float((1 << _DROPOUT_BITS) - dropout_threshold(rate))


# ----------------------------------------------------------------------------------------------
# Tile helpers


def _tile_indices(q_start, k_start, block_q, block_k):
  rows = q_start + jnp.arange(block_q, dtype=jnp.int32)
  cols = k_start + jnp.arange(block_k, dtype=jnp.int32)
  return rows, cols


def _c2p_tile(c2p_ref, rows, cols, length):
  """[block_q, block_k] c2p terms; addresses contiguous along keys."""
  shape = (rows.shape[0], cols.shape[0])
  r = jnp.broadcast_to(rows[:, None], shape)
  return c2p_ref[r, (length - 1) - r + cols[None, :]].astype(jnp.float32)


def _p2c_tile_transposed(p2c_ref, rows, cols, length):
  """[block_k, block_q] p2c terms (keys as rows); addresses contiguous along queries."""
  shape = (cols.shape[0], rows.shape[0])
  c = jnp.broadcast_to(cols[:, None], shape)
  return p2c_ref[c, (length - 1) + rows[None, :] - c].astype(jnp.float32)


def _dot(a, b, trans_b=False):
  """Matmul with float32 accumulation (tensor cores for 16-bit inputs)."""
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _dropout_stream(seed_ref):
  """(seed, global batch * heads + head index, unpadded length) of this program.

  seed_ref = [seed, first batch index, first head index, total heads, unpadded length, 0, 0, 0].
  """
  seed = seed_ref[0].astype(jnp.uint32)
  b = pl.program_id(0) + seed_ref[1]
  h = pl.program_id(1) + seed_ref[2]
  return seed, b * seed_ref[3] + h, seed_ref[4]


# ----------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_ref, p2c_ref, mask_ref,
                    out_ref, lse_ref, *, block_q, block_k, rate):
  length = k_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  seed, stream, true_length = _dropout_stream(seed_ref)
  q = q_ref[...]
  q_valid = mask_ref[pl.ds(q_start, block_q)] > 0

  def body(kb, carry):
    acc, m_prev, l_prev = carry
    k_start = kb * block_k
    rows, cols = _tile_indices(q_start, k_start, block_q, block_k)
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    k_valid = mask_ref[pl.ds(k_start, block_k)] > 0
    s = (_dot(q, k, trans_b=True) + _c2p_tile(c2p_ref, rows, cols, length)
         + _p2c_tile_transposed(p2c_ref, rows, cols, length).T)
    s = jnp.where(k_valid[None, :], s, _NEG)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - m_next[:, None])
    l_next = correction * l_prev + jnp.sum(p, axis=1)
    if rate > 0.0:
      keep = keep_mask(seed, stream, rows[:, None], cols[None, :], true_length, rate)
      p = jnp.where(keep, p * keep_scale(rate), 0.0)
    acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  acc = jnp.zeros((block_q, q.shape[-1]), jnp.float32)
  m = jnp.full((block_q,), _NEG, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = jax.lax.fori_loop(0, length // block_k, body, (acc, m, l))
  out = jnp.where(q_valid[:, None], acc / l[:, None], 0.0)
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_ref, p2c_ref, mask_ref, do_ref, lse_ref,
               delta_ref, _dc2p_zeros_ref, dq_ref, dc2p_ref, *, block_q, block_k, rate):
  length = k_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  seed, stream, true_length = _dropout_stream(seed_ref)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]

  def body(kb, dq):
    k_start = kb * block_k
    rows, cols = _tile_indices(q_start, k_start, block_q, block_k)
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    k_valid = mask_ref[pl.ds(k_start, block_k)] > 0
    s = (_dot(q, k, trans_b=True) + _c2p_tile(c2p_ref, rows, cols, length)
         + _p2c_tile_transposed(p2c_ref, rows, cols, length).T)
    p = jnp.where(k_valid[None, :], jnp.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, v, trans_b=True)
    if rate > 0.0:
      keep = keep_mask(seed, stream, rows[:, None], cols[None, :], true_length, rate)
      dp = jnp.where(keep, dp * keep_scale(rate), 0.0)
    ds = p * (dp - delta[:, None])
    r = jnp.broadcast_to(rows[:, None], ds.shape)
    dc2p_ref[r, (length - 1) - r + cols[None, :]] = ds.astype(dc2p_ref.dtype)
    return dq + _dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(0, length // block_k, body,
                         jnp.zeros((block_q, q.shape[-1]), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_ref, p2c_ref, mask_ref, do_ref, lse_ref,
                delta_ref, _dp2c_zeros_ref, dk_ref, dv_ref, dp2c_ref, *, block_q, block_k, rate):
  """Works on transposed tiles [block_k, block_q]: keys are this program's rows."""
  length = q_ref.shape[0]
  k_start = pl.program_id(2) * block_k
  seed, stream, true_length = _dropout_stream(seed_ref)
  k = k_ref[...]
  v = v_ref[...]
  k_valid = mask_ref[pl.ds(k_start, block_k)] > 0

  def body(qb, carry):
    dk, dv = carry
    q_start = qb * block_q
    rows, cols = _tile_indices(q_start, k_start, block_q, block_k)
    q = q_ref[pl.ds(q_start, block_q), :]
    do = do_ref[pl.ds(q_start, block_q), :]
    lse = lse_ref[pl.ds(q_start, block_q)]
    delta = delta_ref[pl.ds(q_start, block_q)]
    s_t = (_dot(k, q, trans_b=True) + _c2p_tile(c2p_ref, rows, cols, length).T
           + _p2c_tile_transposed(p2c_ref, rows, cols, length))
    p_t = jnp.where(k_valid[:, None], jnp.exp(s_t - lse[None, :]), 0.0)
    dp_t = _dot(v, do, trans_b=True)
    if rate > 0.0:
      keep_t = keep_mask(seed, stream, rows[None, :], cols[:, None], true_length, rate)
      dv = dv + _dot(jnp.where(keep_t, p_t * keep_scale(rate), 0.0).astype(do.dtype), do)
      dp_t = jnp.where(keep_t, dp_t * keep_scale(rate), 0.0)
    else:
      dv = dv + _dot(p_t.astype(do.dtype), do)
    ds_t = p_t * (dp_t - delta[None, :])
    c = jnp.broadcast_to(cols[:, None], ds_t.shape)
    dp2c_ref[c, (length - 1) + rows[None, :] - c] = ds_t.astype(dp2c_ref.dtype)
    return dk + _dot(ds_t.astype(q.dtype), q), dv

  zeros = jnp.zeros((block_k, k.shape[-1]), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, length // block_q, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers and the custom VJP


def _specs(length, width, head_dim, block_rows):
  """Block specs over the (batch, head, row block) grid: this program's rows, whole sequences,
  whole tables, the token mask and the seed vector."""
  rows = pl.BlockSpec((None, None, block_rows, head_dim), lambda b, h, i: (b, h, i, 0))
  full = pl.BlockSpec((None, None, length, head_dim), lambda b, h, i: (b, h, 0, 0))
  table = pl.BlockSpec((None, None, length, width), lambda b, h, i: (b, h, 0, 0))
  mask = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
  seed = pl.BlockSpec((8,), lambda b, h, i: (0,))
  return rows, full, table, mask, seed


def _compiler_params(head_dim):
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _forward(seed, q, k, v, c2p, p2c, mask, *, rate, block_q, block_k, interpret):
  batch, heads, length, head_dim = q.shape
  width = c2p.shape[-1]
  q_spec, full, table, mask_spec, seed_spec = _specs(length, width, head_dim, block_q)
  row_stat = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
  return pl.pallas_call(
      functools.partial(_forward_kernel, block_q=block_q, block_k=block_k, rate=rate),
      grid=(batch, heads, length // block_q),
      in_specs=[seed_spec, q_spec, full, full, table, table, mask_spec],
      out_specs=[q_spec, row_stat],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=_compiler_params(head_dim),
      interpret=interpret,
      name="disentangled_attention_forward",
  )(seed, q, k, v, c2p, p2c, mask)


def _backward(seed, q, k, v, c2p, p2c, mask, out, lse, d_out, *, rate, block_q, block_k,
              interpret):
  batch, heads, length, head_dim = q.shape
  width = c2p.shape[-1]
  d_out = jnp.where(mask[:, None, :, None] > 0, d_out, 0).astype(q.dtype)
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  operands = (seed, q, k, v, c2p, p2c, mask, d_out, lse, delta)
  params = dict(rate=rate, block_q=block_q, block_k=block_k)

  q_blocked, full, table, mask_spec, seed_spec = _specs(length, width, head_dim, block_q)
  stat_blocked = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
  dq, dc2p = pl.pallas_call(
      functools.partial(_dq_kernel, **params),
      grid=(batch, heads, length // block_q),
      in_specs=[seed_spec, q_blocked, full, full, table, table, mask_spec, q_blocked,
                stat_blocked, stat_blocked, table],
      out_specs=[q_blocked, table],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(c2p.shape, c2p.dtype)],
      input_output_aliases={10: 1},
      compiler_params=_compiler_params(head_dim),
      interpret=interpret,
      name="disentangled_attention_dq",
  )(*operands, jnp.zeros_like(c2p))

  k_blocked, full, table, mask_spec, seed_spec = _specs(length, width, head_dim, block_k)
  stat_full = pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))
  dk, dv, dp2c = pl.pallas_call(
      functools.partial(_dkv_kernel, **params),
      grid=(batch, heads, length // block_k),
      in_specs=[seed_spec, full, k_blocked, k_blocked, table, table, mask_spec, full,
                stat_full, stat_full, table],
      out_specs=[k_blocked, k_blocked, table],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(p2c.shape, p2c.dtype)],
      input_output_aliases={10: 2},
      compiler_params=_compiler_params(head_dim),
      interpret=interpret,
      name="disentangled_attention_dkv",
  )(*operands, jnp.zeros_like(p2c))
  return dq, dk, dv, dc2p, dp2c


def relative_tables(q, k, qr_by_distance, kr_by_distance):
  """The per-distance products the kernels read: (c2p reversed, p2c), each [B, n, L, 2L].

  q, k: [B, n, L, d]; row t of *_by_distance [2L-1, n, d] holds distance t - (L-1). The last
  column is zero padding (a power-of-two row length keeps rows aligned). Plain batched matmuls
  with float32 accumulation, stored in the compute dtype.
  """
  batch = q.shape[0]

  def per_sequence(rel):  # [R, n, d] -> [B, n, R, d], laid out like q and k (a broadcast)
    rel = jnp.swapaxes(rel, 0, 1)
    return jnp.broadcast_to(rel[None], (batch,) + rel.shape)

  kr_reversed = jnp.pad(jnp.flip(kr_by_distance, axis=0), ((0, 1), (0, 0), (0, 0)))
  qr = jnp.pad(qr_by_distance, ((0, 1), (0, 0), (0, 0)))
  c2p = jnp.einsum("bnid,bnud->bniu", q, per_sequence(kr_reversed),
                   preferred_element_type=jnp.float32).astype(q.dtype)
  p2c = jnp.einsum("bnjd,bntd->bnjt", k, per_sequence(qr),
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return c2p, p2c


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _fused(seed, q, k, v, qr, kr, mask, rate, block, interpret):
  return _fused_fwd(seed, q, k, v, qr, kr, mask, rate, block, interpret)[0]


def _fused_fwd(seed, q, k, v, qr, kr, mask, rate, block, interpret):
  # The tables are recomputed in the backward pass rather than saved: two matmuls are cheaper
  # than keeping 2 x [B, n, L, 2L] per layer alive until the backward pass.
  c2p, p2c = relative_tables(q, k, qr, kr)
  out, lse = _forward(seed, q, k, v, c2p, p2c, mask, rate=rate, block_q=block,
                      block_k=block, interpret=interpret)
  return out, (seed, q, k, v, qr, kr, mask, out, lse)


def _fused_bwd(rate, block, interpret, residuals, d_out):
  seed, q, k, v, qr, kr, mask, out, lse = residuals
  (c2p, p2c), tables_vjp = jax.vjp(relative_tables, q, k, qr, kr)
  dq, dk, dv, dc2p, dp2c = _backward(seed, q, k, v, c2p, p2c, mask, out, lse, d_out, rate=rate,
                                     block_q=block, block_k=block, interpret=interpret)
  dq_rel, dk_rel, dqr, dkr = tables_vjp((dc2p, dp2c))
  dq = (dq.astype(jnp.float32) + dq_rel.astype(jnp.float32)).astype(q.dtype)
  dk = (dk.astype(jnp.float32) + dk_rel.astype(jnp.float32)).astype(k.dtype)
  return None, dq, dk, dv, dqr, dkr, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point


def fused_attention(q, k, v, qr_by_distance, kr_by_distance, token_mask, *,
                    dropout_rate: float = 0.0, dropout_seed=None, block: int = 64,
                    interpret: bool | None = None, stream_offset=(0, 0), total_heads=None):
  """Disentangled attention context [B, n, L, d] with the relative terms added per tile.

  q (pre-scaled), k, v: [B, n, L, d]; qr_by_distance (pre-scaled), kr_by_distance: [2L-1, n, d],
  row t = distance t - (L-1); token_mask: [B, L] (pair mask m_i m_j, as `masked_softmax`).
  dropout_seed: uint32 scalar, required when dropout_rate > 0. Sequences are padded to a
  multiple of the tile (padding is masked). stream_offset (first batch, first head) and
  total_heads place a shard's rows in the global dropout stream (set by `sharded`).
  interpret: run the kernels in Pallas' interpreter (default: on CPU).
  """
  batch, heads, length, head_dim = q.shape
  if dropout_rate > 0.0 and dropout_seed is None:
    raise ValueError("fused_attention: dropout_rate > 0 needs a dropout_seed")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  tile = block_size(length, block)
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
       int32(length), int32(0), int32(0), int32(0)])
  out = _fused(seed_info, q, k, v, qr_by_distance, kr_by_distance,
               token_mask.astype(jnp.int32), float(dropout_rate), tile, bool(interpret))
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


"""The fused disentangled-attention kernels for GPU (Pallas Triton).

See flash_attention.py for the algorithm and the tables. Here a tile reads its relative terms
with computed-index loads (pointer arithmetic in Triton), contiguous along one tile axis, and the
backward kernels write the table gradients with plain scattered stores into zero-initialised
buffers: each table entry belongs to exactly one (i, j) pair, so no atomics are needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from deberta_jax.models.kernels import MASKED_SCORE as NEG
from deberta_jax.models.hash_dropout import keep_mask, keep_scale


# The kernels read the relative terms from the [B, n, L, 2L] tables (relative_tables).
RELATIVE_OPERANDS = "tables"
# The backward kernels write the table gradients in the tables' own layouts.
GRADIENT_LAYOUT = {"c2p_reversed": True, "p2c_reversed": False}


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


def _score_tile(q, q_start, k_start, refs, block_q, block_k):
  """The [block_q, block_k] scores c2c + c2p + p2c at (q_start, k_start), float32, with the
  tile's positions, keys, values and key validity. refs = (k, v, c2p, p2c, mask)."""
  k_ref, v_ref, c2p_ref, p2c_ref, mask_ref = refs
  length = k_ref.shape[0]
  rows, cols = _tile_indices(q_start, k_start, block_q, block_k)
  k = k_ref[pl.ds(k_start, block_k), :]
  v = v_ref[pl.ds(k_start, block_k), :]
  k_valid = mask_ref[pl.ds(k_start, block_k)] > 0
  s = (_dot(q, k, trans_b=True) + _c2p_tile(c2p_ref, rows, cols, length)
       + _p2c_tile_transposed(p2c_ref, rows, cols, length).T)
  return s, rows, cols, k, v, k_valid


def _dropout_stream(seed_ref):
  """(seed, global batch * heads + head index, unpadded length) of this program.

  seed_ref = [seed, first batch index, first head index, total heads, unpadded length,
  batch stride, 0, 0]: program b's global batch row is first + stride * b (hash_dropout.RowLayout).
  """
  seed = seed_ref[0].astype(jnp.uint32)
  b = pl.program_id(0) * seed_ref[5] + seed_ref[1]
  h = pl.program_id(1) + seed_ref[2]
  return seed, b * seed_ref[3] + h, seed_ref[4]


# ----------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_ref, p2c_ref, mask_ref,
                    out_ref, lse_ref, *, block_q, block_k, rate):
  """One query block: online softmax over the key blocks; writes the context and log-sum-exp."""
  length = k_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  seed, stream, true_length = _dropout_stream(seed_ref)
  q = q_ref[...]
  q_valid = mask_ref[pl.ds(q_start, block_q)] > 0

  refs = (k_ref, v_ref, c2p_ref, p2c_ref, mask_ref)

  def body(kb, carry):
    acc, m_prev, l_prev = carry
    s, rows, cols, _, v, k_valid = _score_tile(q, q_start, kb * block_k, refs, block_q, block_k)
    s = jnp.where(k_valid[None, :], s, NEG)
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
  m = jnp.full((block_q,), NEG, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = jax.lax.fori_loop(0, length // block_k, body, (acc, m, l))
  out = jnp.where(q_valid[:, None], acc / l[:, None], 0.0)
  out_ref[...] = out.astype(out_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_ref, p2c_ref, mask_ref, do_ref, lse_ref,
               delta_ref, _dc2p_zeros_ref, dq_ref, dc2p_ref, *, block_q, block_k, rate):
  """One query block: dQ, and the score gradients scattered into its rows of the c2p table's
  gradient (the zeroed buffer aliased to dc2p_ref)."""
  length = k_ref.shape[0]
  q_start = pl.program_id(2) * block_q
  seed, stream, true_length = _dropout_stream(seed_ref)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]

  refs = (k_ref, v_ref, c2p_ref, p2c_ref, mask_ref)

  def body(kb, dq):
    s, rows, cols, k, v, k_valid = _score_tile(q, q_start, kb * block_k, refs, block_q, block_k)
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
# pallas_call wrappers (the custom VJP lives in flash_attention.py)


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


def forward(seed, q, k, v, c2p, p2c, mask, *, rate, tile, interpret):
  """(context [B, n, L, d], log-sum-exp [B, n, L])."""
  block_q = block_k = tile
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


def backward(seed, q, k, v, c2p, p2c, mask, lse, d_out, delta, *, rate, tile, interpret):
  """(dq, dk, dv, d c2p table, d p2c table); d_out already zero on pad query rows."""
  block_q = block_k = tile
  batch, heads, length, head_dim = q.shape
  width = c2p.shape[-1]
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

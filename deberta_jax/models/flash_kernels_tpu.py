"""The fused disentangled-attention kernels for TPU (Pallas Mosaic).

Same algorithm, tables and dropout hash as the GPU kernels in flash_attention.py (read that
docstring first); what differs is how a tile finds its relative terms. A TPU kernel has no
per-element gather, but it has a strided lane rotation, and that is exactly the relative shift:

  The c2p entries of tile (query block i, key block j) lie in the [T, 2T] window of the
  reversed c2p table at rows i*T.., columns (nb-1-i+j)*T.. (T the tile, nb = L/T): entry
  (a, b) sits at window column (T-1-a) + b. Rotating row a of the window by T+1+a lanes
  (`pltpu.roll(..., stride=1)`) moves it to column b, and the first T columns are the tile.
  The p2c window (rows j, columns (nb-1+i-j)*T..) gives the transposed tile the same way.

The two halves of a window are two aligned [T, T] blocks of the table, fetched by the pipeline
like any other input. In the backward pass the inverse rotation places a score-gradient tile
back into window layout, and a [T, 2L] float32 band in VMEM accumulates the table gradient of
the row block over the sequential grid axis (each band entry receives one tile's value; the
others add zeros), written once at the end.

Grids are (batch, head, row block, column block) with the last axis sequential ("arbitrary"),
as in jax's own Pallas TPU flash attention. Tiles are at least 128 (lanes). Verified on CPU in
the Pallas interpreter and by lowering to Mosaic for a TPU target; not yet run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from deberta_jax.models import flash_common as common

_LANES = 128  # per-row statistics are kept replicated over one vreg row of lanes


def _unskew(window, tile):
  """[T, 2T] window -> [T, T] tile with tile[a, b] = window[a, T-1-a+b] (stride-1 rotation)."""
  rolled = pltpu.roll(window, tile + 1, 1, stride=1, stride_axis=0)
  return rolled[:, :tile]


def _skew(tile_values):
  """[T, T] -> [T, 2T] window with window[a, T-1-a+b] = tile[a, b], zeros elsewhere."""
  t = tile_values.shape[0]
  padded = jnp.concatenate([tile_values, jnp.zeros_like(tile_values)], axis=1)
  return pltpu.roll(padded, t - 1, 1, stride=2 * t - 1, stride_axis=0)


def _window(lo_ref, hi_ref):
  return jnp.concatenate([lo_ref[...], hi_ref[...]], axis=1).astype(jnp.float32)


def _dot_nt(a, b):
  """a @ b.T with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _stream(seed_ref):
  seed = seed_ref[0].astype(jnp.uint32)
  b = pl.program_id(0) + seed_ref[1]
  h = pl.program_id(1) + seed_ref[2]
  return seed, b * seed_ref[3] + h, seed_ref[4]


def _positions(tile, row_block, col_block, transposed=False):
  """Absolute (query, key) positions of a tile; transposed tiles have keys as rows."""
  row = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 1)
  if transposed:
    return row_block * tile + col, col_block * tile + row
  return row_block * tile + row, col_block * tile + col


# ----------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, key_mask_ref,
                    query_mask_ref, out_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *,
                    tile, rate):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_scratch[...] = jnp.full(m_scratch.shape, common.NEG, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  s = (_dot_nt(q_ref[...], k_ref[...]) + _unskew(_window(c2p_lo, c2p_hi), tile)
       + _unskew(_window(p2c_lo, p2c_hi), tile).T)
  s = jnp.where(key_mask_ref[...] > 0, s, common.NEG)
  m_prev, l_prev = m_scratch[...][:, :1], l_scratch[...][:, :1]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  correction = jnp.exp(m_prev - m_next)
  p = jnp.exp(s - m_next)
  l_next = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
  if rate > 0.0:
    seed, stream, length = _stream(seed_ref)
    rows, cols = _positions(tile, i, j)
    keep = common.keep_mask(seed, stream, rows, cols, length, rate)
    p = jnp.where(keep, p * common.keep_scale(rate), 0.0)
  acc_scratch[...] = correction * acc_scratch[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
  m_scratch[...] = jnp.broadcast_to(m_next, m_scratch.shape)
  l_scratch[...] = jnp.broadcast_to(l_next, l_scratch.shape)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    out = acc_scratch[...] / l_next
    out_ref[...] = jnp.where(query_mask_ref[...][:, :1] > 0, out, 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(m_next + jnp.log(l_next), lse_ref.shape)


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, key_mask_ref,
               do_ref, lse_ref, delta_ref, dq_ref, dc2p_ref, dq_scratch, band_scratch, *,
               tile, rate):
  i, j = pl.program_id(2), pl.program_id(3)
  blocks = pl.num_programs(3)

  @pl.when(j == 0)
  def _():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)
    band_scratch[...] = jnp.zeros(band_scratch.shape, jnp.float32)

  k = k_ref[...]
  s = (_dot_nt(q_ref[...], k) + _unskew(_window(c2p_lo, c2p_hi), tile)
       + _unskew(_window(p2c_lo, p2c_hi), tile).T)
  p = jnp.where(key_mask_ref[...] > 0, jnp.exp(s - lse_ref[...][:, :1]), 0.0)
  dp = _dot_nt(do_ref[...], v_ref[...])
  if rate > 0.0:
    seed, stream, length = _stream(seed_ref)
    rows, cols = _positions(tile, i, j)
    keep = common.keep_mask(seed, stream, rows, cols, length, rate)
    dp = jnp.where(keep, dp * common.keep_scale(rate), 0.0)
  ds = p * (dp - delta_ref[...][:, :1])
  dq_scratch[...] += _dot(ds.astype(k.dtype), k)
  start = pl.multiple_of((blocks - 1 - i + j) * tile, tile)
  band_scratch[:, pl.ds(start, 2 * tile)] += _skew(ds)

  @pl.when(j == blocks - 1)
  def _():
    dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)
    dc2p_ref[...] = band_scratch[...].astype(dc2p_ref.dtype)


def _dkv_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, key_mask_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dp2c_ref, dk_scratch, dv_scratch,
                band_scratch, *, tile, rate):
  """Transposed tiles [keys, queries]: grid axis 2 is the key block, axis 3 the query block."""
  j, i = pl.program_id(2), pl.program_id(3)
  blocks = pl.num_programs(3)

  @pl.when(i == 0)
  def _():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)
    band_scratch[...] = jnp.zeros(band_scratch.shape, jnp.float32)

  q, do = q_ref[...], do_ref[...]
  s_t = (_dot_nt(k_ref[...], q) + _unskew(_window(c2p_lo, c2p_hi), tile).T
         + _unskew(_window(p2c_lo, p2c_hi), tile))
  p_t = jnp.where(key_mask_ref[...][:, :1] > 0, jnp.exp(s_t - lse_ref[...]), 0.0)
  dp_t = _dot_nt(v_ref[...], do)
  if rate > 0.0:
    seed, stream, length = _stream(seed_ref)
    rows, cols = _positions(tile, i, j, transposed=True)
    keep_t = common.keep_mask(seed, stream, rows, cols, length, rate)
    p_used = jnp.where(keep_t, p_t * common.keep_scale(rate), 0.0)
    dp_t = jnp.where(keep_t, dp_t * common.keep_scale(rate), 0.0)
  else:
    p_used = p_t
  dv_scratch[...] += _dot(p_used.astype(do.dtype), do)
  ds_t = p_t * (dp_t - delta_ref[...])
  dk_scratch[...] += _dot(ds_t.astype(q.dtype), q)
  start = pl.multiple_of((blocks - 1 + i - j) * tile, tile)
  band_scratch[:, pl.ds(start, 2 * tile)] += _skew(ds_t)

  @pl.when(i == blocks - 1)
  def _():
    dk_ref[...] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)
    dp2c_ref[...] = band_scratch[...].astype(dp2c_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers (the custom VJP lives in flash_attention.py)


def _row_block(tile, head_dim, axis):
  """[T, d] blocks of q/k/v-shaped arrays, indexed by grid axis 2 or 3."""
  return pl.BlockSpec((None, None, tile, head_dim),
                      lambda b, h, x, y: (b, h, (x, y)[axis - 2], 0))


def _window_halves(tile, blocks, transposed_grid, table):
  """The two [T, T] blocks of a table window. table 'c2p': rows = query block, columns start at
  block nb-1-i+j; 'p2c': rows = key block, columns start at nb-1+i-j."""
  def index(half):
    def fn(b, h, x, y):
      i, j = (y, x) if transposed_grid else (x, y)
      if table == "c2p":
        return b, h, i, blocks - 1 - i + j + half
      return b, h, j, blocks - 1 + i - j + half
    return fn
  return [pl.BlockSpec((None, None, tile, tile), index(0)),
          pl.BlockSpec((None, None, tile, tile), index(1))]


def _stat_column(tile, axis):
  return pl.BlockSpec((None, None, tile, _LANES), lambda b, h, x, y: (b, h, (x, y)[axis - 2], 0))


def _params(semantics=("parallel", "parallel", "parallel", "arbitrary")):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _smem():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def forward(seed, q, k, v, c2p, p2c, mask, *, rate, tile, interpret):
  """(context [B, n, L, d], log-sum-exp [B, n, L])."""
  batch, heads, length, head_dim = q.shape
  blocks = length // tile
  key_mask = mask[:, None, :]                                          # [B, 1, L]
  query_mask = jnp.broadcast_to(mask[:, :, None], (batch, length, _LANES))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, tile=tile, rate=rate),
      grid=(batch, heads, blocks, blocks),
      in_specs=[_smem(), _row_block(tile, head_dim, 2), _row_block(tile, head_dim, 3),
                _row_block(tile, head_dim, 3),
                *_window_halves(tile, blocks, False, "c2p"),
                *_window_halves(tile, blocks, False, "p2c"),
                pl.BlockSpec((None, 1, tile), lambda b, h, i, j: (b, 0, j)),
                pl.BlockSpec((None, tile, _LANES), lambda b, h, i, j: (b, i, 0))],
      out_specs=[_row_block(tile, head_dim, 2), _stat_column(tile, 2)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length, _LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((tile, _LANES), jnp.float32),
                      pltpu.VMEM((tile, _LANES), jnp.float32),
                      pltpu.VMEM((tile, head_dim), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="disentangled_attention_forward_tpu",
  )(seed, q, k, v, c2p, c2p, p2c, p2c, key_mask, query_mask)
  return out, lse[..., 0]


def backward(seed, q, k, v, c2p, p2c, mask, lse, d_out, delta, *, rate, tile, interpret):
  """(dq, dk, dv, d c2p table, d p2c table); d_out already zero on pad query rows."""
  batch, heads, length, head_dim = q.shape
  blocks = length // tile
  width = c2p.shape[-1]
  column = lambda x: jnp.broadcast_to(x[..., None], x.shape + (_LANES,))  # [B, n, L, 128]
  row = lambda x: x[:, :, None, :]                                        # [B, n, 1, L]
  table_rows = lambda axis: pl.BlockSpec(
      (None, None, tile, width), lambda b, h, x, y: (b, h, (x, y)[axis - 2], 0))

  dq, dc2p = pl.pallas_call(
      functools.partial(_dq_kernel, tile=tile, rate=rate),
      grid=(batch, heads, blocks, blocks),
      in_specs=[_smem(), _row_block(tile, head_dim, 2), _row_block(tile, head_dim, 3),
                _row_block(tile, head_dim, 3),
                *_window_halves(tile, blocks, False, "c2p"),
                *_window_halves(tile, blocks, False, "p2c"),
                pl.BlockSpec((None, 1, tile), lambda b, h, i, j: (b, 0, j)),
                _row_block(tile, head_dim, 2), _stat_column(tile, 2), _stat_column(tile, 2)],
      out_specs=[_row_block(tile, head_dim, 2), table_rows(2)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(c2p.shape, c2p.dtype)],
      scratch_shapes=[pltpu.VMEM((tile, head_dim), jnp.float32),
                      pltpu.VMEM((tile, width), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="disentangled_attention_dq_tpu",
  )(seed, q, k, v, c2p, c2p, p2c, p2c, mask[:, None, :], d_out, column(lse), column(delta))

  key_mask = jnp.broadcast_to(mask[:, :, None], (batch, length, _LANES))
  dk, dv, dp2c = pl.pallas_call(
      functools.partial(_dkv_kernel, tile=tile, rate=rate),
      grid=(batch, heads, blocks, blocks),
      in_specs=[_smem(), _row_block(tile, head_dim, 3), _row_block(tile, head_dim, 2),
                _row_block(tile, head_dim, 2),
                *_window_halves(tile, blocks, True, "c2p"),
                *_window_halves(tile, blocks, True, "p2c"),
                pl.BlockSpec((None, tile, _LANES), lambda b, h, j, i: (b, j, 0)),
                _row_block(tile, head_dim, 3),
                pl.BlockSpec((None, None, 1, tile), lambda b, h, j, i: (b, h, 0, i)),
                pl.BlockSpec((None, None, 1, tile), lambda b, h, j, i: (b, h, 0, i))],
      out_specs=[_row_block(tile, head_dim, 2), _row_block(tile, head_dim, 2), table_rows(2)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct(p2c.shape, p2c.dtype)],
      scratch_shapes=[pltpu.VMEM((tile, head_dim), jnp.float32),
                      pltpu.VMEM((tile, head_dim), jnp.float32),
                      pltpu.VMEM((tile, width), jnp.float32)],
      compiler_params=_params(),
      interpret=interpret,
      name="disentangled_attention_dkv_tpu",
  )(seed, q, k, v, c2p, c2p, p2c, p2c, key_mask, d_out, row(lse), row(delta))
  return dq, dk, dv, dc2p, dp2c

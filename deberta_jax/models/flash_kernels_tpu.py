"""The fused disentangled-attention kernels for TPU (Pallas Mosaic).

Same algorithm, tables and dropout hash as the GPU kernels in flash_attention.py (read that
docstring first); what differs is how a tile finds its relative terms. A TPU kernel has no
per-element gather, but it has a strided lane rotation, and that is exactly the relative shift:

  The c2p entries of tile (query block i, key block j) lie in the [T, 2T] window of the
  reversed c2p table at rows i*T.., columns (nb-1-i+j)*T.. (T the tile, nb = L/T): entry
  (a, b) sits at window column (T-1-a) + b. Rotating row a right by a lanes
  (`pltpu.roll(..., stride=1)`), then every row left by T-1, moves it to column b, and the
  first T columns are the tile. The p2c window (rows j, columns (nb-1+i-j)*T..) gives the
  transposed tile the same way.

The two halves of a window are two aligned [T, T] blocks of the table, fetched by the pipeline
like any other input. The grid is (batch, head, query block, key block) with the last axis
sequential ("arbitrary"), as in jax's own Pallas TPU flash attention. Tiles are at least 128.

Only the forward pass is a kernel. The backward pass needs the inverse rotation (row a left by
a lanes), which Mosaic does not compile (a deviceless libtpu compile refused stride 2T-1: its
strided rotations must keep the per-row shifts within one vreg), so `backward` recomputes the
layer densely in XLA. Verified on CPU in the Pallas interpreter, and compiled whole (forward
kernel and XLA backward) by libtpu for a v5p target without a TPU
(experiments/tpu_aot_check.py); not yet run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from deberta_jax.models import flash_common as common
from deberta_jax.models import hash_dropout
from deberta_jax.models import relative_position

_LANES = 128  # per-row statistics are kept replicated over one vreg row of lanes


def _unskew(window, tile):
  """[T, 2T] window -> [T, T] tile with tile[a, b] = window[a, T-1-a+b].

  Two rotations Mosaic supports: row a right by a lanes (shift 0, stride 1; the per-row shifts
  must stay below one vreg's 128 lanes, so a nonzero base shift or a larger stride is refused),
  then every row right by T+1, i.e. left by T-1 modulo 2T.
  """
  rolled = pltpu.roll(window, 0, 1, stride=1, stride_axis=0)
  return pltpu.roll(rolled, tile + 1, 1)[:, :tile]


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


def _positions(tile, row_block, col_block):
  """Absolute (query, key) positions of a tile."""
  row = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 1)
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
    keep = hash_dropout.keep_mask(seed, stream, rows, cols, length, rate)
    p = jnp.where(keep, p * hash_dropout.keep_scale(rate), 0.0)
  acc_scratch[...] = correction * acc_scratch[...] + _dot(p.astype(v_ref.dtype), v_ref[...])
  m_scratch[...] = jnp.broadcast_to(m_next, m_scratch.shape)
  l_scratch[...] = jnp.broadcast_to(l_next, l_scratch.shape)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    out = acc_scratch[...] / l_next
    out_ref[...] = jnp.where(query_mask_ref[...][:, :1] > 0, out, 0.0).astype(out_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(m_next + jnp.log(l_next), lse_ref.shape)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers (the custom VJP lives in flash_attention.py)


def _row_block(tile, head_dim, axis):
  """[T, d] blocks of q/k/v-shaped arrays, indexed by grid axis 2 or 3."""
  return pl.BlockSpec((None, None, tile, head_dim),
                      lambda b, h, x, y: (b, h, (x, y)[axis - 2], 0))


def _window_halves(tile, blocks, table):
  """The two [T, T] blocks of a table window. table 'c2p': rows = query block, columns start at
  block nb-1-i+j; 'p2c': rows = key block, columns start at nb-1+i-j."""
  def index(half):
    def fn(b, h, i, j):
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
                *_window_halves(tile, blocks, "c2p"),
                *_window_halves(tile, blocks, "p2c"),
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
  """(dq, dk, dv, d c2p table, d p2c table) by XLA: the dense attention of one layer, recomputed.

  The gradient of the relative shift is the opposite rotation (row a left by a lanes), which
  Mosaic does not lower (it rotates with non-negative strides whose per-row shifts stay within
  one vreg). So the backward pass recomputes this layer's attention densely, with the same
  tables and the same dropout hash, and lets XLA differentiate it: [B, n, L, L] tensors exist
  for one layer at a time, in the backward pass only, while the forward pass still saves only
  q, k, v, the context and the log-sum-exp.
  """
  del lse, delta, tile, interpret
  dense = functools.partial(_dense_attention, seed=seed, mask=mask, rate=rate)
  _, pullback = jax.vjp(dense, q, k, v, c2p, p2c)
  return pullback(d_out)


def _dense_attention(q, k, v, c2p, p2c, *, seed, mask, rate):
  """The forward kernel's function with [B, n, L, L] tensors (tables in the kernels' layout)."""
  shift = lambda table: relative_position.relative_shift(table[..., :-1].astype(jnp.float32))
  scores = (jnp.einsum("bnid,bnjd->bnij", q, k, preferred_element_type=jnp.float32)
            + shift(c2p) + jnp.swapaxes(shift(p2c), -1, -2))
  valid = mask > 0
  pair = valid[:, None, :, None] & valid[:, None, None, :]
  probs = jax.nn.softmax(jnp.where(pair, scores, common.NEG), axis=-1)
  probs = jnp.where(pair, probs, 0.0)
  probs = hash_dropout.drop_probabilities(probs, seed[0], rate, first_batch=seed[1],
                                         first_head=seed[2], total_heads=seed[3], length=seed[4])
  return jnp.einsum("bnij,bnjd->bnid", probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(q.dtype)

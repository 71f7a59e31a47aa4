"""The fused disentangled-attention kernels for TPU (Pallas Mosaic).

Same algorithm, relative terms and dropout hash as the GPU kernels in flash_attention.py (read
that docstring first); what differs is how a tile finds its relative terms. A TPU kernel has no
per-element gather, but it has a strided lane rotation, and that is exactly the relative shift:

  The c2p entries of tile (query block i, key block j) lie in the [T, 2T] window of the
  reversed c2p table at rows i*T.., columns (nb-1-i+j)*T.. (T the tile, nb = L/T): entry
  (a, b) sits at window column (T-1-a) + b. Rotating row a right by a lanes
  (`pltpu.roll(..., stride=1)`), then every row left by T-1, moves it to column b, and the
  first T columns are the tile. The p2c window (rows j, columns (nb-1+i-j)*T..) gives the
  transposed tile the same way.

No table exists in HBM: a window is the tile's query block (for p2c, its key block) times the
two aligned [T, d] blocks of distance rows it spans, a [T, d] x [d, 2T] matmul per table in
VMEM. That is 8 T^2 d extra MXU FLOPs per tile, against writing two [B, n, L, 2L] tables per
layer (in the forward pass and again in the backward recomputation) and reading two [T, T]
halves of both per tile in each of the three kernels. The forward grid is (batch, head, query
block, key block) with the last axis sequential ("arbitrary"), as in jax's own Pallas TPU flash
attention; the backward grid puts the head first and only it is parallel (see `backward`).
Tiles are at least 128.

The backward pass is two kernels, as on GPU (dQ and the c2p gradient per query block; dK, dV
and the p2c gradient per key block). A tile's table gradient is the adjoint of the relative
shift: row a rotated *left* by a lanes, which Mosaic refuses (a deviceless libtpu compile
rejected stride 2T-1: its strided rotations must keep the per-row shifts within one vreg).
Reversing the tile's columns first, by a matmul with the anti-identity, turns it into the
forward's rotation (row a right by a); the gradient then comes out with its distance axis
reversed (GRADIENT_LAYOUT). Each row strip of a table gradient stays in VMEM until its last
tile is added, and is then multiplied into dQ (or dK) and into the gradient of the distance
rows (taken in the GRADIENT_LAYOUT order), so no table gradient reaches HBM either. Verified
on CPU in the Pallas interpreter and compiled by libtpu for a v5p target without a TPU
(experiments/tpu_aot_check.py); not yet run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from deberta_jax.models.kernels import MASKED_SCORE
from deberta_jax.models import hash_dropout

_LANES = 128  # per-row statistics are kept replicated over one vreg row of lanes

# The backward kernels build each table's gradient with its distance axis in the opposite order
# to the table's (c2p in distance order, p2c reversed): the layouts that need only non-negative
# rotation strides. They fold it against distance rows taken in that same order, which
# flash_attention._fused_bwd passes them.
GRADIENT_LAYOUT = {"c2p_reversed": False, "p2c_reversed": True}
# The kernels compute each tile's table windows from the [n, 2L, d] distance rows.
RELATIVE_OPERANDS = "distance_rows"


def _unskew(window, tile):
  """[T, 2T] window -> [T, T] tile with tile[a, b] = window[a, T-1-a+b].

  Two rotations Mosaic supports: row a right by a lanes (shift 0, stride 1; the per-row shifts
  must stay below one vreg's 128 lanes, so a nonzero base shift or a larger stride is refused),
  then every row right by T+1, i.e. left by T-1 modulo 2T.
  """
  rolled = pltpu.roll(window, 0, 1, stride=1, stride_axis=0)
  return pltpu.roll(rolled, tile + 1, 1)[:, :tile]


def _window(x, lo_ref, hi_ref):
  """[T, 2T] table window x @ rows^T from two [T, d] blocks of distance rows, on the MXU.

  Rounded to the compute dtype, as XLA stores the GPU kernels' tables, so both kernel sets add
  the same relative terms. Computing it here costs 8 T^2 d FLOPs per tile and both tables; a
  [B, n, L, 2L] table in HBM would cost writing it and reading two [T, T] halves per tile.
  """
  rows = jnp.concatenate([lo_ref[...], hi_ref[...]], axis=0)
  return _dot_nt(x, rows).astype(x.dtype).astype(jnp.float32)


def _dot_nt(a, b):
  """a @ b.T with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _stream(seed_ref, batch_axis):
  """(seed, hash stream of this (batch row, head), unpadded length); the backward kernels' grid
  has the head first (`backward`), the forward's the batch row."""
  seed = seed_ref[0].astype(jnp.uint32)
  b = pl.program_id(batch_axis) * seed_ref[5] + seed_ref[1]  # the global row (RowLayout)
  h = pl.program_id(1 - batch_axis) + seed_ref[2]
  return seed, b * seed_ref[3] + h, seed_ref[4]


def _positions(tile, row_block, col_block):
  """Absolute (query, key) positions of a tile."""
  row = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 1)
  return row_block * tile + row, col_block * tile + col


def _scores(q_ref, k_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, key_mask_ref, tile):
  """The [T, T] score tile: c2c plus both relative terms, masked keys at NEG. c2p_*: blocks of
  the reversed key-position rows (their window against the query tile is the c2p window);
  p2c_*: blocks of the query-position rows (against the key tile)."""
  q, k = q_ref[...], k_ref[...]
  s = (_dot_nt(q, k) + _unskew(_window(q, c2p_lo, c2p_hi), tile)
       + _unskew(_window(k, p2c_lo, p2c_hi), tile).T)
  return jnp.where(key_mask_ref[...] > 0, s, MASKED_SCORE)


def _reversal(tile, dtype):
  """The [T, T] anti-identity: x @ J reverses the columns of x (Mosaic lowers no lax.rev)."""
  row = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (tile, tile), 1)
  return (row + col == tile - 1).astype(dtype)


def _skew_gradient(grad, tile, dtype):
  """[T, T] tile gradient -> [T, 2T] float32 window with window[a, a + b] = grad[a, T-1-b].

  The adjoint of `_unskew` would rotate row a left by a lanes, which Mosaic refuses. Reversing
  the tile's columns first (a permutation matmul) turns it into row a right by a, the rotation
  the forward pass uses; the kernels then write the gradient in a table layout whose distance
  axis runs the other way (GRADIENT_LAYOUT). The gradient is rounded to the table's dtype
  first, as the GPU kernels store it; each output then is one product with 1, so a single
  bfloat16 pass is exact (float32 tables take the exact multi-pass product).
  """
  precision = (jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
               else jax.lax.Precision.DEFAULT)
  flipped = jax.lax.dot_general(grad.astype(dtype), _reversal(tile, dtype),
                                (((1,), (0,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32)
  padded = jnp.concatenate([flipped, jnp.zeros_like(flipped)], axis=1)
  return pltpu.roll(padded, 0, 1, stride=1, stride_axis=0)


def _accumulate(strip_ref, window, first_block, tile):
  """Adds a [T, 2T] window to the row strip kept as [2L / T, T, T] blocks, at block
  `first_block` (block-aligned, so the dynamic index is on the leading axis)."""
  strip_ref[first_block] = strip_ref[first_block] + window[:, :tile]
  strip_ref[first_block + 1] = strip_ref[first_block + 1] + window[:, tile:]


def _zero(*refs):
  for ref in refs:
    ref[...] = jnp.zeros(ref.shape, ref.dtype)


def _fold_strip(strip_ref, rows_ref, x, dtype):
  """The table VJP of one finished row strip, in VMEM: (the strip times the [2L, d] distance
  rows, the [T, d] gradient of the strip's query or key rows; the strip's transpose times those
  rows x, the [2L, d] gradient of the distance rows from this tile row). The strip is rounded to
  the compute dtype first, as a table gradient written to HBM would be."""
  tile = strip_ref.shape[-1]
  grad_x = jnp.zeros((tile, x.shape[-1]), jnp.float32)
  grad_rows = []
  for block in range(strip_ref.shape[0]):
    piece = strip_ref[block].astype(dtype)
    grad_x += _dot(piece, rows_ref[block * tile:(block + 1) * tile, :])
    grad_rows.append(_dot(piece.T, x))
  return grad_x, jnp.concatenate(grad_rows, axis=0)


def _kept_and_score_gradient(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi,
                             key_mask_ref, do_ref, lse_ref, delta_ref, i, j, tile, rate):
  """(dropped-out probabilities, score gradient) of tile (query block i, key block j),
  recomputed from the log-sum-exp; delta = rowsum(out * d_out) as in FlashAttention-2."""
  s = _scores(q_ref, k_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, key_mask_ref, tile)
  p = jnp.where(key_mask_ref[...] > 0, jnp.exp(s - lse_ref[...][:, :1]), 0.0)
  dp = _dot_nt(do_ref[...], v_ref[...])
  kept = p
  if rate > 0.0:
    seed, stream, length = _stream(seed_ref, batch_axis=1)
    rows, cols = _positions(tile, i, j)
    keep = hash_dropout.keep_mask(seed, stream, rows, cols, length, rate)
    kept = jnp.where(keep, p * hash_dropout.keep_scale(rate), 0.0)
    dp = jnp.where(keep, dp * hash_dropout.keep_scale(rate), 0.0)
  return kept, p * (dp - delta_ref[...][:, :1])


# ----------------------------------------------------------------------------------------------
# Kernels


def _forward_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, key_mask_ref,
                    query_mask_ref, out_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *,
                    tile, rate):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_scratch[...] = jnp.full(m_scratch.shape, MASKED_SCORE, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  s = _scores(q_ref, k_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, key_mask_ref, tile)
  m_prev, l_prev = m_scratch[...][:, :1], l_scratch[...][:, :1]
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  correction = jnp.exp(m_prev - m_next)
  p = jnp.exp(s - m_next)
  l_next = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
  if rate > 0.0:
    seed, stream, length = _stream(seed_ref, batch_axis=0)
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


def _dq_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, kr_grad_rows,
               qr_grad_rows, key_mask_ref, do_ref, lse_ref, delta_ref, dq_ref, dkr_ref,
               dq_scratch, strip_scratch, *, tile, rate):
  """Query block i over key blocks j: dQ, with the c2p term's share, and this head's gradient
  of the key-position rows, accumulated over the batch and i. Row strip i of the c2p table's
  gradient (distance order: entry (a, (L-1) + i - j) takes the score gradient of exactly one
  pair) is folded into both in VMEM and never written."""
  del qr_grad_rows
  i, j = pl.program_id(2), pl.program_id(3)
  blocks = pl.num_programs(3)

  pl.when(j == 0)(lambda: _zero(dq_scratch, strip_scratch))
  pl.when((pl.program_id(1) == 0) & (i == 0) & (j == 0))(lambda: _zero(dkr_ref))

  _, ds = _kept_and_score_gradient(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi,
                                   key_mask_ref, do_ref, lse_ref, delta_ref, i, j, tile, rate)
  dq_scratch[...] += _dot(ds.astype(k_ref.dtype), k_ref[...])
  _accumulate(strip_scratch, _skew_gradient(ds, tile, q_ref.dtype), blocks - 1 + i - j, tile)

  @pl.when(j == blocks - 1)
  def _():
    dq_rel, dkr = _fold_strip(strip_scratch, kr_grad_rows, q_ref[...], q_ref.dtype)
    dq_ref[...] = (dq_scratch[...] + dq_rel).astype(dq_ref.dtype)
    dkr_ref[...] += dkr


def _dkv_kernel(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo, p2c_hi, kr_grad_rows,
                qr_grad_rows, key_mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dqr_ref,
                dk_scratch, dv_scratch, strip_scratch, *, tile, rate):
  """Key block j over query blocks i: dK, with the p2c term's share, dV, and this head's
  gradient of the query-position rows, accumulated over the batch and j. Row strip j of the
  p2c table's gradient (reversed distance order) is folded into both in VMEM and never
  written."""
  del kr_grad_rows
  j, i = pl.program_id(2), pl.program_id(3)
  blocks = pl.num_programs(3)

  pl.when(i == 0)(lambda: _zero(dk_scratch, dv_scratch, strip_scratch))
  pl.when((pl.program_id(1) == 0) & (j == 0) & (i == 0))(lambda: _zero(dqr_ref))

  kept, ds = _kept_and_score_gradient(seed_ref, q_ref, k_ref, v_ref, c2p_lo, c2p_hi, p2c_lo,
                                      p2c_hi, key_mask_ref, do_ref, lse_ref, delta_ref, i, j,
                                      tile, rate)
  ds_t = ds.T
  dv_scratch[...] += _dot(kept.T.astype(do_ref.dtype), do_ref[...])
  dk_scratch[...] += _dot(ds_t.astype(q_ref.dtype), q_ref[...])
  _accumulate(strip_scratch, _skew_gradient(ds_t, tile, k_ref.dtype), blocks - 1 - i + j, tile)

  @pl.when(i == blocks - 1)
  def _():
    dk_rel, dqr = _fold_strip(strip_scratch, qr_grad_rows, k_ref[...], k_ref.dtype)
    dk_ref[...] = (dk_scratch[...] + dk_rel).astype(dk_ref.dtype)
    dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)
    dqr_ref[...] += dqr


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers (the custom VJP lives in flash_attention.py)


def _row_block(tile, head_dim, axis):
  """[T, d] blocks of q/k/v-shaped arrays, indexed by grid axis 2 or 3."""
  return pl.BlockSpec((None, None, tile, head_dim),
                      lambda b, h, x, y: (b, h, (x, y)[axis - 2], 0))


def _window_index(blocks, table, half, query_axis):
  """Index map of the [T, d] block of distance rows behind one half of a table window, for tile
  (query block i, key block j), the query block on grid axis `query_axis`. The c2p window
  (rows = query block) starts at column block nb-1-i+j, the p2c window (rows = key block) at
  nb-1+i-j; the rows are shared by every sequence of the batch."""
  def index(b, h, x, y):
    del b
    i, j = (x, y) if query_axis == 2 else (y, x)
    if table == "c2p":
      return h, blocks - 1 - i + j + half, 0
    return h, blocks - 1 + i - j + half, 0
  return index


def _window_halves(tile, head_dim, blocks, table, query_axis=2):
  return [pl.BlockSpec((None, tile, head_dim), _window_index(blocks, table, half, query_axis))
          for half in (0, 1)]


def _key_mask_index(key_axis):
  return lambda b, h, x, y: (b, 0, (x, y)[key_axis - 2])


def _stat_column(tile, axis):
  return pl.BlockSpec((None, None, tile, _LANES), lambda b, h, x, y: (b, h, (x, y)[axis - 2], 0))


def _params(operands, broadcasts, semantics=("parallel", "parallel", "parallel", "arbitrary")):
  """Compiler parameters of a kernel whose last `broadcasts` operands are lane broadcasts (the
  query mask, the log-sum-exp and delta as [.., L, 128]): XLA may fuse their producers into the
  kernel's reads, so the 128x copies are never written to HBM (at base, 32 sequences per chip,
  each is 96 MiB per layer pass)."""
  fusible = [False] * (operands - broadcasts) + [True] * broadcasts
  return pltpu.CompilerParams(dimension_semantics=semantics, allow_input_fusion=fusible)


def _smem():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def _head_first(spec):
  """`spec` on the backward kernels' (head, batch, x, y) grid; index maps are written for
  (batch, head, x, y) like the forward's."""
  if spec.index_map is None:
    return spec
  return dataclasses.replace(spec, index_map=lambda h, b, x, y: spec.index_map(b, h, x, y))


def kernel_costs(batch, heads, length, head_dim, tile, width, dtype):
  """{'forward' | 'dq' | 'dkv': pl.CostEstimate}: what each kernel executes and moves.

  XLA cannot see into a custom call: these figures are all its cost model knows of a kernel,
  both for its scheduler (which places FSDP's all-gathers and reduce-scatters to overlap
  compute) and for the compiled step's cost analysis, which otherwise leaves attention out.
  Counted per (batch, head), with A = L^2 score entries: every kernel computes its score tiles,
  Q K^T and both [T, 2T] table windows (2 A d + 8 A d FLOPs); the forward adds P V (2 A d); dq
  adds dP and dQ (4 A d), dkv dV, dP and dK (6 A d); both backward kernels add the
  anti-identity matmul of every tile's table gradient (2 A T) and the fold of their [T, 2L]
  strips into dQ or dK and the rows' gradient (8 A d). One exp per score entry in each kernel.
  Bytes follow the pipeline: a block whose index does not change along the sequential axes is
  fetched once, the others once per step; each tile reads four [T, d] blocks of distance rows.
  The backward kernels read the [2L, d] rows and write the rows' gradient once per head.
  """
  pairs = batch * heads
  blocks = length // tile
  area = length * length
  itemsize = jnp.dtype(dtype).itemsize
  rows = length * head_dim * itemsize                      # one q/k/v-shaped operand, one (b, h)
  windows = blocks * blocks * 4 * tile * head_dim * itemsize
  # Both rows read, one gradient written: once per head, so per (b, h) a batch's share.
  all_rows = (2 * width * head_dim * itemsize + width * head_dim * 4) / batch
  stats = length * _LANES * 4                              # lse or delta, broadcast over lanes
  scores = 10 * area * head_dim
  backward_extra = 2 * area * tile + 8 * area * head_dim

  def cost(flops, moved):
    return pl.CostEstimate(flops=int(pairs * flops), transcendentals=int(pairs * area),
                           bytes_accessed=int(pairs * moved))

  return {
      # q once; k, v per query block; out and lse written once.
      "forward": cost(scores + 2 * area * head_dim, rows * (2 + 2 * blocks) + windows + stats),
      # q, d_out, lse, delta once; k, v per query block; dq written once.
      "dq": cost(scores + 4 * area * head_dim + backward_extra,
                 rows * (3 + 2 * blocks) + windows + 2 * stats + all_rows),
      # k, v once; q, d_out, lse, delta per key block; dk, dv written once.
      "dkv": cost(scores + 6 * area * head_dim + backward_extra,
                  rows * (4 + 2 * blocks) + windows + 2 * stats * blocks + all_rows),
  }


def forward(seed, q, k, v, kr_rows, qr_rows, mask, *, rate, tile, interpret):
  """(context [B, n, L, d], log-sum-exp [B, n, L]). kr_rows (reversed) and qr_rows: the
  [n, 2L, d] distance rows (`flash_attention.relative_operands`), not the tables."""
  batch, heads, length, head_dim = q.shape
  blocks = length // tile
  key_mask = mask[:, None, :]                                          # [B, 1, L]
  query_mask = jnp.broadcast_to(mask[:, :, None], (batch, length, _LANES))
  costs = kernel_costs(batch, heads, length, head_dim, tile, kr_rows.shape[1], q.dtype)
  operands = (seed, q, k, v, kr_rows, kr_rows, qr_rows, qr_rows, key_mask, query_mask)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, tile=tile, rate=rate),
      grid=(batch, heads, blocks, blocks),
      in_specs=[_smem(), _row_block(tile, head_dim, 2), _row_block(tile, head_dim, 3),
                _row_block(tile, head_dim, 3),
                *_window_halves(tile, head_dim, blocks, "c2p"),
                *_window_halves(tile, head_dim, blocks, "p2c"),
                pl.BlockSpec((None, 1, tile), _key_mask_index(3)),
                pl.BlockSpec((None, tile, _LANES), lambda b, h, i, j: (b, i, 0))],
      out_specs=[_row_block(tile, head_dim, 2), _stat_column(tile, 2)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length, _LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((tile, _LANES), jnp.float32),
                      pltpu.VMEM((tile, _LANES), jnp.float32),
                      pltpu.VMEM((tile, head_dim), jnp.float32)],
      compiler_params=_params(len(operands), broadcasts=1),
      cost_estimate=costs["forward"],
      interpret=interpret,
      name="disentangled_attention_forward_tpu",
  )(*operands)
  return out, lse[..., 0]


def backward(seed, q, k, v, kr_rows, qr_rows, kr_grad_rows, qr_grad_rows, mask, lse, d_out,
             delta, *, rate, tile, interpret):
  """(dq, dk, dv, d kr_grad_rows, d qr_grad_rows): the relative terms' shares of dq and dk
  included, the rows' gradients [n, 2L, d] in float32. d_out already zero on pad query rows.

  kr_grad_rows / qr_grad_rows: the distance rows in the order the table gradients come out in
  (GRADIENT_LAYOUT), against which the kernels fold them. Two kernels recompute the score tiles
  from the log-sum-exp, as on GPU: one per query block accumulates dQ and its row strip of the
  c2p table's gradient over the key blocks, one per key block dK, dV and its strip of the p2c
  table's gradient over the query blocks. A strip lives in VMEM until its last tile is added;
  then the kernel multiplies it into dQ or dK and into the rows' gradient. That gradient is
  accumulated in VMEM over the whole batch, so the grid is (head, batch, x, y) with only the
  head axis parallel: one [n, 2L, d] result instead of a [B, n, 2L, d] one for XLA to sum
  (2 x 96 MiB written and read back per layer pass at base, 32 sequences per chip). No table
  gradient reaches HBM.
  """
  batch, heads, length, head_dim = q.shape
  blocks = length // tile
  width = kr_rows.shape[1]
  costs = kernel_costs(batch, heads, length, head_dim, tile, width, q.dtype)
  key_mask = mask[:, None, :]
  column = lambda x: jnp.broadcast_to(x[..., None], x.shape + (_LANES,))
  operands = (seed, q, k, v, kr_rows, kr_rows, qr_rows, qr_rows, kr_grad_rows, qr_grad_rows,
              key_mask, d_out, column(lse), column(delta))
  all_rows = pl.BlockSpec((None, width, head_dim), lambda b, h, x, y: (h, 0, 0))

  def in_specs(query_axis, key_axis):
    row = lambda axis: _row_block(tile, head_dim, axis)
    stat = _stat_column(tile, query_axis)
    return [_head_first(spec) for spec in (
        _smem(), row(query_axis), row(key_axis), row(key_axis),
        *_window_halves(tile, head_dim, blocks, "c2p", query_axis),
        *_window_halves(tile, head_dim, blocks, "p2c", query_axis), all_rows, all_rows,
        pl.BlockSpec((None, 1, tile), _key_mask_index(key_axis)), row(query_axis), stat, stat)]

  row_out = _head_first(_row_block(tile, head_dim, 2))
  rows_grad = _head_first(pl.BlockSpec((None, width, head_dim), lambda b, h, x, y: (h, 0, 0)))
  rows_grad_shape = jax.ShapeDtypeStruct((heads, width, head_dim), jnp.float32)
  strip_scratch = pltpu.VMEM((width // tile, tile, tile), jnp.float32)
  sequential = ("parallel", "arbitrary", "arbitrary", "arbitrary")
  grid = (heads, batch, blocks, blocks)
  dq, dkr = pl.pallas_call(
      functools.partial(_dq_kernel, tile=tile, rate=rate),
      grid=grid,
      in_specs=in_specs(2, 3),
      out_specs=[row_out, rows_grad],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), rows_grad_shape],
      scratch_shapes=[pltpu.VMEM((tile, head_dim), jnp.float32), strip_scratch],
      compiler_params=_params(len(operands), broadcasts=2, semantics=sequential),
      cost_estimate=costs["dq"],
      interpret=interpret,
      name="disentangled_attention_dq_tpu",
  )(*operands)
  dk, dv, dqr = pl.pallas_call(
      functools.partial(_dkv_kernel, tile=tile, rate=rate),
      grid=grid,
      in_specs=in_specs(3, 2),
      out_specs=[row_out, row_out, rows_grad],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                 rows_grad_shape],
      scratch_shapes=[pltpu.VMEM((tile, head_dim), jnp.float32),
                      pltpu.VMEM((tile, head_dim), jnp.float32), strip_scratch],
      compiler_params=_params(len(operands), broadcasts=2, semantics=sequential),
      cost_estimate=costs["dkv"],
      interpret=interpret,
      name="disentangled_attention_dkv_tpu",
  )(*operands)
  return dq, dk, dv, dkr, dqr

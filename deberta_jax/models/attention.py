"""Disentangled self-attention (DeBERTa): content-to-content plus c2p and p2c relative terms.

For query i and key j with relative row r = idx(i, j) (see relative_position.py):

  A[i, j] = s * (Q_i . K_j  +  Q_i . Kr_r  +  Qr_r . K_j),       s = 1 / sqrt(3 d)

with Kr = R Wk + bk and Qr = R Wq + bq (share_att_key: the content projections, biases included,
applied to the LayerNormed, dropped-out relative table R). Both relative terms use the same index
idx(i, j), the official code's convention. Scores and softmax are float32 whatever the compute
dtype; masked probabilities are zeroed so pad rows and columns contribute exactly nothing.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from deberta_jax.models.kernels import flash_attention
from deberta_jax.models import hash_dropout
from deberta_jax.models import layers
from deberta_jax.models import relative_position
from deberta_jax.models.config import ModelConfig


def relative_terms_gather(q, k, qr, kr, idx):
  """c2p + p2c by gathering [L, R] products at idx: the reference formulation.

  q, k: [B, n, L, d] (q pre-scaled); qr (pre-scaled), kr: [R, n, d]; idx: [L, L] rows of the band.
  Returns [B, n, L, L] float32.
  """
  batch, heads, length, _ = q.shape
  c2p = jnp.einsum("bnqd,bnrd->bnqr", q, _per_sequence(kr, batch),
                   preferred_element_type=jnp.float32)
  p2c = jnp.einsum("bnrd,bnkd->bnrk", _per_sequence(qr, batch), k,
                   preferred_element_type=jnp.float32)
  index = jnp.broadcast_to(jnp.asarray(idx), (batch, heads, length, length))
  return (jnp.take_along_axis(c2p, index, axis=-1) + jnp.take_along_axis(p2c, index, axis=-2))


def relative_terms_skew(q, k, qr_by_distance, kr_by_distance):
  """c2p + p2c by the relative shift ("skew") on per-distance products: no [B, n, L, L] gather.

  Both relative terms depend on (i, j) only through the distance i - j, so the projections are
  taken for each of the 2L-1 distances (rows of the relative table gathered by distance: a tiny
  [2L-1, H] gather) and the [L, 2L-1] products are re-indexed by pad + reshape + slice.
  q, k: [B, n, L, d]; row t of *_by_distance [2L-1, n, d] holds distance t - (L-1).
  """
  batch = q.shape[0]
  # c2p[i, j] = c2p[i, (L-1) + i - j]: reversing the (small) distance axis of kr turns that into
  # reversed[i, (L-1) - i + j], the form relative_shift reads.  p2c[i, j] = p2c[j, (L-1) + i - j].
  kr_reversed = _per_sequence(jnp.flip(kr_by_distance, axis=0), batch)
  c2p = jnp.einsum("bnqd,bntd->bnqt", q, kr_reversed, preferred_element_type=jnp.float32)
  p2c = jnp.einsum("bnkd,bntd->bnkt", k, _per_sequence(qr_by_distance, batch),
                   preferred_element_type=jnp.float32)
  skew = relative_position.relative_shift
  return skew(c2p) + jnp.swapaxes(skew(p2c), -1, -2)


def _per_sequence(rel: jax.Array, batch: int) -> jax.Array:
  """[R, n, d] -> [B, n, R, d] (a broadcast, not a copy in the math).

  With the relative operand laid out like q and k, every product is a plain batched matmul over
  (batch, head) whose [B, n, L, R] result needs no transpose; with [R, n, d] as is, XLA computes
  [n, B*L, R] and then copies the largest tensor of the layer into [B, n, L, R] (forward and
  backward), which made the relative terms 2x slower on CPU.
  """
  rel = jnp.swapaxes(rel, 0, 1)
  return jnp.broadcast_to(rel[None], (batch,) + rel.shape)


class DisentangledSelfAttention(nn.Module):
  """Multi-head disentangled attention; keys/values from `hidden`, queries from `query`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, query, rel_table, mask, deterministic: bool,
               rows: hash_dropout.RowLayout | None = None):
    """`rows` places the batch in the global batch for the attention-dropout stream."""
    cfg = self.config
    rows = hash_dropout.RowLayout() if rows is None else rows
    batch, length, _ = hidden.shape
    heads, head = cfg.num_heads, cfg.head_size
    proj = lambda name: layers.dense(cfg, cfg.hidden_size, ("embed", "heads"), name)
    query_proj, key_proj, value_proj = proj("query_proj"), proj("key_proj"), proj("value_proj")

    scale = jnp.float32(1.0 / math.sqrt(head * 3))  # three score terms: c2c + c2p + p2c
    # Head-major [B, n, L, d]: every attention product is then a batched matmul over (B, n).
    split = lambda x: jnp.swapaxes(x.reshape(batch, length, heads, head), 1, 2)
    q, k, v = split(query_proj(query)), split(key_proj(hidden)), split(value_proj(hidden))
    q = layers.constrain(q, ("batch", "act_heads", "length", "kv"))
    k = layers.constrain(k, ("batch", "act_heads", "length", "kv"))

    q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
    pos_dropout = layers.Dropout(cfg.hidden_dropout, name="pos_dropout")
    buckets, max_distance = cfg.position_buckets, cfg.max_relative_distance

    def relative_by_distance():
      """(qr scaled, kr) [2L-1, n, d]: one table row per distance i - j; dropout first, so equal
      buckets share one mask."""
      rows = relative_position.distance_rows(length, buckets, max_distance)
      table = pos_dropout(rel_table, deterministic=deterministic)
      table = jnp.take(table, jnp.asarray(rows), axis=0).astype(cfg.compute_dtype)
      qr = query_proj(table).reshape(-1, heads, head)
      kr = key_proj(table).reshape(-1, heads, head)
      return (qr.astype(jnp.float32) * scale).astype(qr.dtype), kr

    if cfg.attention_impl == "flash":
      qr_scaled, kr = relative_by_distance()
      rate = 0.0 if deterministic else cfg.attention_dropout
      seed = (jax.random.bits(self.make_rng("dropout"), (), jnp.uint32) if rate > 0.0
              else jnp.zeros((), jnp.uint32))
      token_mask = jnp.diagonal(mask[:, 0], axis1=-2, axis2=-1)  # m_i, from m_i * m_j
      context = fused_context(q_scaled, k, v, qr_scaled, kr, token_mask, rate, seed,
                              cfg.flash_block, rows)
      return jnp.swapaxes(context, 1, 2).reshape(batch, length, heads * head)

    scores = jnp.einsum("bnqd,bnkd->bnqk", q_scaled, k, preferred_element_type=jnp.float32)
    if cfg.attention_impl == "skew":
      qr_scaled, kr = relative_by_distance()
      scores = scores + relative_terms_skew(q_scaled, k, qr_scaled, kr)
    else:
      # Only the band of relative rows this length can reach is projected (all of it for L >= 256).
      idx = relative_position.relative_index(length, buckets, max_distance)
      lo, hi = int(idx.min()), int(idx.max())
      # Dropout on the whole table, then the band: the mask skew and flash draw.
      table = pos_dropout(rel_table, deterministic=deterministic)
      band = jax.lax.slice_in_dim(table, lo, hi + 1, axis=0).astype(cfg.compute_dtype)
      qr = query_proj(band).reshape(-1, heads, head)
      kr = key_proj(band).reshape(-1, heads, head)
      qr_scaled = (qr.astype(jnp.float32) * scale).astype(qr.dtype)
      scores = scores + relative_terms_gather(q_scaled, k, qr_scaled, kr, idx - lo)

    probs = masked_softmax(scores, mask)
    if not deterministic and cfg.attention_dropout > 0.0:
      # The fused kernels' mask (same RNG draw as the flash branch above), not layers.Dropout.
      seed = jax.random.bits(self.make_rng("dropout"), (), jnp.uint32)
      probs = hash_dropout.drop_probabilities(probs, seed, cfg.attention_dropout, rows=rows)
    context = jnp.einsum("bnqk,bnkd->bqnd", probs.astype(cfg.compute_dtype), v)
    return context.reshape(batch, length, heads * head)


def fused_context(q, k, v, qr, kr, token_mask, rate, seed, block=64,
                  rows: hash_dropout.RowLayout | None = None):
  """The fused kernels' context [B, n, L, d], one kernel call per shard under a mesh.

  A Pallas call is opaque to XLA's partitioner, which would gather every operand onto each
  device; under shard_map each device runs the kernels on its own batch rows and heads (the
  activations' logical sharding), and its offsets keep the dropout stream global.
  """
  rows = hash_dropout.RowLayout() if rows is None else rows
  row_offset = jnp.asarray(rows.offset, jnp.int32)
  row_stride = jnp.asarray(rows.stride, jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "act_heads"))

  def divides(axes, size):  # e.g. init's batch of 1 is replicated, not split
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return size % math.prod(mesh.shape[a] for a in names) == 0

  if not mesh.empty:
    batch_axes = batch_axes if divides(batch_axes, q.shape[0]) else None
    head_axes = head_axes if divides(head_axes, q.shape[1]) else None
  spec = PartitionSpec(batch_axes, head_axes, None, None)
  total_heads = q.shape[1]
  call = lambda q, k, v, qr, kr, m, seed, shard_rows, first_head=0: (
      flash_attention.fused_attention(
          q, k, v, qr, kr, m, dropout_rate=rate, dropout_seed=seed, block=block,
          stream_offset=(shard_rows.offset, first_head), batch_stride=shard_rows.stride,
          total_heads=total_heads))
  if mesh.empty or (batch_axes is None and head_axes is None):
    return call(q, k, v, qr, kr, token_mask, seed, hash_dropout.RowLayout(row_offset, row_stride))

  def per_shard(q, k, v, qr, kr, m, seed, row_offset, row_stride):
    first_row = jax.lax.axis_index(batch_axes) * q.shape[0] if batch_axes else 0
    first_head = jax.lax.axis_index(head_axes) * q.shape[1] if head_axes else 0
    shard_rows = hash_dropout.RowLayout(row_offset, row_stride).starting_at(first_row)
    return call(q, k, v, qr, kr, m, seed, shard_rows, first_head)

  relative = PartitionSpec(None, head_axes, None)
  return jax.shard_map(
      per_shard, mesh=mesh, check_vma=False,
      in_specs=(spec, spec, spec, relative, relative, PartitionSpec(batch_axes, None),
                PartitionSpec(), PartitionSpec(), PartitionSpec()),
      out_specs=spec)(q, k, v, qr, kr, token_mask, seed, row_offset, row_stride)


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over keys in float32 with masked entries (and whole pad rows) exactly zero.

  `mask` is [B, 1, L, L] boolean (m_i * m_j). Filling with the float32 minimum instead of -inf
  keeps fully masked rows finite; zeroing afterwards reproduces the reference's XSoftmax.
  """
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  return jnp.where(mask, probs, 0.0)


def pair_mask(attention_mask: jax.Array) -> jax.Array:
  """[B, L] input mask -> [B, 1, L, L] boolean pair mask m_i * m_j."""
  m = attention_mask.astype(bool)
  return (m[:, None, :, None] & m[:, None, None, :])

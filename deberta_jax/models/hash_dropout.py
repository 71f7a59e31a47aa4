"""Dropout masks from a counter hash: every dropout in the model, inside and outside the kernels.

A keep decision is a pure function of (seed, stream, counter): one 32-bit seed per dropout site
and step (drawn from flax's 'dropout' RNG), a stream per row (the flattened leading index with
the batch row counted globally, or global batch row * heads + head for attention probabilities)
and a counter along the row. Why a hash and not `jax.random.bernoulli`: threefry spends about
twenty rounds per 32 random bits, the hash a handful of integer operations (a faster CPU step,
and XLA recomputes the mask in the backward pass instead of keeping the bits:
docs/CHANGELOG.md); the fused attention kernels must regenerate their mask in the backward pass
from positions alone, which a hash allows and a stateful generator does not; and global row
indices and positions give the same mask on every mesh and for every micro-batch split
(`RowLayout`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_DROPOUT_BITS = 23  # keep decisions compare 23 hash bits, so the threshold fits an int32


class RowLayout(NamedTuple):
  """Where the rows of the batch being computed sit in the step's global batch:
  global row = offset + stride * local row.

  Gradient accumulation runs micro-batch i of M as rows i, i+M, ... (offset i, stride M), and a
  shard_map shard starts further on. Hashing the global row instead of the local one gives every
  sequence the same dropout masks whatever the micro-batch count or the mesh, so a config trains
  the same on any hardware. Both fields may be traced int32 scalars.
  """

  offset: Any = 0
  stride: Any = 1

  def global_rows(self, count: int) -> jax.Array:
    """The global indices of local rows 0..count-1 (int32)."""
    return (jnp.asarray(self.offset, jnp.int32)
            + jnp.asarray(self.stride, jnp.int32) * jnp.arange(count, dtype=jnp.int32))

  def starting_at(self, local_row) -> "RowLayout":
    """The layout of a slice of these rows that begins at `local_row` (a shard's first row)."""
    return RowLayout(jnp.asarray(self.offset, jnp.int32)
                     + jnp.asarray(self.stride, jnp.int32) * jnp.asarray(local_row, jnp.int32),
                     self.stride)


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


def keep_mask(seed, stream, rows, cols, length, rate: float):
  """Boolean keep decisions at counter rows * length + cols of `stream` (all broadcast).

  seed: uint32 scalar; stream: int32 (e.g. the global b * heads + h); length: the row length of
  the counter (for attention the unpadded sequence length, so tile padding changes nothing).
  """
  stream = _mix32(seed ^ (jnp.asarray(stream).astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))
  counter = (rows * length + cols).astype(jnp.uint32)
  bits = (_mix32(stream + counter) >> (32 - _DROPOUT_BITS)).astype(jnp.int32)
  return bits >= dropout_threshold(rate)


def keep_scale(rate: float) -> float:
  """1 / the exact (quantized) keep probability."""
  return float(1 << _DROPOUT_BITS) / float((1 << _DROPOUT_BITS) - dropout_threshold(rate))


def _apply(x, keep, rate):
  return jnp.where(keep, x * jnp.asarray(keep_scale(rate), x.dtype), jnp.zeros((), x.dtype))


def dropout(x: jax.Array, seed: jax.Array, rate: float, rows: RowLayout | None = None
            ) -> jax.Array:
  """Inverted dropout of any array: stream = the flattened index of the leading axes, counter =
  the position along the last axis. With `rows`, axis 0 is the batch and is counted by global
  row (RowLayout); without, by its local index (arrays with no batch axis)."""
  if rate <= 0.0:
    return x
  shape = x.shape or (1,)
  lead, last = shape[:-1], shape[-1]
  row = jnp.zeros((1,) * len(shape), jnp.int32)
  for axis, size in enumerate(lead):
    index = jax.lax.broadcasted_iota(jnp.int32, lead + (1,), axis)
    if axis == 0 and rows is not None:
      index = rows.global_rows(size).reshape((size,) + (1,) * len(lead))
    row = row * size + index
  col = jax.lax.broadcasted_iota(jnp.int32, (1,) * len(lead) + (last,), len(lead))
  keep = keep_mask(jnp.asarray(seed, jnp.uint32), row, 0, col, last, rate)
  return _apply(x, keep.reshape(x.shape), rate)


def drop_probabilities(probs: jax.Array, seed: jax.Array, rate: float, *,
                       rows: RowLayout | None = None, first_head=0, total_heads=None,
                       length=None) -> jax.Array:
  """Inverted dropout on [B, n, L, L] attention probabilities with the fused kernels' mask:
  stream b * heads + h (b the global row), counter i * length + j, so `skew`, `gather` and
  `flash` are interchangeable mid-run. Positions and heads are global iotas, so any mesh draws
  the single-device mask; `rows` places the batch rows in the global batch, first_head /
  total_heads a shard's heads, and `length` (default L) is the unpadded length the kernels
  count with."""
  if rate <= 0.0:
    return probs
  batch, heads, size, _ = probs.shape
  total_heads = heads if total_heads is None else total_heads
  rows = RowLayout() if rows is None else rows
  batch_head = (rows.global_rows(batch)[:, None] * total_heads
                + first_head + jnp.arange(heads, dtype=jnp.int32)[None, :])[:, :, None, None]
  positions = jnp.arange(size, dtype=jnp.int32)
  keep = keep_mask(jnp.asarray(seed, jnp.uint32), batch_head, positions[:, None],
                   positions[None, :], size if length is None else length, rate)
  return _apply(probs, keep, rate)

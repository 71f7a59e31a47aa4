"""Log-bucketed relative positions of DeBERTaV3 (reference section 1.1).

The index table is computed with numpy at trace time: sequence lengths are static under jit, so the
table becomes a compile-time constant instead of work on the device. The arithmetic is float32, as
in the official code, so bucket boundaries agree with the released checkpoints bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def log_bucket(relative: np.ndarray, buckets: int, max_distance: int) -> np.ndarray:
  """Maps signed distances to signed buckets: exact up to buckets/2, logarithmic beyond.

  Distances are first clamped to +-(max_distance-1), the official code's behaviour (HF omits the
  clamp, which only matters beyond 512 tokens). The result is odd-symmetric: b(-r) = -b(r).
  """
  relative = np.clip(np.asarray(relative, np.int64), -(max_distance - 1), max_distance - 1)
  mid = buckets // 2
  sign = np.sign(relative).astype(np.float32)
  magnitude = np.where(np.abs(relative) < mid, mid - 1, np.abs(relative)).astype(np.float32)
  ratio = np.log(magnitude / np.float32(mid)) / np.log(np.float32((max_distance - 1) / mid))
  log_pos = np.ceil(ratio * np.float32(mid - 1)).astype(np.float32) + np.float32(mid)
  bucketed = np.where(magnitude <= mid, relative.astype(np.float32), log_pos * sign)
  return bucketed.astype(np.int32)


@functools.lru_cache(maxsize=32)
def relative_index(length: int, buckets: int, max_distance: int) -> np.ndarray:
  """idx[i, j] = clamp(b(i - j) + S, 0, 2S - 1): the row of the relative table query i uses for key j."""
  positions = np.arange(length)
  rel = log_bucket(positions[:, None] - positions[None, :], buckets, max_distance)
  idx = np.clip(rel + buckets, 0, 2 * buckets - 1).astype(np.int32)
  idx.setflags(write=False)
  return idx


def used_rows(length: int, buckets: int, max_distance: int) -> tuple[int, int]:
  """The [first, last] rows of the 2S-row relative table that a sequence of `length` can touch.

  Short sequences use only a band of the table; projecting just that band saves work and memory
  without changing a single score.
  """
  idx = relative_index(length, buckets, max_distance)
  return int(idx.min()), int(idx.max())


@functools.lru_cache(maxsize=32)
def distance_rows(length: int, buckets: int, max_distance: int) -> np.ndarray:
  """rows[t] = the relative-table row of distance t - (L-1), t in [0, 2L-1).

  idx(i, j) == rows[(i - j) + L - 1]: the relative terms depend on i - j only, which is what lets
  the skew formulation replace the [L, L] gather by per-distance products.
  """
  distances = np.arange(-(length - 1), length)
  rows = np.clip(log_bucket(distances, buckets, max_distance) + buckets, 0, 2 * buckets - 1)
  rows = rows.astype(np.int32)
  rows.setflags(write=False)
  return rows


def relative_shift(y: jax.Array) -> jax.Array:
  """out[a, b] = y[a, b + (L-1) - a] for y [..., L, 2L-1]: pad one column, flatten, re-cut.

  Turns per-distance products (row a, one column per distance) into the [L, L] pair layout
  without a gather: the skew attention form uses it.
  """
  *lead, length, width = y.shape
  padded = jnp.pad(y, [(0, 0)] * len(lead) + [(0, 0), (0, 1)])
  flat = padded.reshape(*lead, length * (width + 1))
  flat = jax.lax.slice_in_dim(flat, length - 1, length - 1 + length * width, axis=-1)
  return flat.reshape(*lead, length, width)[..., :length]

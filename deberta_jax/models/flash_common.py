"""Pieces shared by the GPU and TPU fused-attention kernels and their plain-jnp reference.

The dropout mask is a pure function of (seed, batch * heads + head, i, j): the kernels rebuild it
in the backward pass instead of storing it, and the tests rebuild it outside any kernel.
"""

from __future__ import annotations

import jax.numpy as jnp

# A finite "minus infinity" for masked scores: exp(NEG - m) underflows to exactly 0 for any
# real row maximum m, and NEG - NEG = 0 keeps fully masked rows finite.
NEG = -1e30
_DROPOUT_BITS = 23  # keep decisions compare 23 hash bits, so the threshold fits an int32


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

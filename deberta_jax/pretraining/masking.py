"""MLM masking and replaced-token sampling, as pure functions of explicit RNG keys.

Masking follows the paper (appendix A.4): 15% of the non-special tokens of each sequence, chosen
uniformly without replacement, all replaced by [MASK]. Positions are returned as a fixed-size
[B, K] list (K = ceil(mask_prob * L)) with a weight per slot, so the 128k-way LM head runs on
masked positions only and every shape stays static under jit.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from deberta_jax.models import vocab_blocks


class MaskedBatch(NamedTuple):
  input_ids: jax.Array   # [B, L] with [MASK] at the selected positions
  positions: jax.Array   # [B, K] int32 selected positions (0 in unused slots)
  labels: jax.Array      # [B, K] original ids at the selected positions
  weights: jax.Array     # [B, K] float32, 1 for used slots


def max_predictions(seq_len: int, mask_prob: float) -> int:
  """Slots per sequence: enough for round(mask_prob * candidates) at any candidate count."""
  return max(1, math.ceil(mask_prob * seq_len))


def mask_tokens(rng: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                special_ids: Sequence[int], mask_id: int, mask_prob: float) -> MaskedBatch:
  """Masks round(mask_prob * n) of the n candidate tokens of every row, uniformly at random.

  Candidates are non-pad tokens that are not special ([CLS], [SEP], [UNK], [MASK], [PAD]), as in
  the reference; a row with at least one candidate gets at least one mask.
  """
  input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
  batch, length = input_ids.shape
  slots = max_predictions(length, mask_prob)
  candidate = attention_mask.astype(bool)
  for special in special_ids:
    candidate &= input_ids != special
  count = candidate.sum(-1)
  n_mask = jnp.clip(jnp.round(mask_prob * count), jnp.minimum(count, 1), slots).astype(jnp.int32)
  # Random keys for candidates, -1 for the rest: the top-k keys are a uniform random subset.
  keys = jnp.where(candidate, jax.random.uniform(rng, (batch, length)), -1.0)
  _, positions = jax.lax.top_k(keys, slots)
  weights = (jnp.arange(slots)[None, :] < n_mask[:, None])
  positions = jnp.where(weights, positions, 0).astype(jnp.int32)
  labels = jnp.take_along_axis(input_ids, positions, axis=1)
  rows = jnp.arange(batch)[:, None]
  selected = jnp.zeros((batch, length), bool).at[rows, positions].max(weights)
  masked = jnp.where(selected, mask_id, input_ids)
  return MaskedBatch(masked.astype(input_ids.dtype), positions, labels,
                     weights.astype(jnp.float32))


def sample_replacements(rng: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
  """One categorical sample per row of `logits` [..., V] from softmax(logits / T), no gradient.

  The flat-vocabulary form of `sample_from_blocks` (same draw for the same key and logits).
  """
  return sample_from_blocks(rng, vocab_blocks.to_blocks(logits, vocab_blocks.NEVER), temperature)


def sample_from_blocks(rng: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
  """One categorical sample per masked slot from softmax(logits / T), with no gradient.

  `logits` are [..., blocks, VOCAB_BLOCK] (vocab_blocks.py); returns vocabulary ids [...].
  Sampling (not argmax) over the full vocabulary, as the official code does; padded vocabulary
  entries carry the float32 minimum as logit and are never drawn.

  Inverse-CDF sampling with one uniform per slot, instead of jax.random.categorical's Gumbel-max,
  which draws a random number and two logarithms for every (slot, vocabulary entry): over a
  128k vocabulary that noise was the costliest part of the step outside the networks on CPU.
  Here the per-entry work is one exp, as in a softmax. The cumulative sums are two-level (over
  the blocks, then inside the chosen one) and taken as triangular matmuls at full float32
  precision, so no long sequential scan is needed on any backend.
  """
  logits = jax.lax.stop_gradient(logits).astype(jnp.float32) / temperature
  *lead, _, block = logits.shape
  top = jnp.max(logits, axis=(-2, -1), keepdims=True)
  weights = jnp.exp(logits - top)                                   # max entry: weight 1
  block_mass = weights.sum(-1)                                      # [..., blocks]
  block_cdf = _inclusive_cumsum(block_mass)
  target = jax.random.uniform(rng, tuple(lead), jnp.float32) * block_cdf[..., -1]
  # The chosen entry is the first whose inclusive CDF exceeds the target. Counting instead of
  # searching keeps it vectorized; the upper clips only guard float ties at the very top and
  # never land on an entry of zero weight (the last positive block / entry is the bound).
  last_block = _last_positive(block_mass)
  chosen_block = jnp.minimum(jnp.sum(block_cdf <= target[..., None], -1), last_block)
  below = jnp.take_along_axis(block_cdf - block_mass, chosen_block[..., None], -1)[..., 0]
  # The chosen block's weights as a masked sum over blocks, not a gather: a gather made XLA copy
  # the whole [.., blocks, block] array into another TPU layout first (1.26 GB at base).
  is_chosen = jnp.arange(weights.shape[-2])[:, None] == chosen_block[..., None, None]
  inside = jnp.sum(jnp.where(is_chosen, weights, 0.0), axis=-2)
  inside_cdf = _inclusive_cumsum(inside)
  # Clamped at 0: rounding may put the target a hair below the block's start, and a target of 0
  # still skips the block's leading zero-weight entries (their CDF is 0 too).
  within = jnp.maximum(target - below, 0.0)
  offset = jnp.minimum(jnp.sum(inside_cdf <= within[..., None], -1), _last_positive(inside))
  return (chosen_block * block + offset).astype(jnp.int32)


def _inclusive_cumsum(x: jax.Array) -> jax.Array:
  """Cumulative sum over the last axis as a matmul with an upper-triangular ones matrix."""
  n = x.shape[-1]
  upper = jnp.triu(jnp.ones((n, n), jnp.float32))
  return jnp.matmul(x, upper, precision=jax.lax.Precision.HIGHEST)


def _last_positive(x: jax.Array) -> jax.Array:
  """Index of the last positive entry along the last axis (0 if none)."""
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(x > 0, index, 0), axis=-1)


def replace_tokens(input_ids: jax.Array, positions: jax.Array, weights: jax.Array,
                   sampled: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The discriminator's input and labels: sampled tokens put back; "replaced" where they differ.

  A slot where the generator sampled the original token is labelled 0 (original), like the
  reference and ELECTRA.
  """
  input_ids = jnp.asarray(input_ids)
  rows = jnp.arange(input_ids.shape[0])[:, None]
  original = jnp.take_along_axis(input_ids, positions, axis=1)
  values = jnp.where(weights > 0, sampled, original)
  replaced = input_ids.at[rows, positions].set(values.astype(input_ids.dtype))
  return replaced, (replaced != input_ids)

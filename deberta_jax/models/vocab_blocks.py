"""The generator's vocabulary axis laid out as [blocks, VOCAB_BLOCK] instead of one flat axis.

The masked-slot logits ([B, K, V] float32, 1.26 GB per 32 sequences at the paper's 128k
vocabulary) are the largest activation of a base step. The sampler needs them in blocks (its
two-level inverse CDF sums each block, then searches one), and splitting the last axis of an
existing array is not free on TPU: the tiled layout of [.., V] is not that of [.., V/128, 128],
so XLA inserted a padded copy and a relayout copy of the whole array (three 1.26 GB buffers live
at once). On TPU the LM head therefore splits the word-embedding table's row axis instead (a
bitcast) and the matmul writes this layout itself; on row-major backends (CPU, GPU) splitting the
logits' last axis is itself free (models/heads.py). The loss and the accuracy read the same
blocked array (losses.mlm_sums), so no full-vocabulary array is ever copied.

Vocabulary id t is entry (t // VOCAB_BLOCK, t % VOCAB_BLOCK). Padding up to a whole number of
blocks (needed only when the padded vocabulary is not a multiple of 128) uses the float32
minimum as logit, so it is never sampled, never the argmax and adds nothing to a softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# One TPU lane width; the default `model.vocab_pad_multiple` (128) makes it divide the table.
VOCAB_BLOCK = 128

# The logit of a vocabulary entry that does not exist.
NEVER = float(jnp.finfo(jnp.float32).min)


def num_blocks(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_BLOCK)


def to_blocks(x: jax.Array, fill: float, axis: int = -1) -> jax.Array:
  """Splits `axis` (the vocabulary) into [blocks, VOCAB_BLOCK], padding it with `fill`."""
  axis = axis % x.ndim
  vocab = x.shape[axis]
  extra = num_blocks(vocab) * VOCAB_BLOCK - vocab
  if extra:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    x = jnp.pad(x, pad, constant_values=fill)
  return x.reshape(x.shape[:axis] + (num_blocks(vocab), VOCAB_BLOCK) + x.shape[axis + 1:])


def token_ids(blocks: int) -> jax.Array:
  """[blocks, VOCAB_BLOCK] int32: the vocabulary id of every entry."""
  return (jnp.arange(blocks, dtype=jnp.int32)[:, None] * VOCAB_BLOCK
          + jnp.arange(VOCAB_BLOCK, dtype=jnp.int32)[None, :])

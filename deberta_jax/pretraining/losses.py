"""Loss sums and counts for MLM and RTD.

Each function returns sums with an explicit denominator so that gradient accumulation and data
parallelism give exactly the token mean of one big batch (the reference averages per-rank means).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from deberta_jax.models import vocab_blocks


def mlm_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict:
  """Cross-entropy over masked slots: {'mlm_loss_sum', 'mlm_correct', 'mlm_count'}.

  `logits` are [..., blocks, VOCAB_BLOCK] (vocab_blocks.py), the generator's training layout;
  `labels` are vocabulary ids. Everything is a reduction or an elementwise select over that array
  (no gather, no reshape), so XLA fuses the loss, the accuracy and the loss's gradient
  (softmax minus one-hot) into passes over the logits instead of materialising copies of them.
  """
  logits = logits.astype(jnp.float32)
  vocab = (-2, -1)
  ids = vocab_blocks.token_ids(logits.shape[-2])
  top = jnp.max(logits, axis=vocab, keepdims=True)
  shifted = logits - jax.lax.stop_gradient(top)
  log_normalizer = jnp.log(jnp.sum(jnp.exp(shifted), axis=vocab))
  label_logit = jnp.sum(jnp.where(ids == labels[..., None, None], shifted, 0.0), axis=vocab)
  loss = log_normalizer - label_logit
  # argmax == label, with argmax's rule for ties (the smallest id among the maxima).
  first_max = jnp.min(jnp.where(logits == top, ids, jnp.iinfo(jnp.int32).max), axis=vocab)
  correct = (first_max == labels).astype(jnp.float32)
  return {
      "mlm_loss_sum": jnp.sum(loss * weights),
      "mlm_correct": jnp.sum(correct * weights),
      "mlm_count": jnp.sum(weights),
  }


def rtd_sums(logits: jax.Array, replaced: jax.Array, attention_mask: jax.Array) -> dict:
  """Sigmoid BCE over every non-pad token ([CLS]/[SEP] included, always label 0)."""
  logits = logits.astype(jnp.float32)
  labels = replaced.astype(jnp.float32)
  weights = attention_mask.astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, labels)
  correct = ((logits > 0) == replaced).astype(jnp.float32)
  return {
      "rtd_loss_sum": jnp.sum(loss * weights),
      "rtd_correct": jnp.sum(correct * weights),
      "rtd_count": jnp.sum(weights),
      "replaced_sum": jnp.sum(labels * weights),
  }

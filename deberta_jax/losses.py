"""Loss sums and counts for MLM and RTD.

Each function returns sums with an explicit denominator so that gradient accumulation and data
parallelism give exactly the token mean of one big batch (the reference averages per-rank means).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mlm_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> dict:
  """Cross-entropy over masked slots: {'mlm_loss_sum', 'mlm_correct', 'mlm_count'}."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
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

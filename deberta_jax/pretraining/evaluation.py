"""Held-out evaluation during pre-training: the training batch losses cannot show overfitting, a
broken data mix or a bad restart; losses on text never trained on can.

The held-out rows are a fixed part of the dataset (data/pipeline.py: the same on every host, for
every seed and after a resume). An evaluation reads `config.eval.num_batches` fixed batches of
them, masks and samples with fixed keys, and runs both networks with dropout off, so two
evaluations of the same parameters give the same numbers:

  eval_mlm_loss, eval_mlm_accuracy     the generator on the masked pieces
  eval_rtd_loss, eval_rtd_accuracy     the discriminator on every non-pad token of the replaced
  eval_rtd_auc                         batch (AUC of its logits: replaced vs original)
  eval_unigram_entropy                 what a model that knows only piece frequencies scores
                                       (entropy of the held-out pieces' unigram distribution)
  eval_rtd_base_loss                   what predicting the replaced fraction everywhere scores

The AUC comes from histograms of the logits (4096 bins over [-16, 16], ties counted half), which
the jitted step sums over the global batch, so it needs no per-token gather across hosts.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.pretraining import losses
from deberta_jax.pretraining import masking
from deberta_jax.pretraining import train_step as ts

AUC_BINS = 4096
AUC_RANGE = 16.0


def _histograms(logits: jax.Array, replaced: jax.Array, weights: jax.Array):
  scaled = (jnp.clip(logits.astype(jnp.float32), -AUC_RANGE, AUC_RANGE) + AUC_RANGE) / (
      2 * AUC_RANGE)
  bins = jnp.clip((scaled * AUC_BINS).astype(jnp.int32), 0, AUC_BINS - 1).reshape(-1)
  weights = weights.astype(jnp.float32).reshape(-1)
  positive = replaced.astype(jnp.float32).reshape(-1) * weights
  return (jnp.zeros(AUC_BINS).at[bins].add(positive),
          jnp.zeros(AUC_BINS).at[bins].add(weights - positive))


def auc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float:
  """P(score of a replaced token > score of an original one), ties counted half."""
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  total = positive.sum() * negative.sum()
  if total == 0:
    return float("nan")
  below = np.cumsum(negative) - negative
  return float(np.sum(positive * (below + 0.5 * negative)) / total)


def unigram_entropy(input_ids: np.ndarray, special_ids) -> float:
  """Entropy in nats of the distribution of the non-special pieces of `input_ids`."""
  ids = input_ids[~np.isin(input_ids, np.asarray(special_ids))]
  counts = np.bincount(ids.reshape(-1))
  p = counts[counts > 0] / ids.size
  return float(-(p * np.log(p)).sum())


def eval_key(seed: int, index: int) -> jax.Array:
  """The fixed masking/sampling key of held-out batch `index`."""
  return jax.random.fold_in(jax.random.key(int(seed)), 0x7E57_0000 + int(index))


def corrupt(model, config, tokens: ts.SpecialTokens, params, batch, key):
  """What an evaluation feeds the networks: (masked batch, generator logits, replaced ids,
  is_replaced), with dropout off and every draw from `key`."""
  k_mask, k_sample = jax.random.split(key)
  ids, attention = batch["input_ids"], batch["attention_mask"]
  masked = masking.mask_tokens(k_mask, ids, attention, tokens.never_masked, tokens.mask_id,
                               float(config.rtd.mask_prob))
  logits = model.generator_logits(params["generator"], masked.input_ids, attention,
                                  masked.positions, None, deterministic=True)
  sampled = ts.sample_rows(k_sample, jnp.arange(ids.shape[0]), logits,
                           float(config.rtd.temperature))
  replaced, is_replaced = masking.replace_tokens(ids, masked.positions, masked.weights, sampled)
  return masked, logits, replaced, is_replaced


def make_eval_step(model, config, tokens: ts.SpecialTokens):
  """eval_step(params, batch, key) -> sums over the batch (dropout off, masks from `key`)."""

  def eval_step(params, batch, key):
    attention = batch["attention_mask"]
    masked, logits, replaced, is_replaced = corrupt(model, config, tokens, params, batch, key)
    mlm = losses.mlm_sums(logits, masked.labels, masked.weights)
    disc_logits = model.discriminator_logits(params, replaced, attention, None,
                                             deterministic=True)
    rtd = losses.rtd_sums(disc_logits, is_replaced, attention)
    positive, negative = _histograms(disc_logits, is_replaced, attention)
    return {**mlm, **rtd, "auc_positive": positive, "auc_negative": negative}

  return eval_step


class Evaluator:
  """Evaluates parameters on the fixed held-out batches; `__call__(params)` -> scalars."""

  def __init__(self, model, config, tokens: ts.SpecialTokens, pipeline, param_shardings,
               batch_sharding, make_global_batch):
    self.num_batches = int(config.eval.num_batches)
    self.batch_size = pipeline_lib.eval_batch_size(config)
    self._batches = [make_global_batch(pipeline.holdout_batch(i, self.batch_size))
                     for i in range(self.num_batches)]
    self._keys = [eval_key(config.seed, i) for i in range(self.num_batches)]
    # Every host reads all evaluated rows once (a few thousand at most) for the baseline.
    every_row = pipeline.rows.read(pipeline.holdout_indices(self.num_batches * self.batch_size))
    self.unigram_entropy = unigram_entropy(every_row, tokens.never_masked)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    self._step = jax.jit(make_eval_step(model, config, tokens),
                         in_shardings=(param_shardings, batch_sharding, None),
                         out_shardings=replicated)

  def __call__(self, params) -> dict[str, float]:
    totals: dict[str, Any] = {}
    for batch, key in zip(self._batches, self._keys):
      sums = self._step(params, batch, key)
      totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    t = jax.device_get(totals)
    mlm_count, rtd_count = max(float(t["mlm_count"]), 1.0), max(float(t["rtd_count"]), 1.0)
    rate = float(t["replaced_sum"]) / rtd_count
    base = 0.0 if rate in (0.0, 1.0) else -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return {
        "eval_mlm_loss": float(t["mlm_loss_sum"]) / mlm_count,
        "eval_mlm_accuracy": float(t["mlm_correct"]) / mlm_count,
        "eval_rtd_loss": float(t["rtd_loss_sum"]) / rtd_count,
        "eval_rtd_accuracy": float(t["rtd_correct"]) / rtd_count,
        "eval_rtd_auc": auc_from_histograms(t["auc_positive"], t["auc_negative"]),
        "eval_unigram_entropy": self.unigram_entropy,
        "eval_rtd_base_loss": base,
    }

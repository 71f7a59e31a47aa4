"""Held-out evaluation during pre-training: the training batch losses cannot show overfitting, a
broken data mix or a bad restart; losses on text never trained on can.

The held-out rows are whole shards of the dataset (data/pipeline.py: the same on every host, for
every seed, global batch and resume). An evaluation reads `config.eval.num_batches` fixed
batches of them, masks and samples each row with a key of its own number, and runs both
networks with dropout off, so two evaluations of the same parameters give the same numbers on
any mesh, host count or chunking:

  eval_mlm_loss, eval_mlm_accuracy     the generator on the masked pieces
  eval_rtd_loss, eval_rtd_accuracy     the discriminator on every non-pad token of the replaced
  eval_rtd_auc                         batch (AUC of its logits: replaced vs original)
  eval_unigram_entropy                 what a model that knows only piece frequencies scores
                                       (entropy of the held-out pieces' unigram distribution)
  eval_rtd_base_loss                   what predicting the replaced fraction everywhere scores
  eval_disc_effective_rank             the discriminator's last-layer features of the held-out
  eval_disc_mean_cosine                text, mean-pooled over each row's tokens: effective rank of their covariance
                                       (exp of the entropy of its normalised PCA spectrum) and
                                       mean cosine between different rows; `_cls_` the same at
                                       [CLS]. A collapsing encoder (every row mapped near one
                                       direction) shows here long before fine-tuning would.

The AUC comes from histograms of the logits, which the jitted step sums over the global batch,
so it needs no per-token gather across hosts. The bins follow the float32 representation (sign,
exponent and the top AUC_MANTISSA_BITS mantissa bits), so no logit is clipped, however confident
the discriminator: every bin spans less than 2**-AUC_MANTISSA_BITS of its logits' magnitude.
Only a replaced and an original token in the same bin are ranked as ties (counted half), so the
AUC is off by at most half the fraction of (replaced, original) pairs sharing a bin, a bound
`auc_from_histograms(..., with_bound=True)` returns along with it (typically below 1e-3).
"""

from __future__ import annotations

import math
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.pretraining import losses
from deberta_jax.pretraining import masking
from deberta_jax.pretraining import train_step as ts
from deberta_jax.runtime import dispatch
from deberta_jax.runtime import sharding

# Bins: the sign, the 8 exponent bits and this many mantissa bits of a float32 logit.
AUC_MANTISSA_BITS = 9
AUC_BINS = 1 << (1 + 8 + AUC_MANTISSA_BITS)


def _histograms(logits: jax.Array, replaced: jax.Array, weights: jax.Array):
  """Counts of replaced and original tokens per bin, bins in increasing order of the logit.

  The bin is the top bits of the logit's float32 pattern mapped to an unsigned integer whose
  order is the numbers' order (negatives: all bits flipped; the rest: the sign bit set), so bins
  cover every float32 (infinities included) with a resolution relative to the magnitude.
  """
  logits = logits.astype(jnp.float32)
  logits = jnp.where(logits == 0, 0.0, logits)  # -0.0 and 0.0 are one value: one bin
  bits = jax.lax.bitcast_convert_type(logits, jnp.uint32)
  ordered = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
  bins = (ordered >> (32 - (1 + 8 + AUC_MANTISSA_BITS))).astype(jnp.int32).reshape(-1)
  weights = weights.astype(jnp.float32).reshape(-1)
  positive = replaced.astype(jnp.float32).reshape(-1) * weights
  return (jnp.zeros(AUC_BINS).at[bins].add(positive),
          jnp.zeros(AUC_BINS).at[bins].add(weights - positive))


def auc_from_histograms(positive: np.ndarray, negative: np.ndarray, with_bound: bool = False):
  """P(score of a replaced token > score of an original one), ties counted half.

  Pairs in one bin count half whatever their order, so the exact AUC (over the logits
  themselves) differs by at most `bound` = half the fraction of (replaced, original) pairs that
  share a bin; `with_bound=True` returns (auc, bound).
  """
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  total = positive.sum() * negative.sum()
  if total == 0:
    return (float("nan"), float("nan")) if with_bound else float("nan")
  below = np.cumsum(negative) - negative
  auc = float(np.sum(positive * (below + 0.5 * negative)) / total)
  if with_bound:
    return auc, float(0.5 * np.sum(positive * negative) / total)
  return auc


def unigram_entropy(input_ids: np.ndarray, special_ids) -> float:
  """Entropy in nats of the distribution of the non-special pieces of `input_ids`."""
  ids = input_ids[~np.isin(input_ids, np.asarray(special_ids))]
  counts = np.bincount(ids.reshape(-1))
  p = counts[counts > 0] / ids.size
  return float(-(p * np.log(p)).sum())


def eval_key(seed: int) -> jax.Array:
  """The fixed masking/sampling key of the held-out evaluation (each row draws its own from it
  by its number)."""
  return jax.random.fold_in(jax.random.key(int(seed)), 0x7E57_0000)


def corrupt(model, config, tokens: ts.SpecialTokens, params, batch, key):
  """What an evaluation feeds the networks: (masked batch, generator logits, replaced ids,
  is_replaced), with dropout off and every draw from `key` and the rows' numbers
  (`batch["row"]`, default 0..B-1): a row is masked and sampled the same way in any chunk."""
  k_mask, k_sample = jax.random.split(key)
  ids, attention = batch["input_ids"], batch["attention_mask"]
  rows = batch.get("row", jnp.arange(ids.shape[0]))
  prob = float(config.rtd.mask_prob)
  one_row = lambda k, i, a: masking.mask_tokens(k, i[None], a[None], tokens.never_masked,
                                                tokens.mask_id, prob)
  masked = jax.tree.map(lambda x: x[:, 0], jax.vmap(one_row)(ts.row_keys(k_mask, rows), ids,
                                                             attention))
  logits = model.generator_logits(params["generator"], masked.input_ids, attention,
                                  masked.positions, None, deterministic=True)
  sampled = ts.sample_rows(k_sample, rows, logits, float(config.rtd.temperature))
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
    # Features of the held-out text itself, as fine-tuning will see it (one more forward pass).
    _, hidden = model.discriminator_logits(params, batch["input_ids"], attention, None,
                                           deterministic=True, with_features=True)
    rtd = losses.rtd_sums(disc_logits, is_replaced, attention)
    positive, negative = _histograms(disc_logits, is_replaced, attention)
    return {**mlm, **rtd, "auc_positive": positive, "auc_negative": negative,
            **feature_sums(hidden, attention)}

  return eval_step


def mean_pool(values: jax.Array, attention: jax.Array) -> jax.Array:
  """[B, L, ...] -> [B, ...] float32: the mean over each row's non-pad tokens (0 for a row of
  padding only)."""
  weights = attention.astype(jnp.float32).reshape(attention.shape + (1,) * (values.ndim - 2))
  return (values.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


def feature_sums(hidden: jax.Array, attention: jax.Array) -> dict[str, jax.Array]:
  """Sums over the rows of the discriminator's last-layer features, mean-pooled over non-pad
  tokens ('disc') and at [CLS] ('cls'): sum, sum of outer products and sum of unit vectors, from
  which `feature_health` gets the PCA spectrum and the mean cosine of the whole evaluation
  without gathering rows across hosts (H x H floats per kind: 4 MB at hidden 1024)."""
  hidden = hidden.astype(jnp.float32)
  pooled = mean_pool(hidden, attention)
  out = {"feature_rows": jnp.asarray(hidden.shape[0], jnp.float32)}
  for name, x in (("disc", pooled), ("cls", hidden[:, 0])):
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    out[f"{name}_sum"] = x.sum(0)
    out[f"{name}_outer"] = jnp.einsum("bi,bj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
    out[f"{name}_unit_sum"] = unit.sum(0)
  return out


def effective_rank(covariance: np.ndarray) -> float:
  """exp of the entropy of the normalised eigenvalue spectrum (Roy & Vetterli's effective rank):
  1 when all variance lies on one direction, H when it is spread evenly over H."""
  eig = np.clip(np.linalg.eigvalsh(np.asarray(covariance, np.float64)), 0.0, None)
  if eig.sum() <= 0:
    return 0.0
  p = eig / eig.sum()
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


def feature_health(t: dict, name: str) -> tuple[float, float]:
  """(effective rank of the features' covariance, mean cosine between different rows)."""
  n = float(t["feature_rows"])
  mean = np.asarray(t[f"{name}_sum"], np.float64) / n
  covariance = np.asarray(t[f"{name}_outer"], np.float64) / n - np.outer(mean, mean)
  unit_sum = np.asarray(t[f"{name}_unit_sum"], np.float64)
  cosine = (unit_sum @ unit_sum - n) / (n * (n - 1)) if n > 1 else float("nan")
  return effective_rank(covariance), float(cosine)


class CollapseWatch:
  """The log's word on the discriminator's features at each evaluation: a warning at every
  evaluation whose effective rank is below `threshold` (config.eval.min_effective_rank; 0 turns
  it off), and one line when the rank is back above it.

  Why the second line: one low evaluation does not tell a dip from a collapse. Early in training
  the rank can fall and recover (configs/tiny.py is below 5 at step 500 and above it again by step
  1000), while a collapsed run stays low at every later evaluation and warns at each. The recovery
  line closes a dip in the log, so a warning that no such line follows still stands. A resumed
  run picks up the evaluations logged before it (`resume`), so a dip that spans a preemption is
  still closed.
  """

  def __init__(self, threshold: float):
    self.threshold = float(threshold)
    self.low_evaluations = 0    # evaluations in a row below the threshold, up to the last one
    self._low_since = None      # the step of the first of them, when known

  def resume(self, records, start_step: int) -> None:
    """Takes up the evaluations a run logged up to `start_step` (metrics.jsonl records), silently:
    the stretch below the threshold they end with, if any, continues in the resumed run."""
    logged = sorted((int(r["step"]), float(r["eval_disc_effective_rank"])) for r in records
                    if "eval_disc_effective_rank" in r and int(r["step"]) <= start_step)
    for step, rank in logged:
      self._count(rank, step)

  def _count(self, rank: float, step: int | None) -> bool:
    """Updates the stretch below the threshold; True if `rank` is below it."""
    if rank < self.threshold:
      if not self.low_evaluations:
        self._low_since = step
      self.low_evaluations += 1
      return True
    self.low_evaluations, self._low_since = 0, None
    return False

  def __call__(self, rank: float, cosine: float, dimensions: int, step: int | None = None):
    if self.threshold <= 0:
      return
    at = "" if step is None else f" at step {step}"
    low_before, low_since = self.low_evaluations, self._low_since
    if self._count(rank, step):
      in_a_row = (f"; {self.low_evaluations} evaluations in a row"
                  if self.low_evaluations > 1 else "")
      logging.warning(
          "The discriminator's features are collapsing%s: effective rank %.1f of %d dimensions "
          "(mean cosine between rows %.2f), below config.eval.min_effective_rank=%g%s",
          at, rank, dimensions, cosine, self.threshold, in_a_row)
    elif low_before:
      since = "" if low_since is None else f" since step {low_since}"
      logging.info(
          "The discriminator's features recovered%s: effective rank %.1f, above "
          "config.eval.min_effective_rank=%g again after %d evaluation(s) below it%s",
          at, rank, self.threshold, low_before, since)


def held_out_batch(pipeline, index: int, batch_size: int) -> dict[str, np.ndarray]:
  """This process's rows of held-out batch `index` with their numbers in the held-out stream
  (`row`), which key their masks and samples (corrupt)."""
  batch = pipeline.holdout_batch(index, batch_size)
  local = batch_size // pipeline.process_count
  first = index * batch_size + pipeline.process_index * local
  return {**batch, "row": np.arange(first, first + local, dtype=np.int32)}


def num_chunks(per_device_rows: int, per_device_microbatch: int) -> int:
  """Chunks of equal size, each at most `per_device_microbatch` rows per device (0: one)."""
  if per_device_microbatch <= 0 or per_device_rows <= per_device_microbatch:
    return 1
  return next(c for c in range(-(-per_device_rows // per_device_microbatch), per_device_rows + 1)
              if per_device_rows % c == 0)


class Evaluator:
  """Evaluates parameters on the fixed held-out batches; `__call__(params)` -> scalars.

  The step is traced under the training mesh and its logical-axis rules (sharding.on_mesh), like
  the training step: outside them the fused attention kernels would run on the whole global
  batch on every device. Each held-out batch is run in chunks of at most `per_device_microbatch`
  rows per device (the training step's micro-batch, which fits): the evaluation batch defaults
  to the global batch, 256 rows per device at configs/large.py on 32 devices. The sums do not
  depend on the chunking: every row is masked and sampled with keys of its own number.
  """

  def __init__(self, model, config, tokens: ts.SpecialTokens, pipeline, param_shardings,
               batch_sharding, make_global_batch, per_device_microbatch: int = 0):
    self.batch_size = pipeline_lib.eval_batch_size(config)
    self.num_batches = (int(config.eval.num_batches) or
                        max(1, pipeline.holdout_rows // self.batch_size))
    mesh = batch_sharding.mesh
    chunks = num_chunks(self.batch_size // sharding.data_parallel_size(mesh),
                        per_device_microbatch)
    wanted = self.num_batches * self.batch_size
    if pipeline.holdout_rows < wanted:
      logging.warning("The evaluation reads %d held-out rows per call but %d are held out: "
                      "rows repeat (raise config.eval.holdout_fraction for more).", wanted,
                      pipeline.holdout_rows)
    self._batches = []
    for i in range(self.num_batches):
      local = held_out_batch(pipeline, i, self.batch_size)
      for chunk in range(chunks):
        self._batches.append(make_global_batch(
            {k: np.array_split(v, chunks)[chunk] for k, v in local.items()}))
    self._key = eval_key(config.seed)
    self.collapse_watch = CollapseWatch(config.eval.get("min_effective_rank", 0.0))
    # Every host reads all evaluated rows once (a few thousand at most) for the baseline.
    every_row = pipeline.rows.read(pipeline.holdout_indices(min(wanted, pipeline.holdout_rows)))
    self.unigram_entropy = unigram_entropy(every_row, tokens.never_masked)
    self._step = sharding.on_mesh(
        jax.jit(make_eval_step(model, config, tokens),
                in_shardings=(param_shardings, batch_sharding, None),
                out_shardings=sharding.replicated(mesh)), mesh)

  def __call__(self, params, step: int | None = None) -> dict[str, float]:
    """The scalars of one evaluation; `step` names it in the collapse watch's lines."""
    totals: dict[str, Any] = {}
    in_flight = dispatch.StepsInFlight(ahead=1)
    for batch in self._batches:
      sums = self._step(params, batch, self._key)
      in_flight.dispatched(sums)
      totals = sums if not totals else dispatch.add_trees(totals, sums)
    t = jax.device_get(totals)
    mlm_count, rtd_count = max(float(t["mlm_count"]), 1.0), max(float(t["rtd_count"]), 1.0)
    rate = float(t["replaced_sum"]) / rtd_count
    base = 0.0 if rate in (0.0, 1.0) else -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    health = {}
    for name, prefix in (("disc", "eval_disc"), ("cls", "eval_disc_cls")):
      rank, cosine = feature_health(t, name)
      health[f"{prefix}_effective_rank"], health[f"{prefix}_mean_cosine"] = rank, cosine
    self.collapse_watch(health["eval_disc_effective_rank"], health["eval_disc_mean_cosine"],
                        len(t["disc_sum"]), step)
    return {
        "eval_mlm_loss": float(t["mlm_loss_sum"]) / mlm_count,
        "eval_mlm_accuracy": float(t["mlm_correct"]) / mlm_count,
        "eval_rtd_loss": float(t["rtd_loss_sum"]) / rtd_count,
        "eval_rtd_accuracy": float(t["rtd_correct"]) / rtd_count,
        "eval_rtd_auc": auc_from_histograms(t["auc_positive"], t["auc_negative"]),
        "eval_unigram_entropy": self.unigram_entropy,
        "eval_rtd_base_loss": base,
        **health,
    }

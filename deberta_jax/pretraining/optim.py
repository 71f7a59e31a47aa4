"""AdamW with linear warmup and linear decay, global-norm clipping and a weight-decay mask.

Paper Table 10: Adam (0.9, 0.98), eps 1e-6, weight decay 0.01, clip 1.0, linear schedule. optax's
AdamW applies bias correction (the official XAdam does not; the decision table keeps optax's).
Biases and LayerNorm parameters are not decayed; embeddings, including GDES's E_delta, are (as in
the official code, which pulls E_D towards E_G).
"""

from __future__ import annotations

import optax
from flax import traverse_util


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           end: float = 0.0) -> optax.Schedule:
  """0 -> peak linearly over warmup, then peak -> end linearly at total_steps."""
  warmup = optax.linear_schedule(0.0, peak, max(1, warmup_steps))
  decay = optax.linear_schedule(peak, end, max(1, total_steps - warmup_steps))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params):
  """True for parameters that get weight decay: not biases, not LayerNorm scales/offsets."""
  flat = traverse_util.flatten_dict(params)
  mask = {path: not (path[-1] == "bias" or any("LayerNorm" in str(p) for p in path))
          for path in flat}
  return traverse_util.unflatten_dict(mask)


def make_optimizer(hparams, peak_learning_rate: float, warmup_steps: int, total_steps: int,
                   end_learning_rate: float = 0.0) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
  """(clip -> AdamW on the warmup/decay schedule, the schedule), for pre-training and
  fine-tuning alike; `hparams` has b1, b2, eps, weight_decay and clip_norm (0 = no clipping)."""
  schedule = learning_rate_schedule(peak_learning_rate, warmup_steps, total_steps,
                                    end_learning_rate)
  # identity() in place of the clip keeps the optimizer state's structure the same with and
  # without clipping, so a run resumes from checkpoints written under another clip_norm.
  clip = (optax.clip_by_global_norm(hparams.clip_norm) if hparams.clip_norm > 0
          else optax.identity())
  adamw = optax.adamw(schedule, b1=hparams.b1, b2=hparams.b2, eps=hparams.eps,
                      weight_decay=hparams.weight_decay, mask=decay_mask)
  return optax.chain(clip, adamw), schedule


def peak_learning_rates(config) -> tuple[float, float]:
  """(generator, discriminator) peak learning rates."""
  disc = config.optim.discriminator_learning_rate
  return config.optim.learning_rate, (disc if disc > 0 else config.optim.learning_rate)

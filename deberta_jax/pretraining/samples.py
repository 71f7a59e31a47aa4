"""What the trained networks do on a few held-out sentences, in words a person can check.

Losses say that a run learned; these lines say what: for each sentence, the masked pieces, the
generator's top guesses for each, the pieces it put in their place, and the tokens the
discriminator flags as replaced (with what it got right).
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax.pretraining import masking
from deberta_jax.pretraining import train_step as ts

_SHOWN_MASKS = 6
_SHOWN_CHARS = 200


def _text(tokenizer, ids) -> str:
  text = tokenizer.decode(ids)
  return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + " ..."


def _networks_on(model, tokens, mask_prob: float, temperature: float):
  """One compiled program for everything `describe` asks of the networks.

  Run op by op, the two networks' forward passes compile each primitive separately, which at the
  end of a fresh process's run costs several times one jitted program (docs/benchmarks.md, "Test
  suite"). Jitted, it is one small program, kept by the persistent compilation cache like the step.
  """

  def compute(params, ids, attention, key):
    k_mask, k_sample = jax.random.split(key)
    masked = masking.mask_tokens(k_mask, ids, attention, tokens.never_masked, tokens.mask_id,
                                 mask_prob)
    logits = model.generator_logits(params["generator"], masked.input_ids, attention,
                                    masked.positions, None, deterministic=True)
    flat = logits.reshape(logits.shape[0], logits.shape[1], -1)
    top = jax.lax.top_k(flat, 3)[1]
    sampled = ts.sample_rows(k_sample, jnp.arange(ids.shape[0]), logits, temperature)
    replaced, is_replaced = masking.replace_tokens(ids, masked.positions, masked.weights, sampled)
    flagged = model.discriminator_logits(params, replaced, attention, None,
                                         deterministic=True) > 0
    return masked, top, replaced, is_replaced, flagged

  return jax.jit(compute)


def describe(model, params, tokenizer, batch: dict, config, seed: int = 0) -> list[str]:
  """Lines describing both networks on the rows of `batch` (host arrays; a few rows)."""
  params = jax.device_get(params)
  tokens = ts.SpecialTokens.of(tokenizer)
  ids = jnp.asarray(batch["input_ids"])
  attention = jnp.asarray(batch["attention_mask"])
  compute = _networks_on(model, tokens, float(config.rtd.mask_prob),
                         float(config.rtd.temperature))
  masked, top, replaced, is_replaced, flagged = jax.device_get(
      compute(params, ids, attention, jax.random.key(seed)))
  top, flagged = np.asarray(top), np.asarray(flagged)
  ids, replaced, is_replaced = np.asarray(ids), np.asarray(replaced), np.asarray(is_replaced)
  attention = np.asarray(attention).astype(bool)
  positions, weights = np.asarray(masked.positions), np.asarray(masked.weights)
  piece = tokenizer.id_to_piece  # also names the spare rows the generator may sample
  lines = []
  for row in range(ids.shape[0]):
    lines.append(f"sentence {row + 1}: {_text(tokenizer, ids[row])}")
    lines.append(f"  masked:      {_text(tokenizer, np.asarray(masked.input_ids)[row])}")
    guesses = []
    for slot in np.flatnonzero(weights[row] > 0)[:_SHOWN_MASKS]:
      true = piece(int(ids[row, positions[row, slot]]))
      options = "/".join(piece(int(t)) for t in top[row, slot])
      guesses.append(f"{true} -> {options}")
    lines.append(f"  generator top-3 (true -> guesses): {'; '.join(guesses)}")
    swapped = [f"{piece(int(ids[row, p]))}->{piece(int(replaced[row, p]))}"
               for p in np.flatnonzero(is_replaced[row])]
    lines.append(f"  replaced by the generator: {', '.join(swapped) or 'nothing'}")
    flags = flagged[row] & attention[row]
    hits = int((flags & is_replaced[row]).sum())
    shown = [piece(int(replaced[row, p])) for p in np.flatnonzero(flags)][:12]
    lines.append(f"  discriminator flags {int(flags.sum())} token(s) as replaced "
                 f"({hits} of {int(is_replaced[row].sum())} replaced found): "
                 f"{', '.join(shown) or 'none'}")
  return lines


def log_samples(model, params, tokenizer, read_batch, config, seed: int = 0,
                rows: int = 3) -> None:
  """Logs `describe`'s lines for the first `rows` rows of `read_batch()` (host arrays).

  They come after the run has finished and saved its last step, so nothing here may fail it:
  an exception (reading the rows included) is logged as a warning, and the run still exits 0.
  """
  try:
    batch = {k: v[:rows] for k, v in read_batch().items()}
    lines = describe(model, params, tokenizer, batch, config, seed)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not show the held-out samples (%s: %s); the run itself finished.",
                    type(e).__name__, e, exc_info=True)
    return
  for line in lines:
    logging.info("%s", line)

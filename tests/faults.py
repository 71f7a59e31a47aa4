"""Fault injection shared by the tests: a training step that reports non-finite losses."""

import jax

from deberta_jax.pretraining import train_step as ts


def poison_from(step_number: int, skip: bool = False):
  """Wraps ts.make_train_step so that steps >= step_number report a NaN MLM loss.

  With skip=True the wrapped step also drops the update, as train_step does for a real
  non-finite step under config.nonfinite='skip' (tested directly in tests/test_reliability.py).
  """
  original = ts.make_train_step

  def poisoned(*args, **kwargs):
    step_fn = original(*args, **kwargs)

    def step(state, batch):
      new_state, m = step_fn(state, batch)
      bad = new_state.step >= step_number
      clean = {k: v for k, v in m.items() if k not in ("skipped", "first_nonfinite_step")}
      clean["mlm_loss"] = jax.numpy.where(bad, jax.numpy.nan, clean["mlm_loss"])
      if skip:
        new_state = jax.tree.map(lambda n, o: jax.numpy.where(bad, o, n), new_state, state)
        new_state = new_state.replace(step=state.step + 1)
      return new_state, ts._health(clean, ~bad, state.step + 1)  # pylint: disable=protected-access
    return step
  return poisoned

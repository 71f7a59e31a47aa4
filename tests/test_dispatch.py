"""The training loops' bound on dispatched-but-unfinished steps (runtime/dispatch.py)."""

import jax
import jax.numpy as jnp
import pytest

from deberta_jax.runtime import dispatch


@jax.jit
def _slow_step(x):
  """A few hundred milliseconds of matmuls on one device: long enough that a step nobody waited
  for is still running when the next one is queued."""
  return jax.lax.fori_loop(0, 60, lambda _, y: jnp.tanh(y @ y) * 0.5, x)


def test_queueing_a_step_waits_for_the_one_before():
  x = jnp.eye(256) * 0.3
  _slow_step(x).block_until_ready()  # compiled outside the measured queue
  bound = dispatch.StepsInFlight(ahead=1)
  outputs = []
  for _ in range(4):
    outputs.append(_slow_step(x))
    bound.dispatched(outputs[-1])
    assert all(y.is_ready() for y in outputs[:-1])  # every earlier step has finished


def test_a_deeper_bound_leaves_that_many_steps_running():
  x = jnp.eye(256) * 0.3
  bound = dispatch.StepsInFlight(ahead=2)
  outputs = []
  for _ in range(4):
    outputs.append(_slow_step(x))
    bound.dispatched(outputs[-1])
    assert all(y.is_ready() for y in outputs[:-2])


def test_the_bound_counts_the_step_being_queued():
  with pytest.raises(ValueError, match="at least 1"):
    dispatch.StepsInFlight(ahead=0)

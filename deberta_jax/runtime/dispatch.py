"""How far the training loop's host thread may run ahead of the devices.

JAX dispatches asynchronously: `train_step(state, batch)` returns at once, and a loop that only
reads its metrics at log steps queues hundreds of steps (and their batches) before the devices
finish the first. Deep queues buy nothing once a step is already waiting behind the running one,
and they cost:
- memory: every queued step holds its input batch on the device;
- latency: a preemption checkpoint, or a non-finite loss, is only seen after the queue drains;
- liveness on CPU meshes: XLA's CPU client runs each device's share of a program on a shared
  thread pool and admits a bounded number of computations per device. With a deep queue on a
  loaded machine, one device can enter a step's all-gather while the other device's share of the
  same step waits for admission behind computations that cannot finish, and the process hangs
  (docs/reliability.md shows the stack and the reproduction).

`StepsInFlight` keeps the queue short: once step k is dispatched, it waits for step k - ahead to
finish, so the devices always have the next step queued and the host never runs further ahead.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp


class StepsInFlight:
  """A bounded queue of dispatched steps, each represented by (a pytree of) its outputs."""

  def __init__(self, ahead: int = 1):
    if ahead < 1:
      raise ValueError(f"ahead must be at least 1 (the step being queued), got {ahead}")
    self.ahead = ahead
    self._pending = collections.deque()

  def dispatched(self, outputs) -> None:
    """Records a step that was just dispatched; returns once at most `ahead` steps are still
    unfinished (this one included)."""
    self._pending.append(outputs)
    while len(self._pending) > self.ahead:
      jax.block_until_ready(self._pending.popleft())


@jax.jit
def add_trees(totals, increments):
  """Elementwise sum of two pytrees of arrays as one program. A loop that sums its metrics with
  one `jnp.add` per leaf dispatches a program per metric per step, which deepens the queue this
  module bounds."""
  return jax.tree.map(jnp.add, totals, increments)

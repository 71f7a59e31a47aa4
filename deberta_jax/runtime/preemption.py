"""Noticing that the run should stop (SIGTERM) or checkpoint soon (wall clock), with all hosts agreeing.

TPU VMs, SLURM (`--signal`), Kubernetes and `docker stop` all announce the end of a job with
SIGTERM and a grace period. The loop finishes the step in flight, writes a checkpoint of exactly
that step and exits with a distinct code; rerunning the same command resumes from it.

Agreement across hosts matters because a checkpoint is written by all hosts at the same step:
  * one process: a Python SIGTERM handler sets a flag that the loop reads after each step;
  * several processes: `jax.distributed.initialize()` starts JAX's preemption notifier, which
    takes SIGTERM itself and lets all hosts agree on a step through the coordination service
    (`Checkpointer.reached_preemption`). A Python handler would steal the signal from it, so
    none is installed then.
"""

from __future__ import annotations

import signal
import threading
import time

import jax
from jax.experimental import multihost_utils

from deberta_jax import errors


class StopSignal:
  """Records SIGTERM in a single-process run; restores the previous handler on close()."""

  def __init__(self):
    self._received = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._received.set()

  def received(self) -> bool:
    return self._received.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class SetupStop:
  """SIGTERM while a run sets up (reading data, restoring, compiling): there is no step to
  checkpoint yet, so `check(phase)`, called between the phases, raises Preempted (exit 4,
  "rerun to resume") as soon as one ends. The handler only records the signal: raising from it
  could land inside any library's `except Exception` (a logging call swallows it). Long phases
  stop within themselves where they can (data preparation does); a compilation finishes first.
  A context manager: the previous handler is restored on exit."""

  def __init__(self):
    self._signal = None

  def __enter__(self) -> "SetupStop":
    self._signal = StopSignal()
    return self

  def check(self, phase: str) -> None:
    if self._signal is not None and self._signal.received():
      raise errors.Preempted(f"stopped by SIGTERM during {phase}, before any step of this run; "
                             "rerun the same command to resume")

  def __exit__(self, *exc) -> None:
    self._signal.close()


class StopChecker:
  """Whether to stop after `step`: SIGTERM here, or JAX's agreed preemption point on a pod."""

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._signal = StopSignal()

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._checkpointer.reached_preemption(step)
    return self._signal.received()

  def close(self) -> None:
    self._signal.close()


class TimedCheckpoints:
  """Due every `minutes` of wall time (0 = never). Asked only at steps where hosts already
  synchronise (metric logging), and decided by process 0's clock so that all hosts agree."""

  def __init__(self, minutes: float):
    self._interval = minutes * 60.0
    self._last = time.monotonic()

  def due(self) -> bool:
    if self._interval <= 0:
      return False
    due = time.monotonic() - self._last >= self._interval
    if jax.process_count() > 1:
      due = bool(multihost_utils.broadcast_one_to_all(due))
    return due

  def saved(self) -> None:
    self._last = time.monotonic()

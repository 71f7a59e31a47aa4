"""The ways a run can end other than success, and the exit code each gives every entry point.

Every module raises one of these (or a subclass that names its domain, e.g. `ConfigError`,
`DataError`), and every command-line entry point turns them into one line on stderr and the
code below with `exit_on_error`; launch scripts key on the codes (4 = rerun to resume).
"""

from __future__ import annotations

import contextlib
import sys

EXIT_BAD_INPUT = 2          # one line names the field, file or path; nothing was written
EXIT_NON_FINITE = 3         # a loss or gradient became NaN/inf; the last checkpoint is kept
EXIT_PREEMPTED = 4          # SIGTERM: the step was checkpointed; rerun the same command
EXIT_CHECKPOINT_WRITE = 5   # a checkpoint could not be written; the previous one is intact


class BadInput(ValueError):
  """Input that cannot work (config value, corpus, vocabulary, workdir, checkpoint); the message
  names it. Raised before anything is written."""
  exit_code = EXIT_BAD_INPUT


class WorkdirError(BadInput):
  """A work directory that cannot be used or read: another model's run, a file, no checkpoint."""


class NonFiniteError(RuntimeError):
  """A loss or gradient norm became NaN/inf; the message names the step."""
  exit_code = EXIT_NON_FINITE


class Preempted(RuntimeError):
  """SIGTERM arrived; the current step was checkpointed and the run stopped cleanly."""
  exit_code = EXIT_PREEMPTED


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; the message names the newest complete one."""
  exit_code = EXIT_CHECKPOINT_WRITE


HANDLED = (BadInput, NonFiniteError, Preempted, CheckpointWriteError)


@contextlib.contextmanager
def exit_on_error():
  """In an entry point's main: a HANDLED error becomes one line on stderr and its exit code
  ('stopped: ...' for a preemption, 'error: ...' otherwise); anything else is a bug and keeps
  its traceback."""
  try:
    yield
  except HANDLED as e:
    word = "stopped" if isinstance(e, Preempted) else "error"
    print(f"{word}: {e}", file=sys.stderr)
    sys.exit(e.exit_code)

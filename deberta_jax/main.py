"""Entry point: `python -m deberta_jax.main --config=configs/tiny.py --workdir=DIR [--config.x=y]`.

Every config field can be overridden on the command line; an unknown field is an error (the
config is locked). Exit codes, for launchers and schedulers:
  0  finished (or stopped after config.stop_after_steps)
  2  bad input: one line names the field, file or path; nothing was computed or written
  3  a loss or gradient norm became NaN/inf; the last good checkpoint is kept
  4  preempted (SIGTERM): the current step was checkpointed; rerun the same command to resume
  5  a checkpoint could not be written (e.g. disk full); the previous checkpoint is intact
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from deberta_jax import cpu_devices

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file under configs/ (e.g. configs/tiny.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for this run.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 4
EXIT_CHECKPOINT_WRITE = 5


class _OwnInfoOnly:
  """Drops INFO records of libraries (orbax logs every save in ~30 lines); keeps their warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "deberta_jax" in record.pathname


def _quiet_library_logs() -> None:
  import logging as std_logging  # pylint: disable=import-outside-toplevel
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
  std_logging.getLogger("absl").setLevel(std_logging.INFO)


def _simulate_devices(count: int) -> None:
  """Dry run on a mesh larger than this machine: `count` host-platform (CPU) devices. Must run
  before jax is first imported, since XLA reads the device count once."""
  if "jax" in sys.modules:
    raise RuntimeError("--config.dry_run_devices must be applied before jax is imported")
  os.environ["JAX_PLATFORMS"] = "cpu"
  cpu_devices.set_host_device_count(count)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _load_config()
  if config.dry_run and config.dry_run_devices:
    _simulate_devices(config.dry_run_devices)
  else:
    cpu_devices.apply(config)
  # Imported here so that nothing touches jax before flags (and XLA_FLAGS) are settled.
  from deberta_jax import checkpointing, config_lib, distributed, hf, train  # pylint: disable=import-outside-toplevel
  from deberta_jax.data import DataError  # pylint: disable=import-outside-toplevel

  _quiet_library_logs()
  distributed.initialize()
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX %s, process %d/%d, %d devices (%d local): %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count(), jax.devices()[0].device_kind)
  from deberta_jax import sharding  # pylint: disable=import-outside-toplevel
  outcomes = (
      ((config_lib.ConfigError, sharding.MeshError, DataError, train.WorkdirError,
        hf.CheckpointError, checkpointing.CheckpointError), EXIT_BAD_INPUT),
      ((train.NonFiniteError,), EXIT_NON_FINITE),
      ((train.Preempted,), EXIT_PREEMPTED),
      ((checkpointing.CheckpointWriteError,), EXIT_CHECKPOINT_WRITE),
  )
  if not config.dry_run:  # a dry run writes nothing, not even cache files
    from deberta_jax import compilation_cache  # pylint: disable=import-outside-toplevel
    compilation_cache.enable(config)
  try:
    train.run(config, _WORKDIR.value)
  except tuple(e for kinds, _ in outcomes for e in kinds) as e:
    code = next(c for kinds, c in outcomes if isinstance(e, kinds))
    print(f"{'stopped' if code == EXIT_PREEMPTED else 'error'}: {e}", file=sys.stderr)
    sys.exit(code)


def _parse_flags(argv):
  """absl's parser, but a bad flag (unknown config field, unparsable value, missing config file)
  exits with EXIT_BAD_INPUT and one line instead of absl's usage dump and code 1."""
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    _bad_command_line(e)


_FLAG_ERRORS = (flags.Error, KeyError, AttributeError, OSError, ValueError, TypeError)


def _bad_command_line(error: BaseException):
  """One line for a bad flag or config file, then EXIT_BAD_INPUT."""
  while error.__cause__ is not None:
    error = error.__cause__
  while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(..))
    error = error.args[0]
  if isinstance(error, (KeyError, AttributeError)):  # a field the locked config does not have
    message = "unknown config field " + " ".join(str(error.args[0] if error.args else error).split())
  else:
    message = " ".join(str(error).split())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def _load_config():
  """The parsed config; ml_collections defers a config file's load error to first access."""
  try:
    config = _CONFIG.value
    config.get("dry_run")
    return config
  except _FLAG_ERRORS as e:
    _bad_command_line(e)


def run():
  # Config files import `configs.common`; make the repository root importable from any cwd.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()

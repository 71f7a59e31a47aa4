"""Entry point: `python -m deberta_jax.main --config=configs/tiny.py --workdir=DIR [--config.x=y]`.

Every config field can be overridden on the command line; an unknown field is an error (the
config is locked). Bad input exits with code 2 and a one-line message naming the problem.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file under configs/ (e.g. configs/tiny.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for this run.")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so that nothing touches jax before flags (and XLA_FLAGS) are settled.
  from deberta_jax import checkpointing, config_lib, distributed, hf, train  # pylint: disable=import-outside-toplevel
  from deberta_jax.data import DataError  # pylint: disable=import-outside-toplevel

  _quiet_library_logs()
  distributed.initialize()
  import jax  # pylint: disable=import-outside-toplevel
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, train.WorkdirError, hf.CheckpointError,
          checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  except train.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_NON_FINITE)


def run():
  # Config files import `configs.common`; make the repository root importable from any cwd.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)


if __name__ == "__main__":
  run()

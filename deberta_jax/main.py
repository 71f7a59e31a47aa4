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

from absl import flags
from absl import logging
from ml_collections import config_flags

from deberta_jax import cli
from deberta_jax.runtime import cpu_devices

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file under configs/ (e.g. configs/tiny.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for this run.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print every config field with its value (after the overrides) and "
    "its meaning, then exit without running.")
flags.mark_flags_as_required(["config"])


def _simulate_devices(count: int) -> None:
  """Dry run on a mesh larger than this machine: `count` host-platform (CPU) devices. Must run
  before jax is first imported, since XLA reads the device count once."""
  if "jax" in sys.modules:
    raise RuntimeError("--config.dry_run_devices must be applied before jax is imported")
  os.environ["JAX_PLATFORMS"] = "cpu"
  cpu_devices.set_host_device_count(count)


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.load_config(_CONFIG)
  if _PRINT_CONFIG.value:
    from configs import common  # pylint: disable=import-outside-toplevel  # its comments: only to print
    print(cli.describe_config(config, cli.field_meanings(common)))
    return
  if not _WORKDIR.value:
    raise cli.app.UsageError("--workdir is required (the run's directory, local or gs://)")
  if config.dry_run and config.dry_run_devices:
    _simulate_devices(config.dry_run_devices)
  else:
    cpu_devices.apply(config)
  # Late: nothing may import jax before the device-count flags above are settled.
  import jax  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import train  # pylint: disable=import-outside-toplevel
  from deberta_jax.runtime import compilation_cache  # pylint: disable=import-outside-toplevel
  from deberta_jax.runtime import distributed  # pylint: disable=import-outside-toplevel

  distributed.initialize()
  logging.info("JAX %s, process %d/%d, %d devices (%d local): %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count(), jax.devices()[0].device_kind)
  if not config.dry_run:  # a dry run writes nothing, not even cache files
    compilation_cache.enable(config)
  train.run(config, _WORKDIR.value)


def run():
  cli.run(main)


if __name__ == "__main__":
  run()

"""One XLA device per CPU core when training on a CPU.

XLA:CPU runs most operations of a step (its fused elementwise kernels and YNNPACK's small
matmuls) on a single thread each, and spreads work over cores only where independent operations
happen to be ready together, which leaves cores idle during a small model's step. Exposing the
host as N devices and letting the mesh put a slice of the batch on each (the same data/fsdp
parallelism as on a pod) keeps every core busy, and tiny's step is faster so. Where
parameter-sized work dominates (small's 128k-row tables and their AdamW updates, which XLA
already spreads over threads) the split only adds the mesh's gathers and is slower, hence a
per-config choice (figures in docs/CHANGELOG.md and docs/benchmarks.md).

The device count is an XLA flag read once, when JAX starts its CPU backend, so `apply` must run
before jax is imported. On GPU/TPU hosts the flag only shapes the unused CPU backend.

Devices that share the host's cores also wait for each other at every collective of the step.
XLA:CPU ends the process (SIGABRT) when one device waits longer than its stuck warning plus its
termination timeout, 20 s + 40 s by default. The split runs that stopped so were deadlocked by
a loop that queued too many programs (runtime/dispatch.py bounds the queue), but on a loaded
machine (a test suite or a second run beside the training) a device's thread can also be kept
off the cores for a minute. `relax_collective_timeout` gives XLA ten minutes instead: a stall
that heals lets the run go on, a deadlock still ends it.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import math
import mmap
import os
import sys

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
COLLECTIVE_TIMEOUT_SECONDS = 600


def available_cores() -> int:
  """Cores this process may run on (cgroup/affinity aware where the OS says)."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):  # not Linux
    return max(1, os.cpu_count() or 1)


def device_count(config, cores: int) -> int:
  """How many CPU devices a run of `config` should see.

  `config.mesh.cpu_devices` N >= 1 is taken as is (1: the host is one device). 0 means as many
  as there are cores, reduced to the largest count the mesh and the global batch accept: with
  an explicit mesh (no -1 axis) exactly data*fsdp*tensor; with a -1 axis a multiple of the
  explicit axes whose data-parallel part divides the global batch (and its micro-batch).
  """
  requested = int(config.mesh.get("cpu_devices", 1))
  if requested > 0:
    return requested
  if config.mesh.get("num_devices", 0):
    return int(config.mesh.num_devices)
  sizes = {axis: int(config.mesh[axis]) for axis in ("data", "fsdp", "tensor")}
  known = math.prod(size for size in sizes.values() if size != -1)
  if -1 not in sizes.values():
    return known
  micro = max(1, int(config.mesh.get("per_device_microbatch", 0)))
  for filled in range(max(1, cores // known), 0, -1):  # the size the -1 axis would get
    data_parallel = math.prod(sizes[axis] for axis in ("data", "fsdp") if sizes[axis] != -1)
    if sizes["tensor"] != -1:  # the -1 axis is data or fsdp
      data_parallel *= filled
    if config.global_batch_size % (data_parallel * micro) == 0:
      return known * filled
  return known


def apply(config, cores: int | None = None) -> int | None:
  """Sets XLA's host device count for `config` before jax starts; returns it, or None when the
  environment already decides (XLA_FLAGS names a count: tests, dry runs, the user)."""
  if DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
    return None
  count = device_count(config, available_cores() if cores is None else cores)
  if count == 1:
    return 1  # XLA's default
  if "jax" in sys.modules:
    logging.warning("mesh.cpu_devices=%d not applied: jax was imported before the CPU device "
                    "count could be set; the host stays one device", count)
    return None
  set_host_device_count(count)
  relax_collective_timeout()
  return count


def set_host_device_count(count: int) -> None:
  """Writes the device-count flag into XLA_FLAGS, replacing any earlier count (the one place
  that does: per-core training runs and the dry run's simulated chips)."""
  kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
          if not flag.startswith(DEVICE_COUNT_FLAG)]
  os.environ["XLA_FLAGS"] = " ".join(kept + [f"{DEVICE_COUNT_FLAG}={count}"])


def relax_collective_timeout(seconds: int = COLLECTIVE_TIMEOUT_SECONDS) -> bool:
  """Adds XLA:CPU's collective termination timeout to XLA_FLAGS unless it is set already or the
  installed jaxlib does not know the flag; returns whether the flag is in XLA_FLAGS now."""
  flags = os.environ.get("XLA_FLAGS", "")
  if COLLECTIVE_TIMEOUT_FLAG in flags:
    return True
  if not xla_knows_flag(COLLECTIVE_TIMEOUT_FLAG):
    return False
  os.environ["XLA_FLAGS"] = " ".join(flags.split() + [f"{COLLECTIVE_TIMEOUT_FLAG}={seconds}"])
  return True


def xla_knows_flag(flag: str) -> bool:
  """Whether the installed jaxlib's XLA defines `flag`, found without importing jax.

  XLA aborts at start-up on a flag it does not define, and its CPU collective flags were renamed
  between releases. A defined flag's name is a string of its own in jaxlib's shared library,
  NUL on both sides; a DebugOptions field that no flag sets appears only inside the serialised
  proto descriptors, with a length prefix (jaxlib 0.10: `..._warn_stuck_seconds` is such a
  field, its flag is `..._warn_stuck_timeout_seconds`). This check needs no second process.
  False when jaxlib is not installed.
  """
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return False
  name = b"\0" + flag.lstrip("-").encode() + b"\0"
  for location in spec.submodule_search_locations:
    for path in glob.glob(os.path.join(location, "*.so")):
      try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
          if data.find(name) != -1:
            return True
      except (OSError, ValueError):  # unreadable or empty
        continue
  return False

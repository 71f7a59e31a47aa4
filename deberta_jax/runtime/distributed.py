"""The one place where a multi-process JAX run is joined (TPU pods, SLURM, explicit coordinator).

`jax.distributed.initialize()` must run before any other JAX call on every host. On a single host
with no cluster environment it is skipped, so a laptop run needs nothing.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging


def _cluster_environment() -> str | None:
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "explicit"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
    return "slurm"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return "tpu"
  return None


def initialize() -> None:
  """Joins the cluster when one is configured; a no-op on one host."""
  kind = _cluster_environment()
  if kind is None:
    return
  if kind == "explicit":
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  else:  # TPU VMs and SLURM are auto-detected by jax
    jax.distributed.initialize()
  logging.info("Joined %s cluster: process %d of %d, %d local / %d global devices", kind,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def values_per_process(value: str, width: int = 64) -> list[str]:
  """`value` (a short ASCII string, e.g. a fingerprint) as every process has it, by process index.

  One small all-gather through the devices, so it also proves that the processes can talk.
  """
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils  # multi-process runs only
  encoded = np.frombuffer(value.encode("ascii")[:width].ljust(width), dtype=np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(encoded))
  return [bytes(row).decode("ascii").rstrip() for row in gathered.reshape(-1, width)]

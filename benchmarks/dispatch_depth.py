"""A training-shaped loop on a CPU host split into 2 devices, with and without a bound on the
steps in flight (runtime/dispatch.py; results in docs/reliability.md).

  python -m benchmarks.dispatch_depth --ahead 0 --burners 2
  python -m benchmarks.dispatch_depth --ahead 1 --burners 2

Each step is one 2-device program (matmuls, then an all-gather, as a data-parallel step's
gradient exchange) followed by `--metrics` small additions on its replicated outputs, the way a
loop sums metrics between log steps. `--ahead 0` never waits (the host queues steps until XLA
stops it); `--ahead N` waits for step k - N once step k is queued. `--burners` processes spin on
the cores meanwhile, as another job on a shared machine does. A watchdog reports the step the
loop was stuck at when it makes no progress for `--stuck_after` seconds, and exits 3; otherwise
the script prints the steps per second.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time

from absl import app
from absl import flags

_AHEAD = flags.DEFINE_integer("ahead", 1, "steps left unfinished behind the newest (0: no bound)")
_STEPS = flags.DEFINE_integer("steps", 3000, "steps to run")
_METRICS = flags.DEFINE_integer("metrics", 15, "small additions per step, each its own program")
_WIDTH = flags.DEFINE_integer("width", 128, "matrix size of the step's matmuls")
_BURNERS = flags.DEFINE_integer("burners", 0, "busy processes beside the loop")
_STUCK_AFTER = flags.DEFINE_float("stuck_after", 30.0, "seconds without a finished step")


def _burn(parent: int):
  while os.getppid() == parent:  # ends with the loop, however that ends (XLA aborts a deadlock)
    pass


def _stop(burners, code: int):
  """Ends the burners and the process; os._exit, since a deadlocked XLA thread never joins."""
  for p in burners:
    p.kill()
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from deberta_jax.runtime import dispatch

  burners = [multiprocessing.Process(target=_burn, args=(os.getpid(),), daemon=True)
             for _ in range(_BURNERS.value)]
  for p in burners:
    p.start()
  mesh = jax.make_mesh((2,), ("devices",))

  def shard(x):
    for _ in range(4):
      x = jnp.tanh(x @ x) * 0.5
    return jax.lax.all_gather(x, "devices", tiled=True)[:x.shape[0]]

  @jax.jit
  def step(x):
    y = jax.shard_map(shard, mesh=mesh, in_specs=PartitionSpec("devices"),
                      out_specs=PartitionSpec("devices"), check_vma=False)(x)
    return y, {f"m{i}": jnp.mean(y) * i for i in range(_METRICS.value)}

  width = _WIDTH.value
  x = jax.device_put(jnp.eye(2 * width, width) * 0.3, NamedSharding(mesh, PartitionSpec("devices")))
  done = {"step": 0}

  def watchdog():
    last, since = -1, time.time()
    while True:
      time.sleep(1.0)
      if done["step"] != last:
        last, since = done["step"], time.time()
      elif time.time() - since > _STUCK_AFTER.value:
        print(f"ahead={_AHEAD.value} burners={_BURNERS.value}: stuck at step {last + 1} for "
              f"{_STUCK_AFTER.value:.0f} s", flush=True)
        _stop(burners, 3)

  threading.Thread(target=watchdog, daemon=True).start()
  bound = dispatch.StepsInFlight(_AHEAD.value) if _AHEAD.value else None
  sums, start = None, time.time()
  for k in range(1, _STEPS.value + 1):
    x, metrics = step(x)
    sums = metrics if sums is None else {n: sums[n] + v for n, v in metrics.items()}
    if bound is not None:
      bound.dispatched(metrics)
      done["step"] = k - _AHEAD.value
    if k % 500 == 0:
      jax.block_until_ready(sums)
      done["step"] = k
  jax.block_until_ready((x, sums))
  seconds = time.time() - start
  print(f"ahead={_AHEAD.value} burners={_BURNERS.value}: {_STEPS.value} steps in {seconds:.1f} s "
        f"({_STEPS.value / seconds:.1f} steps/s)", flush=True)
  _stop(burners, 0)


if __name__ == "__main__":
  app.run(main)

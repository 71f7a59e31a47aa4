"""How XLA:CPU treats a device that reaches a collective late (docs/reliability.md).

  python -m benchmarks.collective_stall --sleep 45
  python -m benchmarks.collective_stall --sleep 8 \
      --xla_flags="--xla_cpu_collective_call_terminate_timeout_seconds=3 \
                   --xla_cpu_collective_call_warn_stuck_timeout_seconds=1"
  python -m benchmarks.collective_stall --sleep 8 --compiler_options='{
      "xla_cpu_collective_call_terminate_timeout_seconds": 3,
      "xla_cpu_collective_call_warn_stuck_seconds": 1}'

Two CPU devices run one program: device 0 sleeps in a host callback, then both all-gather. The
other device waits at the all-gather meanwhile, as a device kept off a loaded machine's cores
makes its partners wait. XLA logs its warning and, past its termination timeout, aborts the
process (exit 134); otherwise the script prints how long the program took. `--xla_flags` go to
XLA_FLAGS before jax starts; `--compiler_options` to the program's compilation.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags

_SLEEP = flags.DEFINE_float("sleep", 45.0, "seconds device 0 sleeps before the all-gather")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "added to XLA_FLAGS before jax starts")
_COMPILER_OPTIONS = flags.DEFINE_string("compiler_options", "",
                                        "JSON object passed to compile(compiler_options=...)")


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = " ".join(
      ["--xla_force_host_platform_device_count=2", *_XLA_FLAGS.value.split()])
  os.environ["JAX_PLATFORMS"] = "cpu"
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = jax.make_mesh((2,), ("devices",))

  def late_on_device_0(index):
    if int(index) == 0:
      time.sleep(_SLEEP.value)
    return np.float32(index)

  def program(x):
    index = jax.lax.axis_index("devices")
    value = jax.pure_callback(late_on_device_0, jax.ShapeDtypeStruct((), jnp.float32), index)
    return jax.lax.all_gather(x + value, "devices", tiled=True)

  step = jax.jit(jax.shard_map(program, mesh=mesh, in_specs=PartitionSpec("devices"),
                               out_specs=PartitionSpec(), check_vma=False))
  x = jax.device_put(jnp.zeros(2), NamedSharding(mesh, PartitionSpec("devices")))
  options = json.loads(_COMPILER_OPTIONS.value) if _COMPILER_OPTIONS.value else None
  compiled = step.lower(x).compile(compiler_options=options)
  start = time.perf_counter()
  result = compiled(x).block_until_ready()
  print(f"result {result.tolist()} after {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
  app.run(main)

"""The CPU host split into one XLA device per core (deberta_jax.runtime.cpu_devices)."""

import os
import subprocess
import sys

import pytest

from configs import tiny
from deberta_jax.runtime import cpu_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(batch=16, **mesh):
  config = tiny.get_config()  # cpu_devices = 0: one per core
  config.global_batch_size = batch
  for key, value in mesh.items():
    config.mesh[key] = value
  return config


@pytest.mark.parametrize("batch, cores, mesh, want", [
    (16, 2, {}, 2),                                   # default mesh (fsdp=-1): one per core
    (16, 8, {}, 8),
    (16, 3, {}, 2),                                   # 3 does not divide 16: the largest that does
    (15, 4, {}, 3),
    (7, 4, {}, 1),
    (16, 1, {}, 1),
    (16, 8, {"per_device_microbatch": 4}, 4),         # each device needs whole micro-batches
    (16, 8, {"data": 2, "fsdp": 2, "tensor": 1}, 4),  # an explicit mesh is taken as asked
    (16, 8, {"data": -1, "fsdp": 1, "tensor": 2}, 8),
    (16, 7, {"data": -1, "fsdp": 1, "tensor": 2}, 4),  # 6 would make data=3
    (16, 2, {"data": 2, "fsdp": 1, "tensor": -1}, 2),
    (16, 8, {"cpu_devices": 3}, 3),                   # an explicit count wins
    (16, 8, {"cpu_devices": 1}, 1),                   # common.py's default: one device
    (16, 8, {"num_devices": 1}, 1),
])
def test_device_count(batch, cores, mesh, want):
  assert cpu_devices.device_count(_config(batch, **mesh), cores) == want


def _devices_seen(xla_flags, cores):
  """apply's result, the collective timeout it leaves in XLA_FLAGS ('-': none), and the device
  count jax then starts with (XLA aborts at start-up on a flag it does not define)."""
  code = ("import os, re; from configs import tiny; from deberta_jax.runtime import cpu_devices; "
          f"print(cpu_devices.apply(tiny.get_config(), cores={cores})); "
          "m = re.search(cpu_devices.COLLECTIVE_TIMEOUT_FLAG + '=(\\d+)', os.environ['XLA_FLAGS']);"
          "print(m.group(1) if m else '-'); import jax; print(jax.device_count())")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  return out.stdout.split()


def test_apply_sets_the_count_and_the_collective_timeout_before_jax_starts():
  # tiny's global batch is 16: of 3 cores, 2 devices, which wait for each other at collectives.
  timeout = (str(cpu_devices.COLLECTIVE_TIMEOUT_SECONDS)
             if cpu_devices.xla_knows_flag(cpu_devices.COLLECTIVE_TIMEOUT_FLAG) else "-")
  assert _devices_seen("", cores=3) == ["2", timeout, "2"]


@pytest.mark.parametrize("flag", [cpu_devices.COLLECTIVE_TIMEOUT_FLAG,
                                  # a DebugOptions field whose flag has another name (jaxlib 0.10)
                                  "--xla_cpu_collective_call_warn_stuck_seconds",
                                  "--xla_no_such_flag_anywhere"])
def test_xla_knows_flag_agrees_with_xla(flag):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{flag}=600"}
  started = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, text=True, timeout=300)
  assert cpu_devices.xla_knows_flag(flag) == (started.returncode == 0), started.stderr[-500:]


def test_one_device_configs_leave_the_host_alone():
  code = ("from configs import small; from deberta_jax.runtime import cpu_devices; import os; "
          "print(cpu_devices.apply(small.get_config(), cores=4), os.environ['XLA_FLAGS'] or '-')")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  assert out.stdout.split() == ["1", "-"]


def test_apply_leaves_a_count_set_in_xla_flags_alone():
  assert _devices_seen("--xla_force_host_platform_device_count=5", cores=3) == ["None", "-", "5"]

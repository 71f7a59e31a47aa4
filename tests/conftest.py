"""Test session set-up: 8 fake CPU devices, configured before anything imports jax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()


import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One corpus/tokenizer cache for the whole session: the embedded corpus is prepared once."""
  return str(tmp_path_factory.mktemp("deberta_cache"))

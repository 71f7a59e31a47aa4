"""Test session set-up: 8 fake CPU devices and XLA's collective timeout, configured before
anything imports jax, one persistent compilation cache per test process, and the longest test
files first."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# The 8 devices share 2 cores with a second test process: XLA's default collective timeout would
# abort a test whose devices wait for each other under that load (cpu_devices.py says why).
from deberta_jax.runtime import cpu_devices  # pylint: disable=wrong-import-position
cpu_devices.relax_collective_timeout()


import pytest  # pylint: disable=wrong-import-position


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One corpus/tokenizer cache for the whole session: the embedded corpus is prepared once."""
  return str(tmp_path_factory.mktemp("deberta_cache"))


@pytest.fixture(scope="session", autouse=True)
def compiled_programs_are_reused(tmp_path_factory):
  """Many tests train the tiny model with the same step program (a resumed run, the same mesh in
  another test): JAX's persistent cache, the one a restarted run uses (compilation_cache.py),
  compiles each program once per test process instead of once per `train.run`. Subprocesses
  started by tests are not affected: they set their own cache directory or none."""
  import jax  # pylint: disable=import-outside-toplevel
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  yield
  jax.config.update("jax_compilation_cache_dir", before)


# The test files by their share of the suite's time (measured seconds on 2 busy cores),
# longest first. CI runs two xdist workers that take one file at a time (--dist loadfile), in
# this order (pytest_configure turns off xdist's own order, most tests first, which started
# test_train.py last and left one worker idle for minutes): the long files start at once and the
# short ones fill in at the end. Unlisted files go last.
LONGEST_FIRST = ("test_train.py",            # ~410 s
                 "test_reliability.py",      # ~340
                 "test_flash_attention.py",  # ~280
                 "test_sharding.py",         # ~260
                 "test_rtd.py",              # ~210
                 "test_run_outputs.py",      # ~150 (~80 with the corpus already prepared)
                 "test_holdout.py",          # ~120
                 "test_gcs_tools.py",        # ~105
                 "test_hf_parity.py",        # ~100
                 "test_finetune_hosts.py",   # ~85
                 "test_init_from.py",        # ~80
                 "test_layers.py",           # ~100
                 "test_gdes_study.py",       # ~60
                 "test_gcs_faults.py",       # ~50
                 "test_bench.py",            # ~65
                 "test_finetune.py",         # ~50
                 "test_prepare_faults.py",   # ~35
                 "test_vocab_blocks.py")     # ~25


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist present (it is optional)
    config.option.loadscopereorder = False

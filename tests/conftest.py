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
  another test file): JAX's persistent cache, the one a restarted run uses
  (compilation_cache.py), compiles each program once per test session instead of once per
  `train.run`. One directory serves every xdist worker (the parent of the workers' base temp
  directories), as one gs:// cache serves the hosts of a pod run. Subprocesses started by tests
  are not affected: they set their own cache directory or none."""
  import jax  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # pytest-of-USER/pytest-N/, shared by popen-gw0, popen-gw1, ...
  shared = root / "xla_cache_shared"
  shared.mkdir(exist_ok=True)
  before = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(shared))
  yield
  jax.config.update("jax_compilation_cache_dir", before)


# The test files by their share of the suite's time (seconds of `pytest -n 2` on 2 cores, summed
# per file from --junitxml, with one compilation cache per worker), longest first. CI runs xdist
# workers that take one file at a time (--dist loadfile), in this order (pytest_configure turns
# off xdist's own order, most tests first, which started test_train.py last and left a worker
# idle for minutes): the long files start at once and the short ones fill in at the end, so the
# workers finish together. A file missing here goes last, where a long one holds up the end: add
# new files by their time.
LONGEST_FIRST = ("test_train.py",           # ~314 s
                 "test_reliability.py",     # ~283
                 "test_sharding.py",        # ~154
                 "test_flash_attention.py", # ~152
                 "test_rtd.py",             # ~141
                 "test_gdes_study.py",      # ~106
                 "test_gcs_faults.py",      # ~88
                 "test_gcs.py",             # ~80
                 "test_layers.py",          # ~80
                 "test_hf_parity.py",       # ~72
                 "test_run_outputs.py",     # ~71
                 "test_analyze.py",         # ~57
                 "test_finetune_hosts.py",  # ~47
                 "test_bench.py",           # ~39
                 "test_finetune.py",        # ~37
                 "test_holdout.py",         # ~37
                 "test_init_from.py",       # ~33
                 "test_gcs_tools.py",       # ~31
                 "test_data.py",            # ~23
                 "test_prepare_faults.py",  # ~18
                 "test_checkpointing.py",   # ~17
                 "test_data_hosts.py",      # ~17
                 "test_vocab_blocks.py",    # ~16
                 "test_release_import.py",  # ~13
                 "test_cpu_devices.py")     # ~10


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist present (it is optional)
    config.option.loadscopereorder = False

"""gs:// through faults: every client (gcsfs for data, prepare, metrics and TensorBoard; tensorstore
for checkpoints; jax's compilation cache) talks to the GCS API server of tests/gcs_server.py
through tests/gcs_proxy.py, which delays requests, answers some 503 / 429 and resets some reads
mid-body. The end state must be the same as without faults: they are retried, never absorbed
into the data."""

import contextlib
import json
import os
import subprocess
import sys
import uuid

import chex
import fsspec
import jax
import numpy as np
import pytest

from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.runtime import checkpointing
from tests.gcs_proxy import FaultProxy
from tests.gcs_server import gcs_bucket, gcs_dir, gcs_server  # noqa: F401  pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = [f"Line {i} says {'north south east west ' * (i % 5 + 1)}then ends." for i in range(450)]
# Every request is delayed; every 7th of each client fails (503, 429, a reset mid-body, in turn),
# once each per client: a first retry waits about a second, and the test's time must stay
# bounded.
FAULTS = {"delay_s": 0.002, "every": 7, "max_faults": 1}
NO_FAULTS = {"delay_s": 0.0, "every": 0, "error_rate": 0.0, "reset_rate": 0.0,
             "max_faults": None}
INJECTED = ("http_503", "http_429", "resets")


@pytest.fixture(scope="module")
def proxy(gcs_server):  # pylint: disable=redefined-outer-name
  p = FaultProxy(gcs_server.endpoint, seed=7).start()
  yield p
  p.stop()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  return tokenizer_lib.train_spm(corpus_lib.embedded_documents(200_000), 500,
                                 str(tmp_path_factory.mktemp("faults_spm") / "spm"))


def _run(command, env_extra, timeout=300):
  res = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, check=False,
                       env=dict(os.environ, XLA_FLAGS="", **env_extra))
  assert res.returncode == 0, res.stderr[-4000:]
  return res


def _prepare(corpus, out, spm_path, env_extra, workers):
  return _run(["deberta_jax.prepare", "--config=configs/tiny.py", f"--out={out}",
               "--config.data.source=text_files", f"--config.data.text_files={corpus}/*.txt",
               f"--config.data.spm_model={spm_path}", "--config.model.vocab_size=512",
               "--config.seq_len=32", "--config.data.part_mb=0.004", f"--num_workers={workers}"],
              env_extra)


@pytest.fixture(scope="module")
def prepared(gcs_bucket, proxy, spm):  # pylint: disable=redefined-outer-name
  """(corpus dir, dataset prepared from it without faults), both on gs://."""
  root = f"{gcs_bucket}/faults-{uuid.uuid4().hex[:8]}"
  fs = fsspec.filesystem("gs")
  for i in range(3):
    fs.pipe_file(f"{root}/corpus/part{i}.txt", ("\n".join(LINES[i::3]) + "\n").encode())
  proxy.set_faults(**NO_FAULTS)
  _prepare(f"{root}/corpus", f"{root}/prepared", spm, proxy.env(), workers=1)
  return f"{root}/corpus", f"{root}/prepared"


@contextlib.contextmanager
def _faults(proxy):  # pylint: disable=redefined-outer-name
  """Injects FAULTS in the block; yields the counts of each kind injected (filled on exit)."""
  before = dict(proxy.counts)
  injected = {}
  proxy.set_faults(**FAULTS)
  try:
    yield injected
  finally:
    proxy.set_faults(**NO_FAULTS)
    injected.update({k: v - before.get(k, 0) for k, v in proxy.counts.items()
                     if k.startswith(INJECTED) and v > before.get(k, 0)})
    injected["requests"] = proxy.counts["requests"] - before.get("requests", 0)


def test_prepare_to_gcs_through_faults_writes_the_same_manifest(gcs_dir, proxy, spm, prepared):
  corpus, clean_dir = prepared
  with _faults(proxy) as injected:
    _prepare(corpus, f"{gcs_dir}/faulty", spm, proxy.env(), workers=2)
  assert all(injected.get(f"{k}_gcsfs") for k in INJECTED), injected
  fs = fsspec.filesystem("gs")
  clean = json.loads(fs.cat_file(f"{clean_dir}/manifest.json"))
  faulty = json.loads(fs.cat_file(f"{gcs_dir}/faulty/manifest.json"))
  assert len(clean["shards"]) >= 4
  assert faulty == clean
  for shard in clean["shards"]:
    assert (fs.cat_file(f"{gcs_dir}/faulty/{shard['file']}")
            == fs.cat_file(f"{clean_dir}/{shard['file']}"))


def test_training_on_gcs_through_faults_ends_bit_identical(gcs_dir, proxy, prepared):
  """Prepared data, workdir (checkpoints through tensorstore, metrics, TensorBoard) and the
  compilation cache on gs://; the same 3 steps (checkpoints at 2 and 3) without and with faults
  end with the same parameters and metrics. (No evaluation: its program would double the
  compile time; tests/test_gcs.py runs it on gs://.)"""
  _, data = prepared

  def train(workdir):
    _run(["deberta_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          "--config.num_train_steps=3", "--config.log.every_steps=1",
          "--config.ckpt.every_steps=2", "--config.global_batch_size=4",
          "--config.eval.every_steps=0", "--config.mesh.cpu_devices=1",
          f"--config.compilation_cache_dir={gcs_dir}/xla", "--config.data.source=prepared",
          f"--config.data.prepared_dir={data}", "--config.model.vocab_size=512",
          "--config.seq_len=32"], proxy.env(), timeout=600)

  train(f"{gcs_dir}/clean")
  with _faults(proxy) as injected:
    train(f"{gcs_dir}/faulty")
  # Both the data, metrics and compilation-cache client (gcsfs) and the checkpoints'
  # (tensorstore) met every kind of fault.
  assert all(injected.get(f"{k}_{c}") for k in INJECTED for c in ("gcsfs", "tensorstore")), (
      injected)
  fs = fsspec.filesystem("gs")

  def metrics(workdir):
    records = [json.loads(line) for line in
               fs.cat_file(f"{workdir}/metrics.jsonl").decode().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]

  clean, faulty = metrics(f"{gcs_dir}/clean"), metrics(f"{gcs_dir}/faulty")
  assert [m["step"] for m in clean] == [1, 2, 3] and len(clean[-1]) > 3, clean
  assert faulty == clean
  step_a, params_a = checkpointing.load_params(f"{gcs_dir}/clean")
  step_b, params_b = checkpointing.load_params(f"{gcs_dir}/faulty")
  assert step_a == step_b == 3
  chex.assert_trees_all_equal(params_a, params_b)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params_a))
  print("faults injected in the training run:", injected)


def test_prepare_reads_shard_records_concurrently(proxy, prepared, spm):
  """A rerun of `prepare` over a finished gs:// dataset reads every shard record (to skip the
  done shards, then to write the manifest): at a round trip per record it must not read them one
  after another (2,400 records at 160 GB)."""
  from deberta_jax.data import preparation  # pylint: disable=import-outside-toplevel
  from deberta_jax.data import shards  # pylint: disable=import-outside-toplevel
  from tests import gcs_server as gcs_server_lib  # pylint: disable=import-outside-toplevel
  corpus, data = prepared
  expected = shards.read_manifest(data)
  try:
    with pytest.MonkeyPatch.context() as mp:
      gcs_server_lib.point_clients_at(proxy, mp)  # this process's gcsfs through the proxy too
      proxy.set_faults(**{**NO_FAULTS, "delay_s": 0.05})
      proxy.counts["max_in_flight"] = 0
      manifest = preparation.prepare(
          corpus_lib.text_file_corpus(f"{corpus}/*.txt"), tokenizer_lib.Tokenizer(spm), 32,
          data, vocab_size=512, part_bytes=int(0.004 * (1 << 20)), num_workers=1,
          progress=False)
  finally:
    proxy.set_faults(**NO_FAULTS)
    gcs_server_lib.clear_filesystem_caches()  # no filesystem bound to the proxy outlives it
  assert manifest == expected  # nothing was prepared again
  assert len(expected["shards"]) >= 4
  assert proxy.counts["max_in_flight"] >= 4, dict(proxy.counts)

"""gs:// through faults: every client (gcsfs for data, prepare, metrics and TensorBoard; tensorstore
for checkpoints; jax's compilation cache) talks to the GCS API server of tests/gcs_server.py
through tests/gcs_proxy.py, which delays requests, answers some 503 / 429 and resets some reads
mid-body. The end state must be the same as without faults: they are retried, never absorbed
into the data."""

import contextlib
import json
import os
import subprocess
import threading
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


def _reader_of(prepared_dir, proxy, mp, **kwargs):  # pylint: disable=redefined-outer-name
  """A RangeReader of `prepared_dir`'s shards through the proxy, and the shards' names."""
  from deberta_jax.data import shards  # pylint: disable=import-outside-toplevel
  from deberta_jax.data import storage  # pylint: disable=import-outside-toplevel
  from tests import gcs_server as gcs_server_lib  # pylint: disable=import-outside-toplevel
  gcs_server_lib.point_clients_at(proxy, mp)
  names = [s["file"] for s in shards.read_manifest(prepared_dir)["shards"]]
  return storage.RangeReader([f"{prepared_dir}/{n}" for n in names], **kwargs), names


def test_a_read_outlasting_gcsfs_retries_is_tried_again_within_the_bound(proxy, prepared):
  """An object that fails longer than gcsfs's own retries (6 attempts over 31-36 s): a reader
  with config.data.read_retry_minutes left gets the right bytes after trying again with backoff;
  a reader whose bound has passed stops with a DataError naming the object and byte range (both
  meet the same outage at once, so the test waits it out once)."""
  from deberta_jax.data import DataError  # pylint: disable=import-outside-toplevel
  from deberta_jax.data import storage  # pylint: disable=import-outside-toplevel
  from tests import gcs_server as gcs_server_lib  # pylint: disable=import-outside-toplevel
  _, data = prepared
  try:
    with pytest.MonkeyPatch.context() as mp:
      patient, names = _reader_of(data, proxy, mp, retry_minutes=2.0)
      impatient, _ = _reader_of(data, proxy, mp, retry_minutes=0.0)
      expected = storage.read_range(f"{data}/{names[0]}", 128, 256)
      proxy.set_faults(**NO_FAULTS)
      proxy.fail_object(names[0], 8)   # gcsfs's 6 attempts, then 2 more of the retry's
      proxy.fail_object(names[1], 6)   # exactly gcsfs's attempts
      outcome = {}

      def read(name, reader, index):
        try:
          outcome[name] = reader.read([(index, 128, 128)])[0]
        except DataError as e:
          outcome[name] = e
      threads = [threading.Thread(target=read, args=("patient", patient, 0)),
                 threading.Thread(target=read, args=("impatient", impatient, 1))]
      for t in threads:
        t.start()
      for t in threads:
        t.join(240)
  finally:
    proxy.set_faults(**NO_FAULTS)
    gcs_server_lib.clear_filesystem_caches()
  assert outcome["patient"] == expected
  assert patient.retries >= 1 and patient.requests == 1 + patient.retries
  error = outcome["impatient"]
  assert isinstance(error, DataError), error
  assert f"{data}/{names[1]} bytes [128, 256)" in str(error), error
  assert "read_retry_minutes=0" in str(error) and "503" in str(error), error
  assert impatient.retries == 0
  print("the impatient reader's error:", error)
  assert proxy.counts["http_503_outage"] >= 14, dict(proxy.counts)


def test_read_connections_bound_the_requests_in_flight(proxy, prepared):
  """config.data.read_connections is the loader client's pool: with 2 connections no more than
  2 requests are in flight however many ranges one call asks for; with 16 they overlap."""
  from tests import gcs_server as gcs_server_lib  # pylint: disable=import-outside-toplevel
  _, data = prepared
  peaks = {}
  try:
    with pytest.MonkeyPatch.context() as mp:
      for connections in (2, 16):
        reader, names = _reader_of(data, proxy, mp, connections=connections)
        proxy.set_faults(**{**NO_FAULTS, "delay_s": 0.1})
        proxy.counts["max_in_flight"] = 0
        got = reader.read([(i % len(names), 128 + 32 * (i // len(names)), 32)
                           for i in range(12)])
        assert all(len(g) == 32 for g in got)
        peaks[connections] = proxy.counts["max_in_flight"]
  finally:
    proxy.set_faults(**NO_FAULTS)
    gcs_server_lib.clear_filesystem_caches()
  assert peaks[2] == 2 and peaks[16] >= 8, peaks


def test_only_transient_failures_are_retried():
  import aiohttp  # pylint: disable=import-outside-toplevel
  from gcsfs.retry import HttpError  # pylint: disable=import-outside-toplevel
  from deberta_jax.data import retry  # pylint: disable=import-outside-toplevel
  transient = [HttpError({"code": 503, "message": "x"}), HttpError({"code": 429, "message": "x"}),
               aiohttp.ClientPayloadError("reset"), ConnectionResetError(), TimeoutError()]
  permanent = [FileNotFoundError("gone"), PermissionError("no"),
               HttpError({"code": 403, "message": "x"}), ValueError("bug")]
  assert [retry.is_transient(e) for e in transient] == [True] * len(transient)
  assert [retry.is_transient(e) for e in permanent] == [False] * len(permanent)
  delays = [retry.delay_before(n) for n in range(1, 10)]
  assert 0.5 <= delays[0] <= 1.0 and 30.0 <= delays[-1] <= 60.0

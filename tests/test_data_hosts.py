"""Two real JAX processes on 127.0.0.1 (CPU) read one prepared dataset: each reads only its rows,
the rows of a step are disjoint, an epoch reads every sequence once, and processes that were
handed different datasets refuse to start (naming both fingerprints)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import preparation
from deberta_jax.data import shards
from deberta_jax.data import spm as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, GLOBAL_BATCH = 16, 10

_WORKER = r'''
import json, sys
pid, port, directory, steps, out = (int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                    sys.argv[5])
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
import ml_collections
import numpy as np
from deberta_jax.data import DataError
from deberta_jax.data import pipeline
from deberta_jax.pretraining.train import check_hosts_read_one_dataset

config = ml_collections.ConfigDict({
    "seed": 3, "seq_len": 16, "global_batch_size": 10, "model": {"vocab_size": 512},
    "data": {"source": "prepared", "prepared_dir": directory, "read_threads": 4,
             "prefetch_batches": 4}})
p = pipeline.make_pipeline(config, jax.process_index(), jax.process_count())
try:
  check_hosts_read_one_dataset(p.fingerprint)
except DataError as e:
  print("RESULT " + json.dumps({"pid": pid, "error": str(e)}), flush=True)
  sys.exit(2)
np.save(out, np.stack([p.next_batch()["input_ids"] for _ in range(steps)]))
print("RESULT " + json.dumps({"pid": pid, "rows": len(p.rows), "state": p.state()}), flush=True)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_pair(tmp_path, directories, steps):
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, str(worker), str(pid), str(port), directories[pid],
                             str(steps), str(tmp_path / f"rows{pid}.npy")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in (0, 1)]
  results = {}
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=240)
      lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
      assert lines, out[-3000:]
      result = json.loads(lines[-1][len("RESULT "):])
      results[result["pid"]] = (proc.returncode, result)
  finally:
    for proc in procs:  # a hung process must not outlive the test
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return results


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
  """Two prepared datasets of unique rows: `a`, and `b` with one line more."""
  root = tmp_path_factory.mktemp("hosts")
  spm = tokenizer_lib.train_spm(corpus_lib.embedded_documents(200_000), 500, str(root / "spm"))
  tok = tokenizer_lib.Tokenizer(spm)
  out = {}
  for name, count in (("a", 150), ("b", 151)):
    text = root / f"{name}.txt"
    # Short numbered lines: every 14-piece row holds a number no other row holds.
    text.write_text("".join(f"row {i:04d} ok\n" for i in range(count)))
    corpus = corpus_lib.text_file_corpus(str(text))
    preparation.prepare(corpus, tok, SEQ_LEN, str(root / name), vocab_size=512, progress=False)
    out[name] = str(root / name)
  return out


@pytest.mark.slow
def test_two_processes_read_disjoint_rows_and_each_once_per_epoch(tmp_path, datasets):
  manifest = shards.read_manifest(datasets["a"])
  rows = np.concatenate([np.load(os.path.join(datasets["a"], s["file"]))
                         for s in manifest["shards"]]).astype(np.int32)
  n = len(rows)
  index = {r.tobytes(): i for i, r in enumerate(rows)}
  assert len(index) == n > GLOBAL_BATCH  # unique rows: content identifies the row
  steps = -(-n // GLOBAL_BATCH) + 1  # a whole epoch and into the next
  results = _run_pair(tmp_path, [datasets["a"], datasets["a"]], steps)
  for pid in (0, 1):
    code, result = results[pid]
    assert code == 0, result
    assert result["state"]["examples_seen"] == steps * GLOBAL_BATCH
    assert result["state"]["dataset_fingerprint"] == manifest["fingerprint"]
  local = [np.load(tmp_path / f"rows{pid}.npy") for pid in (0, 1)]
  assert local[0].shape == (steps, GLOBAL_BATCH // 2, SEQ_LEN)
  read = [[[index[r.tobytes()] for r in local[pid][s]] for pid in (0, 1)] for s in range(steps)]
  order = []
  for step, (mine, theirs) in enumerate(read):
    if (step + 1) * GLOBAL_BATCH <= n:  # within one epoch: no row on both processes
      assert not set(mine) & set(theirs), (step, mine, theirs)
    order += mine + theirs
  assert sorted(order[:n]) == list(range(n))  # the first epoch: every sequence exactly once
  assert sorted(order[n:2 * n]) == sorted(set(order[n:2 * n]))  # the next starts anew


@pytest.mark.slow
def test_processes_with_different_datasets_refuse_to_start(tmp_path, datasets):
  results = _run_pair(tmp_path, [datasets["a"], datasets["b"]], steps=1)
  fingerprints = [shards.read_manifest(datasets[k])["fingerprint"] for k in "ab"]
  assert fingerprints[0] != fingerprints[1]
  for pid in (0, 1):
    code, result = results[pid]
    assert code == 2, result
    assert f"process 0: {fingerprints[0]}" in result["error"]
    assert f"process 1: {fingerprints[1]}" in result["error"]

"""gs:// for every path of the data path, against a real GCS JSON-API server on 127.0.0.1
(fake-gcs-server, tests/gcs_server.py): corpus globs, spm model, cache dir, prepared dir, the
tokenizer's input and output, and reading a prepared dataset row by row over ranged requests."""

import json
import os
import subprocess
import sys

import chex
import fsspec
import ml_collections
import pytest

from deberta_jax.data import DataError
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.data import shards
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.data import storage
from tests.gcs_server import gcs_bucket, gcs_dir, gcs_server  # noqa: F401  pylint: disable=unused-import

# Held-out batches per evaluation in the gs:// training run and in `analyze heldout` of its
# checkpoint: a few are enough to compare the two, and every whole batch is tested elsewhere.
EVAL_BATCHES = 8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINES = [f"Sentence {i} talks about {'alpha beta gamma ' * (i % 6 + 1)}and stops." for i in range(600)]


def _config(cache_dir, **data):
  c = ml_collections.ConfigDict()
  c.seed, c.seq_len, c.global_batch_size = 1, 32, 8
  c.model = ml_collections.ConfigDict({"vocab_size": 512})
  c.data = ml_collections.ConfigDict({"cache_dir": str(cache_dir), "spm_vocab_size": 500,
                                      "part_mb": 0.01, "read_threads": 4, "prefetch_batches": 4,
                                      **data})
  return c


def _upload(local_dir, remote_dir):
  fs = fsspec.filesystem("gs")
  for name in sorted(os.listdir(local_dir)):
    fs.put_file(os.path.join(local_dir, name), f"{remote_dir}/{name}")


@pytest.fixture(scope="module")
def local_corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("gcs_corpus")
  for i in range(3):
    (d / f"part{i}.txt").write_text("\n".join(LINES[i::3]) + "\n")
  spm = tokenizer_lib.train_spm(corpus_lib.embedded_documents(200_000), 500,
                                str(tmp_path_factory.mktemp("gcs_spm") / "spm"))
  return d, spm


def _batches(pipeline, n=6):
  return [pipeline.next_batch() for _ in range(n)]


def test_text_files_spm_and_cache_on_gcs_give_the_local_batches(gcs_dir, local_corpus, tmp_path):
  corpus_dir, spm = local_corpus
  _upload(corpus_dir, f"{gcs_dir}/corpus")
  fsspec.filesystem("gs").put_file(spm, f"{gcs_dir}/spm.model")
  local = pipeline_lib.make_pipeline(_config(tmp_path, source="text_files",
                                             text_files=str(corpus_dir / "*.txt"), spm_model=spm))
  remote = pipeline_lib.make_pipeline(_config(
      f"{gcs_dir}/cache", source="text_files", text_files=f"{gcs_dir}/corpus/*.txt",
      spm_model=f"{gcs_dir}/spm.model"))
  assert remote.rows.directory.startswith(f"{gcs_dir}/cache/prepared/")
  assert storage.exists(f"{remote.rows.directory}/manifest.json")
  assert remote.fingerprint == local.fingerprint  # the rows, not where they are
  chex.assert_trees_all_equal(_batches(remote), _batches(local))


def test_prepare_cli_writes_to_gcs_and_training_reads_it(gcs_dir, local_corpus, tmp_path):
  """The entry point in a fresh interpreter (the server reached through its environment
  variables), output on gs://; a rerun skips every shard; the loader reads it remotely."""
  corpus_dir, spm = local_corpus
  _upload(corpus_dir, f"{gcs_dir}/corpus")
  out = f"{gcs_dir}/prepared"
  command = [sys.executable, "-m", "deberta_jax.prepare", "--config=configs/tiny.py",
             f"--out={out}", "--config.data.source=text_files",
             f"--config.data.text_files={gcs_dir}/corpus/*.txt", f"--config.data.spm_model={spm}",
             "--config.model.vocab_size=512", "--config.seq_len=32", "--config.data.part_mb=0.01",
             "--num_workers=2"]
  first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
  assert first.returncode == 0, first.stderr[-3000:]
  summary = json.loads(first.stdout.strip().splitlines()[-1])
  assert summary["complete"] and summary["shards"] >= 3
  again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
  assert again.returncode == 0 and f"{summary['shards']} already done" in again.stderr
  manifest = shards.read_manifest(out)
  shards.verify_checksums(out, manifest)
  remote = pipeline_lib.make_pipeline(_config(tmp_path, source="prepared", prepared_dir=out))
  local = pipeline_lib.make_pipeline(_config(tmp_path, source="text_files",
                                             text_files=str(corpus_dir / "*.txt"), spm_model=spm))
  assert remote.fingerprint == local.fingerprint == summary["fingerprint"]
  chex.assert_trees_all_equal(_batches(remote), _batches(local))
  bench = subprocess.run([sys.executable, "-m", "deberta_jax.data_bench", f"--prepared_dir={out}",
                          "--batch=16", "--batches=5", "--read_threads=4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert bench.returncode == 0, bench.stderr[-3000:]
  assert json.loads(bench.stdout.strip().splitlines()[-1])["tokens_per_second"] > 0


def test_tokenizer_trains_from_and_to_gcs(gcs_dir, local_corpus):
  corpus_dir, _ = local_corpus
  _upload(corpus_dir, f"{gcs_dir}/corpus")
  res = subprocess.run(
      [sys.executable, "-m", "deberta_jax.tokenizer", "train", f"--input={gcs_dir}/corpus/*.txt",
       "--vocab_size=80", f"--model_prefix={gcs_dir}/spm/m", "--max_sentences=300"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  tok = tokenizer_lib.Tokenizer(f"{gcs_dir}/spm/m.model")
  assert tok.num_pieces == 80 and "config.model.vocab_size=128" in res.stdout
  assert storage.exists(f"{gcs_dir}/spm/m.vocab")


def test_missing_gcs_paths_are_named(gcs_dir, tmp_path):
  with pytest.raises(DataError, match="matches no file"):
    pipeline_lib.make_pipeline(_config(tmp_path, source="text_files",
                                       text_files=f"{gcs_dir}/nothing/*.txt"))
  with pytest.raises(DataError, match="has no manifest.json"):
    pipeline_lib.make_pipeline(_config(tmp_path, source="prepared",
                                       prepared_dir=f"{gcs_dir}/absent"))
  with pytest.raises(DataError, match="spm_model"):
    pipeline_lib.make_pipeline(_config(tmp_path, source="text_files",
                                       text_files=f"{gcs_dir}/nothing/*.txt",
                                       spm_model=f"{gcs_dir}/none.model"))


def test_tfds_data_dir_on_gcs(gcs_dir, local_corpus, tmp_path):
  """A tfds array_record dataset in a gs:// data_dir (array_record's own GCS client reads it)."""
  _, spm = local_corpus
  builder_dir = corpus_lib.write_tfds_text_dataset(
      "deberta_jax_gcs_corpus", lambda: LINES[:200], str(tmp_path / "tfds"))
  relative = os.path.relpath(builder_dir, tmp_path / "tfds")
  _upload(builder_dir, f"{gcs_dir}/tfds/{relative}")
  remote = pipeline_lib.make_pipeline(_config(
      tmp_path / "cache-remote", source="tfds", tfds_name="deberta_jax_gcs_corpus",
      tfds_data_dir=f"{gcs_dir}/tfds", spm_model=spm))
  local = pipeline_lib.make_pipeline(_config(
      tmp_path / "cache-local", source="tfds", tfds_name="deberta_jax_gcs_corpus",
      tfds_data_dir=str(tmp_path / "tfds"), spm_model=spm))
  assert remote.fingerprint == local.fingerprint
  chex.assert_trees_all_equal(_batches(remote, 2), _batches(local, 2))


def test_training_with_workdir_data_and_compilation_cache_on_gcs(gcs_dir, local_corpus):
  """The trainer with everything on gs://: prepared data, workdir (orbax checkpoints through
  tensorstore, metrics, TensorBoard events) and the XLA compilation cache; a second invocation
  resumes from the gs:// checkpoint and loads its step program from the gs:// cache; `analyze
  heldout` re-evaluates the gs:// checkpoint."""
  corpus_dir, spm = local_corpus
  _upload(corpus_dir, f"{gcs_dir}/corpus")
  data = ["--config.data.source=prepared", f"--config.data.prepared_dir={gcs_dir}/prepared",
          "--config.model.vocab_size=512", "--config.seq_len=32"]
  prepare = subprocess.run(
      [sys.executable, "-m", "deberta_jax.prepare", "--config=configs/tiny.py",
       f"--out={gcs_dir}/prepared", "--config.data.source=text_files",
       f"--config.data.text_files={gcs_dir}/corpus/*.txt", f"--config.data.spm_model={spm}",
       "--config.model.vocab_size=512", "--config.seq_len=32"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert prepare.returncode == 0, prepare.stderr[-3000:]
  workdir = f"{gcs_dir}/run"

  def train(steps):
    res = subprocess.run(
        [sys.executable, "-m", "deberta_jax.main", "--config=configs/tiny.py",
         f"--workdir={workdir}", f"--config.num_train_steps={steps}",
         "--config.log.every_steps=1", "--config.ckpt.every_steps=2", "--config.global_batch_size=4",
         "--config.mesh.cpu_devices=1", f"--config.compilation_cache_dir={gcs_dir}/xla",
         f"--config.eval.num_batches={EVAL_BATCHES}", *data],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        env=dict(os.environ, XLA_FLAGS=""))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr

  train(2)
  fs = fsspec.filesystem("gs")
  assert fs.exists(f"{workdir}/checkpoints/2/commit_success.txt")
  assert fs.ls(f"{gcs_dir}/xla"), "no compiled program in the gs:// cache"
  log = train(3)
  assert "Resumed from step 2" in log
  metrics = [json.loads(l) for l in fs.cat_file(f"{workdir}/metrics.jsonl").decode().splitlines()]
  assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # 0: the held-out evaluation
  assert "eval_mlm_loss" in metrics[0] and "eval_mlm_loss" in metrics[-1]
  assert json.loads(fs.cat_file(f"{workdir}/checkpoints/2/meta/metadata"))["data"][
      "dataset_fingerprint"] == shards.read_manifest(f"{gcs_dir}/prepared")["fingerprint"]

  # The held-out evaluation of the gs:// checkpoint, read back by `analyze heldout` over as many
  # batches as the run evaluates, is the run's last logged one.
  heldout = subprocess.run(
      [sys.executable, "-m", "deberta_jax.analyze", "heldout", f"--workdir={workdir}",
       f"--num_batches={EVAL_BATCHES}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False, env=dict(os.environ, XLA_FLAGS=""))
  assert heldout.returncode == 0, heldout.stderr[-3000:]
  again = json.loads(heldout.stdout.strip().splitlines()[-1])
  assert again["step"] == 3 and again["workdir"] == workdir
  logged = {k: v for k, v in metrics[-1].items() if k.startswith("eval_")}
  chex.assert_trees_all_close({k: again[k] for k in logged}, logged, rtol=1e-6)

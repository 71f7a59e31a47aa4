"""Faults during and after preparation: a worker killed (the out-of-memory killer's SIGKILL),
SIGTERM, leftovers of a killed run, a spm.model or id dtype of another attempt in the output
directory, a shard that vanishes under a gs:// reader, and hosts of a shared preparation that
never finish. Workers are killed for real (found through /proc), SIGTERM is sent to the real
command, and gs:// is the GCS API server the suite starts on 127.0.0.1."""

import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import fsspec
import ml_collections
import numpy as np
import pytest
import sentencepiece

from deberta_jax import config as config_lib
from deberta_jax.data import DataError
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.data import preparation
from deberta_jax.data import shards
from deberta_jax.data import spm as tokenizer_lib
from tests.gcs_server import gcs_bucket, gcs_dir, gcs_server  # noqa: F401  pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()
PART_MB = 0.25
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds workers in /proc")


def _write_corpus(directory, files, lines_per_file, seed=0):
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  for f in range(files):
    with open(os.path.join(directory, f"{f}.txt"), "w") as fh:
      for i in range(lines_per_file):
        fh.write(" ".join(rng.choice(WORDS) for _ in range(12)) + f" {i}.\n")
  return os.path.join(directory, "*.txt")


def _word_spm(path, pieces, words):
  """An spm model with the DeBERTaV3 layout whose pieces are whole words (trains in a blink even
  with 65k pieces, unlike a unigram model)."""
  model = io.BytesIO()
  lines = [" ".join(words[i:i + 10]) for i in range(0, len(words), 10)]
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=pieces, model_type="word",
      pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
      eos_piece="[SEP]", unk_piece="[UNK]", minloglevel=2, num_threads=1)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("faults_spm") / "m"
  return tokenizer_lib.train_spm(corpus_lib.embedded_documents(200_000), 500, str(prefix))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """About 1 MB of text in 2 files: 4 parts of PART_MB."""
  return _write_corpus(str(tmp_path_factory.mktemp("small")), 2, 7000)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
  """About 8 MB of text: 32 parts, a few seconds of work for 2 workers."""
  return _write_corpus(str(tmp_path_factory.mktemp("large")), 2, 60000, seed=1)


def _config(text_files, spm_model, **data):
  c = ml_collections.ConfigDict()
  c.seed, c.seq_len, c.global_batch_size = 0, 64, 8
  c.model = ml_collections.ConfigDict({"vocab_size": 512})
  c.data = ml_collections.ConfigDict({"source": "text_files", "text_files": text_files,
                                      "spm_model": spm_model, "part_mb": PART_MB, **data})
  return c


def _reference_fingerprint(text_files, spm_model, out):
  """The manifest fingerprint of an uninterrupted, single-process preparation."""
  config = _config(text_files, spm_model)
  manifest = preparation.prepare(
      corpus_lib.corpus_from_config(config), tokenizer_lib.Tokenizer(spm_model), 64, str(out),
      vocab_size=512, part_bytes=pipeline_lib.part_bytes(config), progress=False)
  return manifest["fingerprint"]


def _command(text_files, spm_model, out, workers=2):
  return [sys.executable, "-m", "deberta_jax.prepare", "--config=configs/tiny.py", f"--out={out}",
          "--config.data.source=text_files", f"--config.data.text_files={text_files}",
          f"--config.data.spm_model={spm_model}", "--config.model.vocab_size=512",
          "--config.seq_len=64", f"--config.data.part_mb={PART_MB}", f"--num_workers={workers}"]


def _proc_stat(pid):
  """(ppid, session) of a running process; None once it is gone or a zombie (it has exited and
  waits for its parent, possibly a container's init, to collect its exit code)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[3]))
  except (OSError, IndexError, ValueError):
    return None


def _spawned_workers(field: int, value: int):
  """multiprocessing's spawned interpreters whose /proc stat `field` (0: parent pid, 1: session)
  is `value` (the resource tracker is no worker: it ends once every process holding its pipe
  has exited)."""
  found = []
  for entry in os.listdir("/proc"):
    stat = _proc_stat(int(entry)) if entry.isdigit() else None
    if stat and stat[field] == value:
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if b"spawn_main" in f.read():
            found.append(int(entry))
      except OSError:
        pass
  return found


def _workers_of(pid):
  """The spawned workers whose parent is `pid`."""
  return _spawned_workers(0, pid)


def _workers_in_session(session):
  """Spawned workers still running in a session."""
  return _spawned_workers(1, session)


class _Killer:
  """A thread that SIGKILLs the preparation workers of process `pid`: every one it sees, or only
  the first `limit`."""

  def __init__(self, pid, limit=None):
    self.pid, self.limit, self.killed = pid, limit, []
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._done.is_set() and (self.limit is None or len(self.killed) < self.limit):
      for worker in _workers_of(self.pid):
        if worker not in self.killed and (self.limit is None or len(self.killed) < self.limit):
          os.kill(worker, signal.SIGKILL)
          self.killed.append(worker)
      time.sleep(0.01)

  def stop(self):
    self._done.set()
    self._thread.join()


def _run_killed(command, limit, timeout=180):
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
  killer = _Killer(process.pid, limit)
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    pytest.fail(f"preparation did not end within {timeout} s after its workers were killed "
                f"({len(killer.killed)} killed)")
  finally:
    killer.stop()
  return process.returncode, out, err, killer.killed


# ------------------------------------------------------------------------------ dead workers


@needs_proc
def test_killed_workers_end_the_run_naming_the_part(tmp_path, small, spm):
  """Every worker is SIGKILLed as soon as it appears: the part's retry dies too, and the run ends
  with exit code 2 and one line naming the part (file and byte range), never hanging."""
  out = tmp_path / "out"
  code, _, err, killed = _run_killed(_command(small, spm, out), limit=None)
  assert code == 2, err[-3000:]
  assert len(killed) >= preparation.MAX_ATTEMPTS
  line = err.strip().splitlines()[-1]
  assert line.startswith("error: Preparing part ") and ".txt bytes [" in line, line
  assert "killed by SIGKILL" in line and f"{preparation.MAX_ATTEMPTS} times" in line, line
  assert not [n for n in os.listdir(out) if ".tmp-" in n]
  assert not (out / "manifest.json").exists()


@needs_proc
def test_a_killed_workers_part_is_retried(tmp_path, small, spm):
  """One worker killed once: its part is done again by a new worker and the dataset is the one
  an uninterrupted run makes."""
  out = tmp_path / "out"
  code, stdout, err, killed = _run_killed(_command(small, spm, out), limit=1)
  assert code == 0, err[-3000:]
  assert len(killed) == 1
  assert "died (killed by SIGKILL" in err and "trying it again" in err
  summary = json.loads(stdout.strip().splitlines()[-1])
  assert summary["complete"]
  assert summary["fingerprint"] == _reference_fingerprint(small, spm, tmp_path / "reference")


# ----------------------------------------------------------------------------------- SIGTERM


def _sigterm_after_first_record(process, finished_one, group=False):
  """SIGTERM to `process` (or its process group) once `finished_one()`, i.e. a shard record
  exists; returns its (stdout, stderr). A process still running at the end is killed."""
  try:
    deadline = time.monotonic() + 180
    while not finished_one():
      assert process.poll() is None and time.monotonic() < deadline, "no shard was finished"
      time.sleep(0.005)
    (os.killpg if group else os.kill)(process.pid, signal.SIGTERM)
    return process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.communicate()


@needs_proc
@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigterm_stops_preparation_with_exit_4_and_a_rerun_resumes(tmp_path, large, spm, group):
  """SIGTERM to the command (or to its whole process group, as systemd and docker do) once the
  first shard is finished: exit code 4, workers gone, no temporary file, finished shards kept;
  the rerun skips them and ends with the dataset of an uninterrupted run."""
  out = tmp_path / "out"
  process = subprocess.Popen(_command(large, spm, out), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  _, err = _sigterm_after_first_record(
      process, lambda: out.is_dir() and any(n.endswith(".json") for n in os.listdir(out)),
      group)
  assert process.returncode == 4, err[-3000:]
  assert err.strip().splitlines()[-1].startswith("stopped: ")
  assert not _workers_in_session(process.pid), "worker processes outlived the command"
  names = os.listdir(out)
  assert not [n for n in names if ".tmp-" in n]
  assert "manifest.json" not in names
  # A shard is finished once its record exists (a shard file moved into place just before the
  # SIGTERM, without its record yet, is rightly made again).
  records = [n for n in names if n.startswith("shard-") and n.endswith(".json")]
  assert records
  finished = {n: os.stat(out / n).st_mtime_ns
              for r in records for n in (r, r[:-len(".json")] + ".npy")}
  rerun = subprocess.run(_command(large, spm, out), cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert {n: os.stat(out / n).st_mtime_ns for n in finished} == finished  # kept, not redone
  summary = json.loads(rerun.stdout.strip().splitlines()[-1])
  assert summary["fingerprint"] == _reference_fingerprint(large, spm, tmp_path / "reference")


def test_temporary_files_of_dead_processes_are_removed_at_start(tmp_path, small, spm):
  out = tmp_path / "out"
  out.mkdir()
  gone = subprocess.Popen(["true"])  # its pid is then one of no process
  gone.wait()
  host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())  # as temporary names spell it
  stale = [f".shard-00001-of-00004.npy.tmp-{host}-{gone.pid}-0123abcd",
           f".shard-00002-of-00004.npy.tmp-{gone.pid}-89abcdef",
           f"shard-00001-of-00004.json.tmp-{gone.pid}-0a0b0c0d"]
  kept = [f".shard-00003-of-00004.npy.tmp-{host}-{os.getpid()}-0123abcd",  # a live process
          f".shard-00003-of-00004.npy.tmp-elsewhere-{gone.pid}-0123abcd"]    # another machine
  for name in stale + kept:
    (out / name).write_bytes(b"partial")
  preparation.prepare(corpus_lib.text_file_corpus(small), tokenizer_lib.Tokenizer(spm), 64,
                      str(out), vocab_size=512, part_bytes=int(PART_MB * (1 << 20)),
                      progress=False)
  names = set(os.listdir(out))
  assert not names & set(stale)
  assert set(kept) <= names
  assert "manifest.json" in names


def test_automatic_preparation_turns_sigterm_into_exit_4(tmp_path, large, spm):
  """The preparation a training run does itself (source=text_files, cache_dir; here in the
  training process, without workers): SIGTERM is errors.Preempted there too, and the previous
  SIGTERM handler is back afterwards."""
  script = (
      "import signal, sys\n"
      "import ml_collections\n"
      "from deberta_jax import errors\n"
      "from deberta_jax.data import pipeline\n"
      "def mine(signum, frame): pass\n"
      "signal.signal(signal.SIGTERM, mine)\n"
      f"config = ml_collections.ConfigDict({{'seed': 0, 'seq_len': 64, "
      f"'model': {{'vocab_size': 512}}, 'data': {{'source': 'text_files', "
      f"'text_files': {large!r}, 'spm_model': {spm!r}, 'part_mb': {PART_MB}, "
      f"'cache_dir': {str(tmp_path / 'cache')!r}}}}})\n"
      "try:\n"
      "  with errors.exit_on_error():\n"
      "    pipeline.prepared_from_config(config, num_workers=1)\n"
      "finally:\n"
      "  print('handler restored' if signal.getsignal(signal.SIGTERM) is mine else 'lost')\n")
  process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  prepared = tmp_path / "cache" / "prepared"
  out, err = _sigterm_after_first_record(process, lambda: prepared.is_dir() and any(
      n.endswith(".json") for d in os.listdir(prepared) for n in os.listdir(prepared / d)))
  assert process.returncode == 4, err[-3000:]
  assert "stopped: stopped by SIGTERM while preparing" in err
  assert out.strip() == "handler restored"


# ------------------------------------------------------------ another attempt's files in --out


def test_spm_model_of_another_attempt_is_replaced_and_refused(tmp_path, small, spm):
  """An earlier attempt with another model died before its first shard record: its spm.model is
  replaced. A dataset whose spm.model is not the manifest's model is refused by the loader and by
  `prepare verify` (exit 2)."""
  other = _word_spm(tmp_path / "other.model", 28, WORDS)
  out = tmp_path / "out"
  out.mkdir()
  (out / "spm.model").write_bytes(open(other, "rb").read())
  tok = tokenizer_lib.Tokenizer(spm)
  manifest = preparation.prepare(corpus_lib.text_file_corpus(small), tok, 64, str(out),
                                 vocab_size=512, part_bytes=int(PART_MB * (1 << 20)),
                                 progress=False)
  assert (out / "spm.model").read_bytes() == open(spm, "rb").read()
  shards.check_tokenizer(str(out), manifest)

  (out / "spm.model").write_bytes(open(other, "rb").read())
  prepared = ml_collections.ConfigDict({
      "seed": 0, "seq_len": 64, "global_batch_size": 8,
      "model": {"vocab_size": 512}, "data": {"source": "prepared", "prepared_dir": str(out)}})
  with pytest.raises(DataError, match=f"spm.model has fingerprint .* tokenised with the model of "
                                      f"fingerprint {tok.fingerprint}"):
    pipeline_lib.make_pipeline(prepared)
  verify = subprocess.run([sys.executable, "-m", "deberta_jax.prepare", "verify", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert verify.returncode == 2 and "spm.model has fingerprint" in verify.stderr, verify.stderr


def test_ids_of_another_dtype_are_never_mixed(tmp_path):
  """A rerun across the 65,536-row boundary of config.model.vocab_size would write int32 ids next
  to uint16 ones: refused (exit 2 class), naming both dtypes, also against records written
  before records named their dtype."""
  rng = random.Random(0)
  words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7))
                  for _ in range(70_000)})
  spm_model = _word_spm(tmp_path / "big.model", 65_500, words)
  tok = tokenizer_lib.Tokenizer(spm_model)
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for f in range(2):
    (corpus_dir / f"{f}.txt").write_text(
        "".join(" ".join(words[(i * 13 + j) % len(words)] for j in range(10)) + "\n"
                for i in range(f * 4000, (f + 1) * 4000)))
  corpus = corpus_lib.text_file_corpus(str(corpus_dir / "*.txt"))
  out = tmp_path / "out"
  args = dict(part_bytes=100_000, progress=False, num_shards=2)
  assert preparation.prepare(corpus, tok, 64, str(out), vocab_size=65_536, shard_index=0,
                             **args) is None
  assert np.load(out / shards.shard_name(0, len(corpus.parts(100_000)))).dtype == np.uint16
  with pytest.raises(DataError, match="dtype 'uint16' there, 'int32' here"):
    preparation.prepare(corpus, tok, 64, str(out), vocab_size=65_600, shard_index=1, **args)
  for record in out.glob("shard-*.json"):  # as written before records named their dtype
    fields = json.loads(record.read_text())
    del fields["dtype"]
    record.write_text(json.dumps(fields))
  with pytest.raises(DataError, match="dtype 'uint16' there, 'int32' here"):
    preparation.prepare(corpus, tok, 64, str(out), vocab_size=65_600, shard_index=1, **args)
  manifest = preparation.prepare(corpus, tok, 64, str(out), vocab_size=65_536, shard_index=1,
                                 **args)
  assert manifest["dtype"] == "uint16"
  assert {np.load(out / s["file"]).dtype for s in manifest["shards"]} == {np.dtype(np.uint16)}


# ------------------------------------------------------------------------------------ gs://


def test_gcs_shard_deleted_or_truncated_under_the_reader_is_named(gcs_dir, tmp_path, small, spm):
  local = tmp_path / "prepared"
  preparation.prepare(corpus_lib.text_file_corpus(small), tokenizer_lib.Tokenizer(spm), 64,
                      str(local), vocab_size=512, part_bytes=int(PART_MB * (1 << 20)),
                      progress=False)
  fs = fsspec.filesystem("gs")
  remote = f"{gcs_dir}/prepared"
  for name in sorted(os.listdir(local)):
    fs.put_file(str(local / name), f"{remote}/{name}")
  rows = pipeline_lib.PreparedRows(remote)
  first = rows.manifest["shards"][0]["sequences"]
  stop = first + rows.manifest["shards"][1]["sequences"]
  np.testing.assert_array_equal(rows.read([first]), np.load(local / rows.manifest["shards"][1][
      "file"])[:1].astype(np.int32))
  shard = f"{remote}/{rows.manifest['shards'][1]['file']}"
  header = rows.manifest["shards"][1]["header_bytes"]
  fs.rm_file(shard)
  with pytest.raises(DataError, match=rf"Reading {shard} bytes \[{header}, "
                                      rf"{header + rows.row_bytes}\) failed"):
    rows.read([first])
  data = (local / rows.manifest["shards"][1]["file"]).read_bytes()
  last = stop - first - 1
  cut = header + last * rows.row_bytes + rows.row_bytes // 2  # inside the last row
  fs.pipe_file(shard, data[:cut])
  with pytest.raises(DataError, match=rf"gave {rows.row_bytes // 2} of {rows.row_bytes} bytes"):
    rows.read([stop - 1])


def test_shared_preparation_wait_is_bounded_and_names_the_missing_shards(gcs_dir, small, spm,
                                                                         caplog):
  """Process 0 of 2 prepares its share of a gs:// cache; process 1 never comes. The wait ends
  after config.data.prepare_wait_minutes with the missing shards and their process named."""
  config = _config(small, spm, cache_dir=f"{gcs_dir}/cache", prepare_wait_minutes=0.02)
  result = {}

  def wait():
    try:
      pipeline_lib.prepared_from_config(config, process_index=0, process_count=2, num_workers=1)
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = e

  caplog.set_level("INFO")
  thread = threading.Thread(target=wait, daemon=True)
  thread.start()
  thread.join(120)
  assert not thread.is_alive(), "the wait for the other process's shards did not end"
  error = result.get("error")
  assert isinstance(error, DataError), error
  count = len(corpus_lib.text_file_corpus(small).parts(int(PART_MB * (1 << 20))))
  assert count >= 3
  missing = [shards.shard_name(i, count) for i in range(1, count, 2)]
  assert all(name in str(error) for name in missing), error
  assert "share of process 1" in str(error) and "prepare_wait_minutes" in str(error)
  waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Waiting for ")]
  assert waits and f"{count - len(missing)} of {count} shard records exist" in waits[0]


def test_prepare_wait_minutes_is_validated():
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config_lib.validate(config)
  config.data.prepare_wait_minutes = 0.0
  with pytest.raises(config_lib.ConfigError, match="data.prepare_wait_minutes"):
    config_lib.validate(config)

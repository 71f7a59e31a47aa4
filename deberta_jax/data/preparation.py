"""Prepare a corpus once: split it into parts, tokenise and pack each part into a shard, in
parallel worker processes and over several machines, then write the manifest.

Parts are planned from the corpus alone (`Corpus.parts`), so every machine computes the same
list; machine `shard_index` of `num_shards` takes parts i with i % num_shards == shard_index,
and its `num_workers` processes take those one at a time. A shard whose record (`.json`) exists
and matches the plan (corpus, tokenizer, seq_len and id dtype) is skipped, so a rerun after a
crash or preemption only does what is left. Whoever finishes the last shard writes the
manifest; until then the dataset cannot be read.

Failures end the run instead of hanging it. The workers are plain processes, each handed one
part at a time over its own pipe, so the parent always knows which part a worker holds: a worker
that dies (the out-of-memory killer, SIGKILL) has its part retried once on a fresh worker, then
the run stops with a DataError naming the part. SIGTERM (a preemption) stops the workers, which
delete their unfinished shard, and ends the run with `errors.Preempted` (exit 4); finished shards
stay, so rerunning the command resumes. Temporary shard files left by a process that was killed
outright are removed when the next run starts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import uuid
from typing import Any, Callable

from absl import logging

from deberta_jax import errors
from deberta_jax.data import DataError
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import shards
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.data import storage

# Tries of one part whose worker process died: a transient memory spike passes on the retry, a
# part that always exhausts memory stops the run instead of looping.
MAX_ATTEMPTS = 2
_POLL_S = 0.2        # how often the parent looks for SIGTERM while workers run
_STOP_GRACE_S = 10.0  # a stopped worker finishes its current spm batch and deletes its shard
# Temporary shard files are named after the host and process writing them, so a run can tell the
# leftovers of a dead process on this host from files another machine is writing into a shared
# directory.
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\.?(?:shard-\d+-of-\d+\.(?:npy|json)|manifest\.json|spm\.model)"
                   r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{8}$")


def _plan_key(corpus_fingerprint: str, tokenizer, seq_len: int, dtype) -> dict[str, Any]:
  """What every record of one dataset agrees on; a record that differs is another dataset's."""
  return {"corpus_fingerprint": corpus_fingerprint, "tokenizer_fingerprint": tokenizer.fingerprint,
          "seq_len": int(seq_len), "dtype": str(dtype)}


# Records read at once from an object store: each is one small GET whose time is the round trip
# (tens of ms from a VM), so 2,400 records of a 160 GB corpus read one by one take minutes.
_RECORD_READERS = 32


def _read_records(out_dir: str, indices: list[int], count: int) -> list[dict[str, Any] | None]:
  """The records of shards `indices` (None where missing or damaged): one listing to see which
  exist, then the existing ones read by `_RECORD_READERS` threads (one request each)."""
  try:
    present = {os.path.basename(p.rstrip("/")) for p in storage.listdir(out_dir, refresh=True)}
  except FileNotFoundError:
    present = set()
  names = [shards.record_name(i, count) for i in indices]

  def load(name: str) -> dict[str, Any] | None:
    if name not in present:
      return None
    return _load_record(out_dir, storage.join(out_dir, name))

  if not storage.is_remote(out_dir) or len(names) <= 1:
    return [load(n) for n in names]
  with concurrent.futures.ThreadPoolExecutor(min(_RECORD_READERS, len(names))) as pool:
    return list(pool.map(load, names))


def _load_record(out_dir: str, path: str) -> dict[str, Any] | None:
  if not storage.exists(path):
    return None
  try:
    record = json.loads(storage.read_bytes(path))
  except ValueError:
    return None  # a damaged record: the shard is made again
  if isinstance(record, dict) and "dtype" not in record:  # written before records named it
    dtype = shards.shard_dtype(out_dir, record)
    if dtype is not None:
      record["dtype"] = dtype
  return record


def _conflicts(record: dict[str, Any], key: dict[str, Any]) -> bool:
  """A record of another dataset (a field it lacks is unknown, not different)."""
  return any(k in record and record[k] != v for k, v in key.items())


def _is_done(record: dict[str, Any] | None, part: corpus_lib.Part, key: dict[str, Any]) -> bool:
  return (record is not None and record.get("part") == dataclasses.asdict(part)
          and all(record.get(k) == v for k, v in key.items()))


def _difference(other: dict[str, Any], key: dict[str, Any]) -> str:
  """The plan fields in which a record differs from this run, each with both values."""
  notes = []
  for k, v in key.items():
    if k in other and other[k] != v:
      notes.append(f"{k} {other[k]!r} there, {v!r} here")
  text = "; ".join(notes)
  if "dtype" in other and other["dtype"] != key["dtype"]:
    text += (" (ids are stored as uint16 when config.model.vocab_size <= 65536 rows, else as "
             "int32: the vocabulary size crossed that boundary)")
  return text


def describe_part(part: corpus_lib.Part, index: int, count: int) -> str:
  """Which text a part is, for messages: the file and byte range, rows or records."""
  where = {"text": f"{part.path} bytes [{part.start}, {part.stop})",
           "jsonl": f"{part.path} bytes [{part.start}, {part.stop})",
           "parquet": f"{part.path} row groups [{part.start}, {part.stop})",
           "tfds": f"tfds {part.name!r} split {part.split!r} records [{part.start}, {part.stop})",
           "documents": "the whole corpus"}.get(part.kind, part.kind)
  return f"part {index} of {count} ({where}; {shards.shard_name(index, count)})"


def _temp_name(name: str) -> str:
  return f".{name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_temps(directory: str, pids: set[int] | None = None) -> int:
  """Removes this host's temporary shard and record files in a local `directory`: those of
  `pids`, or (None) those whose process is gone. Returns how many were removed."""
  removed = 0
  try:
    names = os.listdir(directory)
  except OSError:
    return 0
  for name in names:
    match = _TEMP.match(name)
    if not match or match.group("host") not in (None, _HOST):
      continue
    pid = int(match.group("pid"))
    if (pid in pids) if pids is not None else not _pid_alive(pid):
      with contextlib.suppress(OSError):  # gone already, or another user's
        os.remove(os.path.join(directory, name))
        removed += 1
  return removed


def _temp_dirs(out_dir: str) -> list[str]:
  """Local directories that hold temporary files of a preparation into `out_dir`."""
  return [tempfile.gettempdir()] if storage.is_remote(out_dir) else [out_dir]


# Each worker process loads the tokenizer once (spm processors cannot be pickled).
_WORKER: dict[str, Any] = {}


def _init_worker(spm_path: str, threads: int) -> None:
  _WORKER["tokenizer"] = tokenizer_lib.Tokenizer(spm_path)
  _WORKER["threads"] = threads


def _prepare_part(task: dict[str, Any], corpus=None, tokenizer=None, threads: int = 0,
                  on_text=None) -> dict[str, Any]:
  """Writes one shard and then its record; returns the record."""
  tokenizer = tokenizer or _WORKER["tokenizer"]
  threads = threads or _WORKER.get("threads", 0)
  part, index, count, out_dir = task["part"], task["index"], task["count"], task["out_dir"]
  name = shards.shard_name(index, count)
  local_dir = out_dir if not storage.is_remote(out_dir) else tempfile.gettempdir()
  tmp = os.path.join(local_dir, _temp_name(name))
  try:
    fields = shards.write_shard(corpus_lib.read_part(part, corpus), tokenizer, task["seq_len"],
                                task["dtype"], tmp, num_threads=threads, on_text=on_text)
    storage.put_file(tmp, storage.join(out_dir, name))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  record = {"file": name, **fields, "part": dataclasses.asdict(part), **task["key"]}
  storage.write_bytes(storage.join(out_dir, shards.record_name(index, count)),
                      json.dumps(record, indent=1).encode())
  return record


# ------------------------------------------------------------------------------------ workers


class _Stopped(BaseException):
  """Raised in a worker by SIGTERM: unwinds `_prepare_part` (which deletes its temporary shard)
  past any `except Exception` in the reading code."""


def _stop_worker(signum, frame):  # pylint: disable=unused-argument
  signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the unwind
  raise _Stopped()


def _failure(error: BaseException) -> tuple[str, BaseException, str]:
  text = traceback.format_exc()
  try:
    pickle.dumps(error)
  except Exception:  # pylint: disable=broad-except
    error = RuntimeError(f"{type(error).__name__}: {error}")
  return ("error", error, text)


def _worker_main(conn, spm_path: str, threads: int) -> None:
  """A worker: receives tasks (None = exit), answers ('done', record, '') or ('error', exception,
  traceback) for each. Exits with code EXIT_PREEMPTED when SIGTERM stops it."""
  # Ctrl-C reaches the whole process group: the parent alone decides, and stops the workers.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, _stop_worker)
  try:
    init_error = None
    try:
      _init_worker(spm_path, threads)
    except Exception as e:  # pylint: disable=broad-except
      init_error = _failure(e)
    while (task := conn.recv()) is not None:
      if init_error is not None:
        conn.send(init_error)
        continue
      try:
        reply = ("done", _prepare_part(task), "")
      except Exception as e:  # pylint: disable=broad-except
        reply = _failure(e)
      conn.send(reply)
  except _Stopped:
    sys.exit(errors.EXIT_PREEMPTED)
  except (EOFError, OSError):  # the parent is gone: nobody is waiting for the answer
    pass


class _RemoteTraceback(Exception):
  def __str__(self):
    return self.args[0]


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: Any
  task: dict[str, Any] | None = None


def _death(exitcode: int | None) -> str:
  if exitcode is not None and exitcode < 0:
    try:
      name = signal.Signals(-exitcode).name
    except ValueError:
      name = f"signal {-exitcode}"
    oom = ", which is what the out-of-memory killer sends" if -exitcode == signal.SIGKILL else ""
    return f"killed by {name}{oom}"
  return f"exit code {exitcode}"


class _Pool:
  """`size` worker processes (spawned: fork is unsafe once jax or gcsfs threads run), each given
  one task at a time, so a dead worker's part is known and nothing waits on a lost task."""

  def __init__(self, size: int, spm_path: str, threads: int, temp_dirs: list[str]):
    self._ctx = multiprocessing.get_context("spawn")
    self._args = (spm_path, threads)
    self._temp_dirs = temp_dirs
    self._pids: set[int] = set()
    self._workers = [self._start() for _ in range(size)]

  def _start(self) -> _Worker:
    parent, child = self._ctx.Pipe()
    process = self._ctx.Process(target=_worker_main, args=(child, *self._args), daemon=True,
                                name="deberta_jax-prepare-worker")
    process.start()
    child.close()
    self._pids.add(process.pid)
    return _Worker(process, parent)

  @staticmethod
  def _reply(worker: _Worker) -> tuple | None:
    """The worker's answer, ('died',) if it is gone without one, or None while it works."""
    try:
      if worker.conn.poll():
        return worker.conn.recv()
    except (EOFError, OSError):
      return ("died",)
    if not worker.process.is_alive():
      return ("died",)
    return None

  def run(self, tasks: list[dict[str, Any]], on_record: Callable[[dict[str, Any]], None],
          check_stop: Callable[[], None]) -> None:
    pending = collections.deque(tasks)
    attempts: collections.Counter = collections.Counter()
    while pending or any(w.task is not None for w in self._workers):
      for worker in self._workers:
        if worker.task is None and pending:
          worker.task = pending.popleft()
          with contextlib.suppress(OSError):  # a dead worker: seen below
            worker.conn.send(worker.task)
      busy = [w for w in self._workers if w.task is not None]
      multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                                      timeout=_POLL_S)
      check_stop()
      for slot, worker in enumerate(self._workers):
        reply = None if worker.task is None else self._reply(worker)
        if reply is None:
          continue
        task, worker.task = worker.task, None
        if reply[0] == "done":
          on_record(reply[1])
        elif reply[0] == "error":
          raise reply[1] from _RemoteTraceback(
              f"in the worker preparing {describe_part(task['part'], task['index'], task['count'])}"
              f":\n{reply[2]}")
        else:
          worker.process.join(_STOP_GRACE_S)
          code = worker.process.exitcode
          worker.conn.close()
          self._clean({worker.process.pid})
          what = describe_part(task["part"], task["index"], task["count"])
          if code in (errors.EXIT_PREEMPTED, -signal.SIGTERM):  # stopped, not crashed
            raise errors.Preempted(f"a preparation worker was stopped by SIGTERM while preparing "
                                   f"{what}; finished shards are kept, rerun to resume")
          attempts[task["index"]] += 1
          if attempts[task["index"]] >= MAX_ATTEMPTS:
            raise DataError(
                f"Preparing {what}: the worker process died ({_death(code)}) {MAX_ATTEMPTS} "
                f"times. Finished shards are kept; if memory ran out, rerun with fewer "
                f"--num_workers or a smaller config.data.part_mb.")
          logging.warning("The worker preparing %s died (%s); trying it again in a new worker.",
                          what, _death(code))
          pending.appendleft(task)
          self._workers[slot] = self._start()

  def _clean(self, pids: set[int]) -> None:
    for directory in self._temp_dirs:
      _remove_temps(directory, pids)

  def close(self) -> None:
    """Idle workers are told to exit; busy ones get SIGTERM (they delete their unfinished shard),
    and SIGKILL if they do not exit within the grace time; their temporary files go too."""
    for worker in self._workers:
      if not worker.process.is_alive():
        continue
      if worker.task is None:
        with contextlib.suppress(OSError):
          worker.conn.send(None)
      else:
        worker.process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for worker in self._workers:
      worker.process.join(max(0.0, deadline - time.monotonic()))
      if worker.process.is_alive():
        worker.process.kill()
        worker.process.join()
      worker.conn.close()
    self._clean(self._pids)


class _SigtermStop:
  """While preparing, SIGTERM stops the run at the next check (`check` raises Preempted); the
  previous handler is restored on exit.

  Installed only from the main thread, and only where the caller owns SIGTERM: on a multi-host
  training run JAX's preemption notifier holds it (runtime/preemption.py), and a handler set by
  C code is one Python cannot put back, so that caller passes enabled=False.
  """

  def __init__(self, enabled: bool, out_dir: str):
    self._out_dir = out_dir
    self._received = threading.Event()
    self._previous = None
    self._installed = False
    if (enabled and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not None):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._received.set()

  def check(self) -> None:
    if self._received.is_set():
      raise errors.Preempted(f"stopped by SIGTERM while preparing {self._out_dir}; its finished "
                             f"shards are kept: rerun the same command to prepare the rest")

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False


class _Progress:
  """A progress bar over text bytes with ETA (tqdm), or log lines when tqdm is absent."""

  def __init__(self, total: int, description: str, enabled: bool):
    self._bar = None
    if enabled:
      try:
        import tqdm  # installed with tensorflow-datasets
        self._bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=description,
                              file=sys.stderr, mininterval=2.0, smoothing=0.1)
      except ImportError:
        pass

  def update(self, n: int) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def prepare(corpus: corpus_lib.Corpus, tokenizer, seq_len: int, out_dir: str, *,
            vocab_size: int, part_bytes: int = corpus_lib.DEFAULT_PART_BYTES,
            num_workers: int = 1, shard_index: int = 0, num_shards: int = 1,
            progress: bool = True, handle_sigterm: bool = True) -> dict[str, Any] | None:
  """Prepares this machine's share of `corpus` into `out_dir`; returns the manifest once every
  shard (of every machine) exists, else None.

  Raises DataError for bad input and for a part whose worker died MAX_ATTEMPTS times, and
  errors.Preempted on SIGTERM when `handle_sigterm` (then a handler is installed for the call).
  """
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise DataError(f"--shard_index={shard_index} must be in [0, --num_shards={num_shards}).")
  if num_workers < 1:
    raise DataError(f"--num_workers={num_workers} must be >= 1.")
  tokenizer_lib.check_vocab_size(tokenizer.num_pieces, vocab_size, tokenizer.model_path)
  out_dir = storage.absolute(out_dir)
  dtype = shards.token_dtype(vocab_size)
  key = _plan_key(corpus.fingerprint, tokenizer, seq_len, dtype)
  _refuse_other_dataset(out_dir, key)
  storage.makedirs(out_dir)
  stale = sum(_remove_temps(d) for d in _temp_dirs(out_dir))
  if stale:
    logging.info("Removed %d temporary files left by a preparation that was killed", stale)
  _write_tokenizer(out_dir, tokenizer)

  parts = corpus.parts(part_bytes)
  count = len(parts)
  mine = [i for i in range(count) if i % num_shards == shard_index]
  todo = [i for i, record in zip(mine, _read_records(out_dir, mine, count))
          if not _is_done(record, parts[i], key)]
  logging.info("Preparing %s into %s: %d parts, %d for this machine (%d of %d), %d already done",
               corpus.name, out_dir, count, len(mine), shard_index, num_shards,
               len(mine) - len(todo))
  tasks = [{"part": parts[i], "index": i, "count": count, "out_dir": out_dir,
            "seq_len": int(seq_len), "dtype": dtype, "key": key} for i in todo]
  bar = _Progress(sum(parts[i].size for i in todo), f"prepare {len(todo)} shards",
                  progress and bool(todo))
  stop = _SigtermStop(handle_sigterm, out_dir)
  start = time.time()
  try:
    in_process = num_workers == 1 or len(tasks) <= 1 or any(
        t["part"].kind == "documents" for t in tasks)
    if in_process:
      def on_text(n: int) -> None:
        stop.check()
        bar.update(n)
      for task in tasks:
        stop.check()
        _prepare_part(task, corpus, tokenizer, on_text=on_text)
    else:
      threads = max(1, (os.cpu_count() or 1) // num_workers)
      pool = _Pool(min(num_workers, len(tasks)), tokenizer.model_path, threads,
                   _temp_dirs(out_dir))
      try:
        pool.run(tasks, lambda record: bar.update(record["part"]["size"]), stop.check)
      finally:
        pool.close()
    stop.check()
  finally:
    stop.close()
    bar.close()
  if todo:
    logging.info("Prepared %d shards in %.1f s", len(todo), time.time() - start)
  return _write_manifest_if_complete(corpus, tokenizer, seq_len, out_dir, parts, key, dtype,
                                     part_bytes)


def _write_tokenizer(out_dir: str, tokenizer) -> None:
  """DIR/spm.model is this run's model. One left by an earlier attempt with another model (that
  died before its first shard record: records of another model are refused before this) is
  replaced, since the loader and everything downstream decode the rows with this file."""
  path = storage.join(out_dir, shards.SPM_FILE)
  if storage.exists(path):
    found = shards.tokenizer_fingerprint(storage.read_bytes(path))
    if found == tokenizer.fingerprint:
      return
    logging.warning("Replacing %s (model %s) with this preparation's model %s", path, found,
                    tokenizer.fingerprint)
  storage.write_bytes(path, tokenizer.proto)


def _refuse_other_dataset(out_dir: str, key: dict[str, Any]) -> None:
  """Shards of another corpus, tokenizer, seq_len or id dtype in `out_dir` are never mixed or
  overwritten."""
  if not storage.isdir(out_dir):
    return
  for path in storage.listdir(out_dir):
    name = os.path.basename(path.rstrip("/"))
    if name.startswith("shard-") and name.endswith(".json"):
      record = _load_record(out_dir, path)
      if not isinstance(record, dict):
        continue
      if _conflicts(record, key):
        raise DataError(f"--out={out_dir} holds shards of another dataset ({name}: "
                        f"{_difference(record, key)}). Use another --out directory.")
      return


def _write_manifest_if_complete(corpus, tokenizer, seq_len, out_dir, parts, key, dtype,
                                part_bytes) -> dict[str, Any] | None:
  count = len(parts)
  records = _read_records(out_dir, list(range(count)), count)
  for i, record in enumerate(records):
    if isinstance(record, dict) and _conflicts(record, key):
      raise DataError(f"--out={out_dir} mixes shards of two datasets: "
                      f"{shards.record_name(i, count)} differs from this run "
                      f"({_difference(record, key)}); prepare into an empty directory.")
  missing = [i for i, (r, p) in enumerate(zip(records, parts)) if not _is_done(r, p, key)]
  if missing:
    logging.info("%d of %d shards are still missing (e.g. %s); the manifest is written when the "
                 "last one is done.", len(missing), count, shards.shard_name(missing[0], count))
    return None
  entries = [{k: r[k] for k in ("file", "sequences", "tokens", "bytes", "sha256",
                                "header_bytes")} for r in records if r["sequences"] > 0]
  if not entries:
    raise DataError(f"Corpus {corpus.name} is empty: tokenizing it gave no pieces.")
  _write_tokenizer(out_dir, tokenizer)
  manifest = {
      "format": shards.FORMAT, "version": shards.FORMAT_VERSION,
      "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint,
                 "text_bytes": sum(p.size for p in parts)},
      "tokenizer": {"file": shards.SPM_FILE, "fingerprint": tokenizer.fingerprint,
                    "num_pieces": tokenizer.num_pieces},
      "seq_len": int(seq_len), "dtype": str(dtype), "part_bytes": int(part_bytes),
      "num_sequences": sum(e["sequences"] for e in entries),
      "num_tokens": sum(e["tokens"] for e in entries),
      "shards": entries,
  }
  manifest["fingerprint"] = shards.fingerprint(manifest)
  storage.write_bytes(storage.join(out_dir, shards.MANIFEST),
                      json.dumps(manifest, indent=1).encode())
  logging.info("Prepared dataset %s: %d sequences of %d, %d pieces, %d shards, fingerprint %s",
               out_dir, manifest["num_sequences"], seq_len, manifest["num_tokens"], len(entries),
               manifest["fingerprint"])
  return manifest

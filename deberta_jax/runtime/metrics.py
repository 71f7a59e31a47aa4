"""Metric writing: TensorBoard events, metrics.jsonl and a console line, from process 0 only.

Each logged step is one JSON object per line in `metrics.jsonl`, which tests, notebooks and the
study read without TensorBoard, and one event in a TensorBoard event file under `tensorboard/`
(written here with tensorboardX's protocol buffers, no TensorFlow needed).

Resumes. A run restarted from checkpoint S finds records a killed run wrote past S; it would log
those steps again, and curves read from the file would hold two values per step. So the writer
is given the step the run starts from and first drops every record past it (all of them for a
run that starts at 0: step 0 holds the evaluation of a fresh run, which is written again). The
new event file starts with TensorBoard's purge marker (a SessionLog START at S + 1), which hides
the events of the earlier files from step S + 1 on.

Both files only grow, so each write stores only its own bytes. Locally that is an append. On
gs://, where objects cannot be appended to, the new bytes are uploaded as a small temporary
object and concatenated onto the file by a server-side compose (GCS's documented way to append;
the earlier bytes never travel again), then the temporary object is deleted. Rewriting the whole
object at every log step instead would send O(steps^2) bytes over a long run. TensorBoard reads
these event files as they grow (`tensorboard --logdir gs://.../tensorboard`). Other object
stores have no compose: there the object is rewritten whole at each write.

Failures. Metrics must never end a run. A write that fails is retried with backoff
(RETRY_DELAYS_S), then reported with a warning; its bytes stay in memory and go out with the next
write that succeeds, so a transient outage loses nothing. While a file keeps failing each write
tries once (no backoff), so an outage does not slow training by the backoff at every log step.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import uuid

from absl import logging
from tensorboardX.proto import event_pb2
from tensorboardX.proto import summary_pb2
from tensorboardX.record_writer import masked_crc32c

from deberta_jax import paths

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Temporary objects of appends on gs://, outside tensorboard/ so TensorBoard never lists them.
STAGING_DIR = ".appending"
# Seconds to wait before each retry of a failed write (so len + 1 attempts).
RETRY_DELAYS_S = (1.0, 4.0)


class MetricWriter:
  """Writes scalars for one run; a no-op on processes other than 0.

  `start_step`: the step the run starts from (0, or the restored checkpoint's step); records a
  previous attempt wrote past it are dropped (module doc).
  """

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self.total_steps = total_steps
    self._start_time = None
    self._start_step = None
    self._jsonl = None
    self._events = None
    if enabled:
      start_step = int(start_step)
      staging = _join(workdir, STAGING_DIR)
      self._jsonl = _GrowingFile(_join(workdir, METRICS_FILE), staging,
                                 keep=lambda content: _records_up_to(content, start_step))
      # A new event file per run attempt (TensorBoard reads a directory's files in name order).
      name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
              f"{os.getpid()}.{uuid.uuid4().hex[:8]}")
      self._events = _GrowingFile(_join(workdir, TENSORBOARD_DIR, name), staging)
      # The purge marker hides events of earlier files from its step on (module doc).
      purge_step = start_step + 1 if start_step > 0 else 0
      now = time.time()
      self._events.append(
          _event_record(event_pb2.Event(wall_time=now, file_version="brain.Event:2")) +
          _event_record(event_pb2.Event(wall_time=now, step=purge_step, session_log=(
              event_pb2.SessionLog(status=event_pb2.SessionLog.START)))))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    now = time.time()
    if self._start_time is None:
      self._start_time, self._start_step = now, step
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.append((json.dumps(record) + "\n").encode("utf-8"))
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in scalars.items()])
    self._events.append(_event_record(event_pb2.Event(wall_time=now, step=int(step),
                                                      summary=summary)))
    logging.info("%s", self._console_line(step, scalars, now))

  def _console_line(self, step: int, scalars: dict, now: float) -> str:
    done = step / max(1, self.total_steps)
    eta = ""
    if step > self._start_step:
      rate = (now - self._start_time) / (step - self._start_step)
      eta = f" eta {_duration(rate * (self.total_steps - step))}"
    shown = " ".join(f"{k}={scalars[k]:.4g}" for k in
                     ("mlm_loss", "mlm_accuracy", "rtd_loss", "rtd_accuracy", "learning_rate",
                      "tokens_per_second", "eval_mlm_loss", "eval_unigram_entropy",
                      "eval_mlm_accuracy", "eval_rtd_loss", "eval_rtd_base_loss",
                      "eval_rtd_auc", "eval_disc_effective_rank", "eval_disc_mean_cosine")
                     if k in scalars)
    return f"step {step}/{self.total_steps} ({100 * done:.1f}%){eta} {shown}"

  def close(self) -> None:
    """Writes what earlier failures left in memory (with retries); never raises."""
    for file in (self._jsonl, self._events):
      if file is not None:
        file.close()
    self._jsonl = self._events = None
    self.enabled = False


def _join(base: str, *names: str) -> str:
  return "/".join([base.rstrip("/"), *names]) if paths.is_remote(base) else os.path.join(
      base, *names)


def _event_record(event) -> bytes:
  """One event in TFRecord framing: length, its masked CRC-32C, the data, the data's CRC."""
  data = event.SerializeToString()
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _records_up_to(content: bytes, start_step: int) -> bytes:
  """The lines of an existing metrics.jsonl that a run starting at `start_step` keeps: complete
  records of steps <= start_step (none when it starts at 0). A line cut short by a kill, or one
  that does not parse, is dropped too."""
  kept, dropped = [], 0
  for line in content.split(b"\n")[:-1]:  # the last piece is empty or an unfinished line
    if not line.strip():
      continue
    try:
      step = int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      step = None
    if step is not None and 0 < start_step and step <= start_step:
      kept.append(line + b"\n")
    else:
      dropped += 1
  if dropped:
    logging.info("%s: dropped %d record(s) past step %d, written before the run was restarted",
                 METRICS_FILE, dropped, start_step)
  return b"".join(kept)


class _GrowingFile:
  """A file that is only appended to, on local disk or in a bucket (module doc).

  `keep(content) -> content` is applied once to what the file already holds, before the first
  append. Bytes not yet stored (a failed write) wait in `_pending` for the next write.
  """

  def __init__(self, path: str, staging_dir: str, keep=None):
    self.path = path
    self._staging = staging_dir
    self._keep = keep
    self._remote = paths.is_remote(path)
    self._pending = bytearray()
    self._opened = False
    self._failing = False
    self._stored = 0           # bytes of the remote object written by this writer and before
    self._in_flight = None     # bytes of a remote append whose outcome is unknown
    self._content = None       # the whole object, kept only where it is rewritten at each write
    self._fs = None

  def append(self, data: bytes) -> None:
    self._pending += data
    self._store(len(RETRY_DELAYS_S) + 1 if not self._failing else 1)

  def close(self) -> None:
    if self._pending or not self._opened:
      self._store(len(RETRY_DELAYS_S) + 1)
    if self._pending:
      logging.warning("%s: %d byte(s) of metrics could not be written and are lost", self.path,
                      len(self._pending))

  def _store(self, attempts: int) -> None:
    for attempt in range(attempts):
      try:
        self._write_pending()
      except Exception as e:  # pylint: disable=broad-except  # metrics must not end a run
        error = e
        if attempt + 1 < attempts:
          time.sleep(RETRY_DELAYS_S[min(attempt, len(RETRY_DELAYS_S) - 1)])
        continue
      if self._failing:
        logging.warning("%s: written again after earlier failures", self.path)
      self._failing = False
      return
    self._failing = True
    logging.warning("%s: write failed after %d attempt(s) (%s: %s); %d byte(s) stay in memory "
                    "and are written with the next write", self.path, attempts,
                    type(error).__name__, error, len(self._pending))

  def _write_pending(self) -> None:
    if not self._opened:
      self._open_remote() if self._remote else self._open_local()
      self._opened = True
    if self._in_flight is not None:
      self._settle()
    if not self._pending:
      return
    data = bytes(self._pending)
    if self._remote:
      self._append_remote(data)
    else:
      self._append_local(data)
    del self._pending[:len(data)]

  # --- local disk

  def _open_local(self) -> None:
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    if self._keep is None or not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      content = f.read()
    kept = self._keep(content)
    if kept != content:  # a temporary name and a rename: the file is never half-written
      tmp = f"{self.path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
      try:
        with open(tmp, "wb") as f:
          f.write(kept)
        os.replace(tmp, self.path)
      finally:
        if os.path.exists(tmp):
          os.remove(tmp)

  def _append_local(self, data: bytes) -> None:
    with open(self.path, "ab", buffering=0) as f:
      start = f.seek(0, os.SEEK_END)
      try:
        view = memoryview(data)
        while view:
          view = view[f.write(view):]
      except OSError:  # e.g. a full disk: take back a partial line, so a retry cannot split one
        os.ftruncate(f.fileno(), start)
        raise

  # --- object stores

  def _filesystem(self):
    if self._fs is None:
      import fsspec  # pylint: disable=import-outside-toplevel  # local runs never import gcsfs
      self._fs = fsspec.core.url_to_fs(self.path)[0]
    return self._fs

  def _composes(self) -> bool:
    return self.path.split("://", 1)[0] in ("gs", "gcs") and hasattr(self._filesystem(), "merge")

  def _remote_size(self) -> int | None:
    """The object's size as the store has it now (None: no such object)."""
    fs = self._filesystem()
    fs.invalidate_cache(self.path)
    try:
      return int(fs.info(self.path)["size"])
    except FileNotFoundError:
      return None

  def _open_remote(self) -> None:
    fs = self._filesystem()
    size = self._remote_size()
    content = b""
    if size is not None and self._keep is not None:
      content = fs.cat_file(self.path)
      kept = self._keep(content)
      if kept != content:
        fs.pipe_file(self.path, kept)  # once per run start
      content = kept
    elif size is not None:
      content = None  # not read: appended to as it is
    self._stored = len(content) if content is not None else size
    if not self._composes():
      self._content = content if content is not None else fs.cat_file(self.path)

  def _settle(self) -> None:
    """After a compose whose answer was lost: whether it took effect (then its bytes are not
    sent again) is read from the object's size."""
    size = self._remote_size() or 0
    if size == self._stored + self._in_flight:
      del self._pending[:self._in_flight]
    elif size != self._stored:
      logging.warning("%s: holds %d bytes where this writer expected %d; appending after them",
                      self.path, size, self._stored)
    self._stored, self._in_flight = size, None

  def _append_remote(self, data: bytes) -> None:
    fs = self._filesystem()
    if not self._composes():  # a whole rewrite: repeating it after a lost answer is harmless
      fs.pipe_file(self.path, self._content + data)
      self._content += data
    elif self._stored == 0:   # the first bytes: one upload, harmless to repeat as well
      fs.pipe_file(self.path, data)
    else:
      part = f"{self._staging}/{uuid.uuid4().hex}"
      fs.pipe_file(part, data)
      self._in_flight = len(data)  # a retry first checks whether this compose took effect
      try:
        fs.merge(self.path, [self.path, part])
      finally:
        try:
          fs.rm_file(part)
        except Exception:  # pylint: disable=broad-except  # a leftover part is harmless
          logging.warning("could not delete the temporary object %s", part)
      self._in_flight = None
    self._stored += len(data)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def logged_records(workdir: str) -> list[dict]:
  """`read_metrics` for a run that must go on whatever the file holds: the records, or none (with
  a warning) when metrics.jsonl is missing or unreadable, which only costs what they inform."""
  try:
    return read_metrics(workdir)
  except FileNotFoundError:
    return []
  except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged file, an outage
    logging.warning("Could not read the earlier metrics of %s (%s); going on without them",
                    workdir, e)
    return []


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl (local or gs://), one per step, in step order.

  If a step appears more than once (files written before resumes dropped the records past the
  restored step), the last record of that step wins: it is the one the resumed run wrote. An
  unfinished last line (a run killed while writing it) is skipped.
  """
  path = _join(workdir, METRICS_FILE)
  if paths.is_remote(path):
    import fsspec  # pylint: disable=import-outside-toplevel
    with fsspec.open(path, "rb") as f:
      content = f.read()
  else:
    with open(path, "rb") as f:
      content = f.read()
  lines = content.decode("utf-8").split("\n")
  by_step = {}
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      if i == len(lines) - 1:
        continue
      raise
    by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]

"""Files on local disk and in object stores (gs://, s3://, ...), behind one small interface.

Every path a user gives the data path (corpus globs, tfds data dir, spm model, cache dir,
prepared dir) may be an object-store URL. Local paths use the operating system directly (fast
`pread` on a shared descriptor, atomic renames); URLs go through fsspec, which finds the
filesystem by protocol (gcsfs for gs://) and honours `STORAGE_EMULATOR_HOST`, so tests run against
a GCS API server on 127.0.0.1.
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import os
import shutil
import threading
import time
import uuid
from typing import Any, BinaryIO, Iterator

from absl import logging

from deberta_jax.data import DataError
from deberta_jax.data import retry as retry_lib
from deberta_jax.paths import absolute, is_remote

__all__ = ["absolute", "is_remote", "join", "exists", "isfile", "isdir", "glob", "listdir",
           "size", "fingerprint_of", "read_bytes", "write_bytes", "open_read", "put_file",
           "makedirs", "remove", "read_range", "RangeReader"]


def _fs(path: str):
  import fsspec  # only URLs need it; local runs never import gcsfs
  fs, _ = fsspec.core.url_to_fs(path)
  return fs


def _protocol(path: str) -> str:
  return path.split("://", 1)[0] + "://"


def join(base: str, *names: str) -> str:
  if is_remote(base):
    return "/".join([base.rstrip("/"), *names])
  return os.path.join(base, *names)


def exists(path: str) -> bool:
  return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def isfile(path: str) -> bool:
  return _fs(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
  return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob (`**` recursive), as full paths or URLs."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern, recursive=True))
  protocol = _protocol(pattern)
  return sorted(protocol + p for p in _fs(pattern).glob(pattern))


def listdir(path: str, refresh: bool = False) -> list[str]:
  """Full paths of the entries of a directory (files and subdirectories), sorted. gcsfs caches
  listings per process: `refresh` asks the server again, for a directory that other processes
  write to."""
  if not is_remote(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path))
  protocol = _protocol(path)
  return sorted(protocol + p for p in _fs(path).ls(path, detail=False, refresh=refresh))


def size(path: str) -> int:
  return int(_fs(path).size(path)) if is_remote(path) else os.path.getsize(path)


def fingerprint_of(path: str) -> list[Any]:
  """What changes when a file's content may have changed: size and mtime locally; size and the
  object's generation/etag/checksum remotely (object stores keep no useful mtime)."""
  if not is_remote(path):
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]
  info = _fs(path).info(path)
  version = [str(info.get(k)) for k in ("generation", "etag", "md5Hash", "crc32c", "ETag")
             if info.get(k) is not None]
  return [path, int(info.get("size", 0)), version]


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    return _fs(path).cat_file(path)
  with open(path, "rb") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file so that readers never see part of it: a temporary name and a rename
  locally; one object upload remotely (objects appear whole)."""
  if is_remote(path):
    with _fs(path).open(path, "wb") as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def open_read(path: str) -> BinaryIO:
  return _fs(path).open(path, "rb") if is_remote(path) else open(path, "rb")


def put_file(local_path: str, path: str) -> None:
  """Moves a finished local file to `path` (an atomic rename locally, an upload remotely)."""
  if is_remote(path):
    _fs(path).put_file(local_path, path)
    os.remove(local_path)
  else:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
      os.replace(local_path, path)
    except OSError:  # another filesystem: copy next to the target, then rename
      tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
      shutil.copyfile(local_path, tmp)
      os.replace(tmp, path)
      os.remove(local_path)


def makedirs(path: str) -> None:
  """Local directories only: object stores have no directories to create."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  if is_remote(path):
    _fs(path).rm_file(path)
  elif os.path.exists(path):
    os.remove(path)


def sha256_of(path: str, chunk: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open_read(path) as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def iter_lines(path: str, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
  """Raw lines (newline kept) that *start* at a byte offset in [start, stop) of a file.

  Splitting a file into byte ranges this way hands every line to exactly one range, whatever the
  cut points: a range skips the line in progress at its start (the previous range owns it) and
  finishes the line in progress at its end.
  """
  with open_read(path) as f:
    position = start
    if start > 0:
      f.seek(start - 1)
      previous = f.read(1)
      if previous != b"\n":
        position = start + len(f.readline())  # the rest of a line that began before start
    while stop is None or position < stop:
      line = f.readline()
      if not line:
        return
      position += len(line)
      yield line


def _check_range(path: str, offset: int, length: int, data: Any) -> None:
  where = f"{path} bytes [{offset}, {offset + length})"
  if isinstance(data, _GaveUp):
    raise DataError(f"Reading {where} failed: {data}") from data.__cause__
  if isinstance(data, BaseException):
    raise DataError(f"Reading {where} failed: {type(data).__name__}: {data} (the file was "
                    f"deleted, replaced or cannot be reached)") from data
  if len(data) != length:
    raise DataError(f"Reading {where} gave {len(data)} of {length} bytes: the file is "
                    f"truncated or was replaced by a shorter one")


def read_range(path: str, start: int, stop: int) -> bytes:
  """Bytes [start, stop) of one file (a ranged GET remotely); DataError if fewer exist."""
  if is_remote(path):
    try:
      data = _fs(path).cat_file(path, start=start, end=stop)
    except (OSError, ValueError) as e:
      data = e
  else:
    with open(path, "rb") as f:
      data = os.pread(f.fileno(), stop - start, start)
  _check_range(path, start, stop - start, data)
  return data


class RangeReader:
  """Reads byte ranges of a set of files from many threads at once.

  Local files: one descriptor per file, shared by all threads (`os.pread` has no file position),
  with read-ahead turned off (POSIX_FADV_RANDOM): rows are read in shuffled order, and the kernel's
  default read-ahead would fetch megabytes around every 2 KiB row of a cold file.

  Remote files: fsspec's `cat_ranges`, which issues the range requests of one call concurrently,
  on a client of the reader's own with at most `connections` connections (gs://: the aiohttp pool
  of a gcsfs instance not shared with the rest of the process, so checkpoint and metrics traffic
  neither takes its connections nor is starved by it). Requests in flight are at most
  `connections`; rows a second at a round trip of L seconds are then at most
  connections x rows per request / L. A range that still fails after the client's own retries is
  tried again while `retry_minutes` have not passed since its first attempt (data/retry.py).
  """

  def __init__(self, paths: list[str], connections: int = 100, retry_minutes: float = 10.0):
    self.paths = list(paths)
    self.connections = int(connections)
    self.retry_minutes = float(retry_minutes)
    self._remote = bool(self.paths) and is_remote(self.paths[0])
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()
    self._remote_fs = None
    self.requests = 0  # ranges requested so far, retries included (data_bench: requests per row)
    self.retries = 0   # ranges requested again after the client gave up on them

  def _fd(self, index: int) -> int:
    fd = self._fds.get(index)
    if fd is None:
      with self._lock:
        fd = self._fds.get(index)
        if fd is None:
          fd = os.open(self.paths[index], os.O_RDONLY)
          if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
          self._fds[index] = fd
    return fd

  def _client(self):
    with self._lock:
      if self._remote_fs is None:
        self._remote_fs = _reading_fs(self.paths[0], self.connections)
      return self._remote_fs

  def read(self, requests: list[tuple[int, int, int]]) -> list[bytes]:
    """Bytes of each (file index, offset, length); DataError names the file and byte range of a
    read that failed or came back short (a shard deleted, replaced or truncated under a run)."""
    with self._lock:
      self.requests += len(requests)
    if self._remote:
      out = self._read_remote(requests)
    else:
      out = [os.pread(self._fd(i), length, offset) for i, offset, length in requests]
    for (i, offset, length), data in zip(requests, out):
      _check_range(self.paths[i], offset, length, data)
    return out

  def _read_remote(self, requests: list[tuple[int, int, int]]) -> list[Any]:
    """cat_ranges, then the transient failures again with backoff until the bound has passed.
    cat_ranges returns a failed range's exception in its place in the list (fsspec's
    on_error="return"), so one bad range never costs the others of the batch."""
    fs = self._client()
    out: list[Any] = [None] * len(requests)
    pending = list(range(len(requests)))
    started = time.monotonic()
    tries = 0
    while True:
      tries += 1
      got = fs.cat_ranges([self.paths[requests[k][0]] for k in pending],
                          [requests[k][1] for k in pending],
                          [requests[k][1] + requests[k][2] for k in pending])
      for k, data in zip(pending, got):
        out[k] = data
      pending = [k for k in pending
                 if isinstance(out[k], BaseException) and retry_lib.is_transient(out[k])]
      if not pending:
        return out
      wait = retry_lib.delay_before(tries)
      elapsed = time.monotonic() - started
      if elapsed + wait > 60 * self.retry_minutes:
        for k in pending:
          out[k] = _GaveUp(out[k], tries, elapsed, self.retry_minutes)
        return out
      i, offset, length = requests[pending[0]]
      logging.warning("%d read(s) failed after the client's retries, e.g. %s bytes [%d, %d): "
                      "%s: %s; again in %.1f s (%.0f s of config.data.read_retry_minutes=%g "
                      "spent)", len(pending), self.paths[i], offset, offset + length,
                      type(out[pending[0]]).__name__, out[pending[0]], wait, elapsed,
                      self.retry_minutes)
      with self._lock:
        self.requests += len(pending)
        self.retries += len(pending)
      time.sleep(wait)

  def close(self) -> None:
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()

  def __getstate__(self):  # worker processes open their own descriptors and clients
    return {"paths": self.paths, "connections": self.connections,
            "retry_minutes": self.retry_minutes}

  def __setstate__(self, state):
    self.__init__(state["paths"], state.get("connections", 100),
                  state.get("retry_minutes", 10.0))


class _GaveUp(OSError):
  """A transient failure that outlasted the retry bound: what DataError reports."""

  def __init__(self, last: BaseException, attempts: int, elapsed_s: float, minutes: float):
    rounds = f"{attempts} round{'s' if attempts != 1 else ''}"
    super().__init__(f"{type(last).__name__}: {last} (still failing after {rounds} of the "
                     f"client's retries over {elapsed_s:.0f} s; "
                     f"config.data.read_retry_minutes={minutes:g})")
    self.__cause__ = last


def _reading_fs(path: str, connections: int):
  """A client for `path`'s object store used only by one reader. For gs://, a gcsfs instance
  (not fsspec's shared cached one) whose aiohttp pool holds at most `connections` connections;
  the connector is made on fsspec's event loop, which aiohttp requires."""
  import fsspec  # pylint: disable=import-outside-toplevel
  protocol = path.split("://", 1)[0]
  if protocol not in ("gs", "gcs"):
    return _fs(path)
  import aiohttp  # pylint: disable=import-outside-toplevel  # gcsfs's own HTTP client
  from fsspec import asyn  # pylint: disable=import-outside-toplevel
  loop = asyn.get_loop()

  async def make_connector():
    return aiohttp.TCPConnector(limit=connections)

  connector = asyn.sync(loop, make_connector)
  return fsspec.filesystem(protocol, skip_instance_cache=True, loop=loop,
                           session_kwargs={"connector": connector})

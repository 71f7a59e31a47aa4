"""An HTTP proxy on 127.0.0.1 in front of the GCS API server of tests/gcs_server.py that adds
latency and faults: what a pod sees from real GCS, with the real server behind it.

  proxy = FaultProxy(gcs_server.endpoint, delay_s=0.03, error_rate=0.05, reset_rate=0.05, seed=0)
  proxy.start()
  subprocess.run([...], env=dict(os.environ, **proxy.env()))   # clients go through the proxy
  proxy.counts   # {'requests': ..., 'http_503': ..., 'http_429': ..., 'resets': ...,
                 #  'http_503_tensorstore': ..., 'requests_gcsfs': ..., ...}
  proxy.stop()

Per request, in this order:
  * `delay_s` of latency before it is forwarded (every request, as a round trip to GCS costs);
  * with probability `error_rate` it is answered 503 or 429 (half each) with GCS's JSON error body
    *without* reaching the server: a retry then sees the object as it was;
  * with probability `reset_rate`, a GET's response is cut after half its body (headers announce
    the whole length) and the connection reset. Only GETs: a reset write may or may not have
    been applied, and a test that compares end states needs a fault the client can always repair.
  * or, with `every=N`, deterministically: every N-th request of each client (counted per
    client) fails, in turn 503, 429 and a reset (held for that client's next GET), so each
    client that makes enough requests meets each kind whatever order threads send them in;
  * `fail_object(name, count)`: the next `count` requests whose URL names an object containing
    `name` are answered 503, whatever else is set: an outage of one object longer than a client's
    own retries (gcsfs gives up after 6 attempts);
  * `max_faults` caps the faults of each kind (503, 429, reset) per client (`client_of`: gcsfs,
    tensorstore, other) from the start or the last `set_faults`: clients wait about a second
    before their first retry, so a test bounds the time its faults cost.
Answers are forwarded unchanged except `Location` (resumable uploads), which is rewritten to
point at the proxy so an upload's later requests also go through it. The first `skip` requests
are passed through without faults (start-up, bucket creation).

The proxy is aiohttp (a server and a client session) on its own event loop in a daemon thread;
`counts` is a Counter updated under a lock. A test utility, not part of the package.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import socket
import threading

from tests import gcs_server as gcs_server_lib

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


class FaultProxy:
  """See the module docstring."""

  def __init__(self, upstream: str, *, delay_s: float = 0.0, error_rate: float = 0.0,
               reset_rate: float = 0.0, seed: int = 0, skip: int = 0,
               max_faults: int | None = None, every: int = 0):
    self.upstream = upstream.rstrip("/")
    self.delay_s, self.error_rate, self.reset_rate = delay_s, error_rate, reset_rate
    self.skip = skip
    self.max_faults = max_faults
    self.every = every
    self._due: dict[str, int] = {}  # per client: the scheduled fault's turn (every=N)
    self._fault_base: collections.Counter = collections.Counter()
    self._outages: dict[str, int] = {}  # object-name fragment -> 503s still to answer
    self._in_flight = 0  # requests being answered now; counts['max_in_flight'] is the peak
    self.counts: collections.Counter = collections.Counter()
    self._random = random.Random(seed)
    self._lock = threading.Lock()
    self._loop: asyncio.AbstractEventLoop | None = None
    self._thread: threading.Thread | None = None
    self._runner = None
    self._session = None
    self.port = 0
    self.endpoint = ""

  # ------------------------------------------------------------------------ life cycle

  def start(self) -> "FaultProxy":
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.endpoint = f"http://127.0.0.1:{self.port}"
    ready = threading.Event()
    self._loop = asyncio.new_event_loop()

    def serve():
      asyncio.set_event_loop(self._loop)
      self._loop.run_until_complete(self._start_server())
      ready.set()
      self._loop.run_forever()

    self._thread = threading.Thread(target=serve, name="gcs-fault-proxy", daemon=True)
    self._thread.start()
    if not ready.wait(20):
      raise RuntimeError("the fault proxy did not start")
    return self

  async def _start_server(self) -> None:
    from aiohttp import web  # pylint: disable=import-outside-toplevel
    import aiohttp  # pylint: disable=import-outside-toplevel
    self._session = aiohttp.ClientSession(
        auto_decompress=False, connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=300))
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", self._handle)
    self._runner = web.AppRunner(app, access_log=None)
    await self._runner.setup()
    await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

  def stop(self) -> None:
    if self._loop is None:
      return

    async def close():
      await self._runner.cleanup()
      await self._session.close()

    asyncio.run_coroutine_threadsafe(close(), self._loop).result(30)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(30)
    self._loop.close()
    self._loop = None

  def env(self) -> dict[str, str]:
    """The environment that points every GCS client at the proxy (tests/gcs_server.py)."""
    server = gcs_server_lib.GcsServer()
    server.endpoint = self.endpoint
    return server.env()

  def set_faults(self, *, delay_s=None, error_rate=None, reset_rate=None, max_faults=-1,
                 every=None) -> None:
    """Changes the faults from the next request on (max_faults: -1 keeps it, None = no cap)."""
    with self._lock:
      self._fault_base = collections.Counter(self.counts)  # the cap counts from here
      if every is not None:
        self.every = every
        self._due.clear()
      if max_faults != -1:
        self.max_faults = max_faults
      if delay_s is not None:
        self.delay_s = delay_s
      if error_rate is not None:
        self.error_rate = error_rate
      if reset_rate is not None:
        self.reset_rate = reset_rate

  def fail_object(self, name: str, count: int) -> None:
    """Answers the next `count` requests for objects whose name contains `name` with 503."""
    with self._lock:
      self._outages[name] = count

  def _in_outage(self, request) -> bool:
    from urllib.parse import unquote  # pylint: disable=import-outside-toplevel
    url = unquote(request.path_qs)
    with self._lock:
      for name, left in self._outages.items():
        if left > 0 and name in url:
          self._outages[name] = left - 1
          self.counts["http_503_outage"] += 1
          return True
    return False

  # ------------------------------------------------------------------------ one request

  @staticmethod
  def client_of(user_agent: str) -> str:
    """Which client sent a request: tensorstore (checkpoints), gcsfs (everything else through
    fsspec) or another (google-cloud-storage, array_record's client)."""
    agent = user_agent.lower()
    for name in ("tensorstore", "gcsfs"):
      if name in agent:
        return name
    return "other"

  def _draw(self, method: str, client: str) -> str:
    """What happens to the next request: 'pass', '503', '429' or 'reset'. The cap on faults
    holds per client, so each client that makes enough requests meets every kind of fault."""
    with self._lock:
      self.counts["requests"] += 1
      self.counts[f"requests_{method}"] += 1
      self.counts[f"requests_{client}"] += 1
      if self.counts["requests"] <= self.skip:
        return "pass"
      fate = "pass"
      if self.every:
        n = self.counts[f"requests_{client}"] - self._fault_base[f"requests_{client}"]
        turn = self._due.get(client)
        if turn is None and n % self.every == 0:
          turn = self._due[client] = (n // self.every - 1) % 3
        if turn is not None and (turn < 2 or method == "GET"):
          del self._due[client]
          fate = ("503", "429", "reset")[turn]
      else:
        x = self._random.random()
        if x < self.error_rate:
          fate = "503" if self._random.random() < 0.5 else "429"
        elif method == "GET" and x < self.error_rate + self.reset_rate:
          fate = "reset"
      counter = {"503": "http_503", "429": "http_429", "reset": "resets"}.get(fate)
      if counter is None:
        return fate
      mine = f"{counter}_{client}"
      if (self.max_faults is not None
          and self.counts[mine] - self._fault_base[mine] >= self.max_faults):
        return "pass"
      self.counts[counter] += 1
      self.counts[mine] += 1
      return fate

  def _count(self, what: str) -> None:
    with self._lock:
      self.counts[what] += 1

  async def _handle(self, request):
    with self._lock:
      self._in_flight += 1
      self.counts["max_in_flight"] = max(self.counts["max_in_flight"], self._in_flight)
    try:
      return await self._answer(request)
    finally:
      with self._lock:
        self._in_flight -= 1

  async def _answer(self, request):
    from aiohttp import web  # pylint: disable=import-outside-toplevel
    if self._in_outage(request):
      fate = "503"
    else:
      fate = self._draw(request.method, self.client_of(request.headers.get("User-Agent", "")))
    if self.delay_s:
      await asyncio.sleep(self.delay_s)
    body = await request.read()
    if fate in ("503", "429"):
      status = int(fate)
      message = "Service Unavailable" if status == 503 else "Too Many Requests"
      return web.Response(status=status, content_type="application/json", text=json.dumps(
          {"error": {"code": status, "message": message,
                     "errors": [{"message": message, "reason": "backendError"}]}}))
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    async with self._session.request(request.method, self.upstream + request.path_qs,
                                     headers=headers, data=body if body else None,
                                     allow_redirects=False) as upstream:
      payload = await upstream.read()
      out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
      if "Location" in out_headers:
        out_headers["Location"] = out_headers["Location"].replace(self.upstream, self.endpoint)
      status = upstream.status
    if fate == "reset" and len(payload) >= 2:
      response = web.StreamResponse(status=status, headers=out_headers)
      response.content_length = len(payload)
      await response.prepare(request)
      await response.write(payload[:len(payload) // 2])
      request.transport.abort()
      return response
    self._count("forwarded")
    return web.Response(status=status, headers=out_headers, body=payload)

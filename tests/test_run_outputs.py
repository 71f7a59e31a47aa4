"""What a run leaves behind besides checkpoints: metrics.jsonl and TensorBoard events (locally and
on gs://, through resumes and store failures), the samples printed at the end, and the held-out
AUC. gs:// runs against the real GCS API server of tests/gcs_server.py, reached through a small
HTTP proxy here that counts the bytes each request sends (and can refuse requests: an outage)."""

import http.client
import http.server
import json
import logging
import os
import shutil
import struct
import sys
import threading
import urllib.parse

import chex
import fsspec
import google_crc32c
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from configs import tiny
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import evaluation
from deberta_jax.pretraining import samples
from deberta_jax.pretraining import train
from deberta_jax.pretraining import train_step as ts
from deberta_jax.runtime import metrics
from tests import gcs_server as gcs_lib
from tests.gcs_server import gcs_bucket, gcs_server  # noqa: F401  pylint: disable=unused-import
from tests.overrides import apply_overrides

# ------------------------------------------------------------------------------------- helpers


def _scalars(step: int, n: int = 24) -> dict:
  """A log step's worth of scalars with names as long as the trainer's."""
  return {f"some_training_metric_with_a_long_name_{i:02d}": step + i / 100 for i in range(n)}


def _masked_crc(data: bytes) -> int:
  x = google_crc32c.value(data)
  return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _events(content: bytes) -> list:
  """The events of a TensorBoard event file, each record's framing and checksums verified."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out, at = [], 0
  while at < len(content):
    header = content[at:at + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", content[at + 8:at + 12])[0] == _masked_crc(header)
    data = content[at + 12:at + 12 + length]
    assert struct.unpack("<I", content[at + 12 + length:at + 16 + length])[0] == _masked_crc(data)
    out.append(event_pb2.Event.FromString(data))
    at += 16 + length
  assert at == len(content)
  return out


def _scalar_steps(events) -> list:
  return [e.step for e in events if e.HasField("summary")]


def _purge_steps(events) -> list:
  return [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]


def _raw_steps(content: bytes) -> list:
  return [json.loads(line)["step"] for line in content.decode().splitlines() if line.strip()]


# ---------------------------------------------------------------------- metrics: local resumes


def test_a_resume_drops_the_records_past_the_restored_step(tmp_path):
  """A run killed after logging steps 0..9 (the last line half written) resumes from checkpoint
  6: the file then holds every step once, and the new event file purges TensorBoard's view from
  step 7. A run that restarts from scratch (step 0) keeps nothing of the earlier attempt."""
  workdir = str(tmp_path / "run")
  first = metrics.MetricWriter(workdir, 20)
  for step in range(10):
    first.write(step, {"loss": float(step)})
  first.close()
  (first_events,) = os.listdir(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "metrics.jsonl"), "ab") as f:
    f.write(b'{"step": 10, "lo')  # killed while writing

  resumed = metrics.MetricWriter(workdir, 20, start_step=6)
  for step in (7, 8):
    resumed.write(step, {"loss": 100.0 + step})
  resumed.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
    assert _raw_steps(f.read()) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
  by_step = {r["step"]: r["loss"] for r in metrics.read_metrics(workdir)}
  assert by_step == {**{s: float(s) for s in range(7)}, 7: 107.0, 8: 108.0}
  (second_events,) = set(os.listdir(os.path.join(workdir, "tensorboard"))) - {first_events}
  with open(os.path.join(workdir, "tensorboard", second_events), "rb") as f:
    events = _events(f.read())
  assert _purge_steps(events) == [7] and _scalar_steps(events) == [7, 8]

  restarted = metrics.MetricWriter(workdir, 20, start_step=0)
  restarted.write(0, {"loss": -1.0})
  restarted.close()
  assert metrics.read_metrics(workdir) == [{"step": 0, "loss": -1.0}]


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
  """Files written by resumed runs of older versions repeat steps; the resumed run's (the later)
  record is the one read, and a half-written last line is skipped."""
  lines = [{"step": s, "v": s} for s in (0, 1, 2, 3)] + [{"step": s, "v": 10 + s} for s in (2, 3)]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "v"')
  assert metrics.read_metrics(str(tmp_path)) == [
      {"step": 0, "v": 0}, {"step": 1, "v": 1}, {"step": 2, "v": 12}, {"step": 3, "v": 13}]


def test_a_failed_local_write_is_kept_and_written_later(tmp_path, monkeypatch, caplog):
  """metrics.jsonl cannot be opened (a directory is in its way): the writes warn instead of
  raising, and once it can, every record is written in order."""
  monkeypatch.setattr(metrics, "RETRY_DELAYS_S", (0.0, 0.0), raising=False)
  workdir = tmp_path / "run"
  (workdir / "metrics.jsonl").mkdir(parents=True)
  writer = metrics.MetricWriter(str(workdir), 10)
  with caplog.at_level(logging.WARNING):
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 2.0})
  assert "metrics.jsonl: write failed after 3 attempt(s)" in caplog.text
  assert "metrics.jsonl: write failed after 1 attempt(s)" in caplog.text
  (workdir / "metrics.jsonl").rmdir()
  writer.write(3, {"loss": 3.0})
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(str(workdir))] == [1, 2, 3]


# ----------------------------------------------------------------------------- metrics: gs://


class _Proxy(http.server.ThreadingHTTPServer):
  """Forwards HTTP requests to the GCS server, counting each request's body bytes. With
  `refuse` set it answers 403 without forwarding (an outage that clients do not retry
  themselves); `lose_answer(method, path)` forwards the request but answers 403 (the request
  took effect, its answer was lost)."""

  daemon_threads = True

  def handle_error(self, request, client_address):
    if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no error
      super().handle_error(request, client_address)

  def __init__(self, target: str):
    super().__init__(("127.0.0.1", 0), _ProxyHandler)
    self.target = urllib.parse.urlsplit(target)
    self.sent = []  # (method, path, body bytes) of every forwarded request
    self.refused = 0
    self.refuse = False
    self.lose_answer = lambda method, path: False
    self.lock = threading.Lock()

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"

  def bytes_sent(self) -> int:
    with self.lock:
      return sum(n for _, _, n in self.sent)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):  # quiet
    pass

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      body = b""
      while True:
        size = int(self.rfile.readline().split(b";")[0], 16)
        chunk = self.rfile.read(size + 2)[:size]
        if not size:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return body
        body += chunk
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _answer(self, status: int, headers: list, body: bytes) -> None:
    self.send_response(status)
    for name, value in headers:
      if name.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive"):
        self.send_header(name, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _forward(self):
    proxy: _Proxy = self.server
    body = self._body()
    refusal = json.dumps({"error": {"code": 403, "message": "refused by the test"}}).encode()
    if proxy.refuse:
      with proxy.lock:
        proxy.refused += 1
      self._answer(403, [("Content-Type", "application/json")], refusal)
      return
    with proxy.lock:
      proxy.sent.append((self.command, self.path, len(body)))
    conn = http.client.HTTPConnection(proxy.target.hostname, proxy.target.port, timeout=60)
    try:
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in ("host", "transfer-encoding", "content-length", "connection")}
      headers["Content-Length"] = str(len(body))
      conn.request(self.command, self.path, body=body, headers=headers)
      response = conn.getresponse()
      content = response.read()
      if proxy.lose_answer(self.command, self.path):
        self._answer(403, [("Content-Type", "application/json")], refusal)
      else:
        self._answer(response.status, response.getheaders(), content)
    finally:
      conn.close()

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward


@pytest.fixture
def proxied_dir(gcs_server, gcs_bucket, monkeypatch, request):  # pylint: disable=redefined-outer-name
  """(proxy, gs://BUCKET/PREFIX): every gs:// client of this process goes through the proxy."""
  proxy = _Proxy(gcs_server.endpoint)
  thread = threading.Thread(target=proxy.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
  gcs_lib.clear_filesystem_caches()
  try:
    yield proxy, f"{gcs_bucket}/{request.node.name[:40]}-{os.getpid()}"
  finally:
    proxy.refuse, proxy.lose_answer = False, lambda method, path: False
    gcs_lib.detach_tensorboardx_writers()  # tensorboardX's own gs:// writers upload at exit
    monkeypatch.undo()
    gcs_lib.clear_filesystem_caches()
    proxy.shutdown()
    proxy.server_close()


def _read(path: str) -> bytes:
  fs = fsspec.filesystem("gs")
  fs.invalidate_cache()
  return fs.cat_file(path)


def test_gcs_log_steps_send_only_their_own_bytes(proxied_dir):
  """60 log steps to a gs:// workdir: the bytes sent to the store stay within the size of what
  was written plus a fixed cost per request (a whole-file upload at every step sends the first
  records 60 times), and both files read back whole."""
  proxy, workdir = proxied_dir
  writer = metrics.MetricWriter(workdir, 100)
  steps = list(range(1, 61))
  for step in steps:
    writer.write(step, _scalars(step))
  writer.close()
  fs = fsspec.filesystem("gs")
  fs.invalidate_cache()
  jsonl = _read(f"{workdir}/metrics.jsonl")
  (event_file,) = [p for p in fs.ls(f"{workdir}/tensorboard") if "tfevents" in p]
  event_bytes = _read(f"gs://{event_file}")
  written = len(jsonl) + len(event_bytes)
  sent, requests = proxy.bytes_sent(), len(proxy.sent)
  print(f"{len(steps)} log steps: {written} bytes written, {sent} bytes sent in {requests} "
        "requests")
  assert sent <= written + 1024 * requests
  assert _raw_steps(jsonl) == steps
  assert _scalar_steps(_events(event_bytes)) == steps
  staging = f"{workdir}/{metrics.STAGING_DIR}"
  assert not fs.exists(staging) or not fs.ls(staging)  # every temporary object deleted


def test_gcs_resume_drops_later_records_and_appends(proxied_dir):
  """The resume rule on gs://: records past the restored step are dropped once, then appended."""
  _, workdir = proxied_dir
  first = metrics.MetricWriter(workdir, 20)
  for step in range(6):
    first.write(step, {"loss": float(step)})
  first.close()
  resumed = metrics.MetricWriter(workdir, 20, start_step=3)
  for step in (4, 5, 6):
    resumed.write(step, {"loss": 10.0 + step})
  resumed.close()
  assert _raw_steps(_read(f"{workdir}/metrics.jsonl")) == [0, 1, 2, 3, 4, 5, 6]
  assert metrics.read_metrics(workdir)[-1] == {"step": 6, "loss": 16.0}


def test_gcs_outage_is_retried_then_written_with_the_next_write(proxied_dir, monkeypatch, caplog):
  """While the store refuses every request, writes warn (after bounded retries for the first)
  and never raise; the next write after it answers again stores every record once, in order.
  An append whose answer is lost (it did take effect) is not appended twice."""
  monkeypatch.setattr(metrics, "RETRY_DELAYS_S", (0.0, 0.0), raising=False)
  proxy, workdir = proxied_dir
  writer = metrics.MetricWriter(workdir, 20)
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 2.0})
  proxy.refuse = True
  with caplog.at_level(logging.WARNING):
    writer.write(3, {"loss": 3.0})
    first = proxy.refused
    writer.write(4, {"loss": 4.0})
  assert first == 2 * (len(metrics.RETRY_DELAYS_S) + 1)  # two files, each with its retries
  assert proxy.refused - first == 2  # still failing: one attempt each
  assert "write failed after 3 attempt(s)" in caplog.text
  proxy.refuse = False
  lost = {"n": 0}

  def lose_one_compose(method, path):
    if method == "POST" and path.split("?")[0].endswith("/compose") and not lost["n"]:
      lost["n"] += 1
      return True
    return False

  proxy.lose_answer = lose_one_compose
  writer.write(5, {"loss": 5.0})
  assert lost["n"] == 1
  writer.write(6, {"loss": 6.0})
  writer.close()
  assert _raw_steps(_read(f"{workdir}/metrics.jsonl")) == [1, 2, 3, 4, 5, 6]
  fs = fsspec.filesystem("gs")
  fs.invalidate_cache()
  (events_file,) = [p for p in fs.ls(f"{workdir}/tensorboard") if "tfevents" in p]
  assert _scalar_steps(_events(_read(f"gs://{events_file}"))) == [1, 2, 3, 4, 5, 6]


# -------------------------------------------------------------------- the samples at the end


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """The tiny config's tokenizer size: 2000 pieces for 2048 embedding rows (47 spare ids)."""
  path = tokenizer_lib.train_spm(corpus_lib.embedded_documents(1_000_000), 2000,
                                 str(tmp_path_factory.mktemp("spm") / "spm"))
  tok = tokenizer_lib.Tokenizer(path)
  assert tok.num_pieces == 2000 and tiny.get_config().model.vocab_size == 2048
  return tok


def test_ids_without_a_piece_are_named(tokenizer):
  assert tokenizer.id_to_piece(tokenizer.mask_id) == "[MASK]"
  assert tokenizer.id_to_piece(tokenizer.mask_id + 1) == "[unused0]"
  assert tokenizer.id_to_piece(2047) == "[unused46]"
  assert tokenizer.id_to_piece(0) == "[PAD]"


def _held_out(tokenizer, rows=3, length=64):
  texts = [t for t in corpus_lib.embedded_documents(200_000)][:rows]
  ids = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, text in enumerate(texts):
    pieces = [tokenizer.cls_id, *tokenizer.encode(text)[:length - 2], tokenizer.sep_id]
    ids[r, :len(pieces)], mask[r, :len(pieces)] = pieces, 1
  return {"input_ids": ids, "attention_mask": mask}


def _with_generator_bias(params, bias: np.ndarray):
  """`params` with the generator's LM-head bias (one logit offset per vocabulary row) replaced."""
  generator = dict(params["generator"])
  generator["lm_head"] = {**generator["lm_head"], "bias": jnp.asarray(bias)}
  return {**params, "generator": generator}


def test_samples_of_spare_ids_are_shown_and_never_fail_the_run(tokenizer, caplog):
  """The generator forced to sample only the spare rows above [MASK] (their bias far above every
  piece's): the end-of-run lines name them. An exception inside log_samples (here a batch
  without attention_mask) is a warning, not a failed run (the end-to-end test below runs its
  ordinary path)."""
  config = tiny.get_config()
  model = RTDModel.from_config(config)
  params = meta.unbox(model.init(jax.random.key(0), 64))
  bias = np.zeros(config.model.vocab_size, np.float32)
  bias[tokenizer.mask_id + 1:] = 60.0
  params = _with_generator_bias(params, bias)
  batch = _held_out(tokenizer)
  lines = samples.describe(model, params, tokenizer, batch, config, seed=0)
  replaced = [line for line in lines if "replaced by the generator" in line]
  assert len(replaced) == 3 and all("[unused" in line for line in replaced), replaced
  with caplog.at_level(logging.WARNING):
    samples.log_samples(model, params, tokenizer, lambda: {"input_ids": batch["input_ids"]},
                        config, seed=0)
  assert "Could not show the held-out samples" in caplog.text


def test_padded_vocabulary_rows_are_never_sampled_or_counted():
  """A vocabulary padded to a multiple of 128 (2010 -> 2048 rows): even with parameters that
  make the 38 padded rows win by far, the generator's logits give them the float32 minimum, so
  sampling never draws them, and the MLM loss equals the loss over the real rows alone."""
  config = apply_overrides(tiny.get_config(), {"model.vocab_size": 2010})
  model = RTDModel.from_config(config)
  params = meta.unbox(model.init(jax.random.key(0), 32))
  assert model.generator_config.padded_vocab_size == 2048
  bias = np.zeros(2048, np.float32)
  bias[2010:] = 1e4
  params = _with_generator_bias(params, bias)
  rng = np.random.default_rng(0)
  ids = rng.integers(4, 2000, size=(4, 32)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 1, 2
  attention = np.ones_like(ids)
  positions = jnp.tile(jnp.arange(1, 9)[None], (4, 1))
  logits = model.generator_logits(params["generator"], jnp.asarray(ids), jnp.asarray(attention),
                                  positions, None, deterministic=True)
  flat = np.asarray(logits).reshape(4, 8, -1)
  assert flat.shape[-1] >= 2048
  assert np.all(flat[..., 2010:] == np.finfo(np.float32).min)
  for seed in range(2):
    sampled = ts.sample_rows(jax.random.key(seed), jnp.arange(4), logits, 1.0)
    assert int(jnp.max(sampled)) < 2010
  labels = jnp.asarray(ids[:, 1:9])
  weights = jnp.ones((4, 8), jnp.float32)
  from deberta_jax.pretraining import losses  # pylint: disable=import-outside-toplevel
  got = losses.mlm_sums(logits, labels, weights)["mlm_loss_sum"]
  real = flat[..., :2010].astype(np.float64)
  top = real.max(-1, keepdims=True)
  expected = np.sum(np.log(np.exp(real - top).sum(-1)) + top[..., 0] -
                    np.take_along_axis(real, np.asarray(labels)[..., None], -1)[..., 0])
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


# --------------------------------------------------------------------------- end to end, local


def test_a_resumed_run_logs_each_step_once_and_ends_with_samples(cache_dir, tmp_path, caplog):
  """The tiny config for 4 steps (evaluation at 0, 2, 4), then as if killed after logging steps 3
  and 4 but before checkpoint 4 was written: the rerun resumes from 2 and logs 3 and 4 again.
  metrics.jsonl then holds each step once, and each run returns normally after printing its
  held-out samples (2000 pieces, 2048 rows)."""
  config = apply_overrides(tiny.get_config(), {
      "data.cache_dir": cache_dir, "mesh.num_devices": 1, "num_train_steps": 4,
      "log.every_steps": 1, "ckpt.every_steps": 2, "ckpt.async_save": False,
      "eval.every_steps": 2, "eval.num_batches": 1})
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.INFO):
    train.run(config, workdir)
  assert "sentence 1:" in caplog.text
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    train.run(config, workdir)
  assert "Resumed from step 2" in caplog.text and "sentence 1:" in caplog.text
  with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
    assert _raw_steps(f.read()) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------------------- AUC


def _exact_auc(scores, labels) -> float:
  """Mann-Whitney: mean rank of the positives among all scores (ties get their mean rank)."""
  scores = np.asarray(scores, np.float64)
  order = np.argsort(scores, kind="stable")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  i = 0
  while i < len(scores):  # average ranks over runs of equal scores
    j = i
    while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  positive = np.asarray(labels, bool)
  n_pos, n_neg = positive.sum(), (~positive).sum()
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("scale", [1.0, 5.0, 40.0])
def test_histogram_auc_matches_the_exact_auc_at_any_logit_scale(scale):
  """Logits of an ordinary (scale 1) and a confident discriminator (scale 40: most beyond +-16),
  with pad tokens left out by their weight: the histogram AUC equals the exact one to 1e-3."""
  rng = np.random.default_rng(int(scale))
  replaced = rng.random((16, 128)) < 0.15
  logits = (rng.normal(size=replaced.shape) + np.where(replaced, 1.2, -1.2)) * scale
  weights = np.ones_like(logits)
  weights[3, 100:] = 0.0
  keep = weights.reshape(-1) > 0
  exact = _exact_auc(logits.reshape(-1)[keep], replaced.reshape(-1)[keep])
  positive, negative = jax.jit(evaluation._histograms)(  # pylint: disable=protected-access
      jnp.asarray(logits, jnp.float32), jnp.asarray(replaced), jnp.asarray(weights))
  auc = evaluation.auc_from_histograms(np.asarray(positive), np.asarray(negative))
  print(f"scale {scale}: exact {exact:.6f} histogram {auc:.6f}")
  assert abs(auc - exact) < 1e-3


def test_histogram_auc_error_is_within_its_bound():
  """Ties, zeros of both signs and infinities; the bound the function returns holds and is
  exactly the share of pairs that tie in a bin when all scores are equal."""
  logits = np.array([-np.inf, -40.0, -0.0, 0.0, 1e-30, 3.0, 3.0, 3.0000002, 1e30, np.inf],
                    np.float32)
  replaced = np.array([0, 0, 1, 0, 0, 1, 0, 1, 0, 1], bool)
  positive, negative = evaluation._histograms(  # pylint: disable=protected-access
      jnp.asarray(logits), jnp.asarray(replaced), jnp.ones(logits.shape))
  auc, bound = evaluation.auc_from_histograms(np.asarray(positive), np.asarray(negative),
                                              with_bound=True)
  exact = _exact_auc(logits.astype(np.float64), replaced)
  assert abs(auc - exact) <= bound + 1e-12
  same = np.zeros(8, np.float32)
  positive, negative = evaluation._histograms(  # pylint: disable=protected-access
      jnp.asarray(same), jnp.asarray(np.arange(8) % 2 == 0), jnp.ones(8))
  chex.assert_trees_all_close(
      evaluation.auc_from_histograms(np.asarray(positive), np.asarray(negative), with_bound=True),
      (0.5, 0.5))

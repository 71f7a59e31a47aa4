"""Metric writing: TensorBoard events, metrics.jsonl and a console line, from process 0 only.

TensorBoard events come from tensorboardX (no TensorFlow needed). Each logged step is one JSON
object per line in `metrics.jsonl`, which tests and notebooks read without TensorBoard.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
from etils import epath
from tensorboardX import SummaryWriter

from deberta_jax.runtime import paths


class MetricWriter:
  """Writes scalars for one run; a no-op on processes other than 0."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self._start_time = None
    self._start_step = None
    self._jsonl = None
    self._tb = None
    if enabled:
      self._jsonl = _JsonLines(os.path.join(workdir, "metrics.jsonl"))
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))  # also gs:// and s3://

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    now = time.time()
    if self._start_time is None:
      self._start_time, self._start_step = now, step
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.append(json.dumps(record))
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), int(step))
    self._tb.flush()
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
                      "eval_rtd_auc") if k in scalars)
    return f"step {step}/{self.total_steps} ({100 * done:.1f}%){eta} {shown}"

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


class _JsonLines:
  """Appends lines to a local file; on object stores (gs://, which cannot append) the file is
  rewritten whole at each write, which for one line per logged step stays small."""

  def __init__(self, path: str):
    self._remote = paths.is_remote(path)
    if self._remote:
      self._path = epath.Path(path)
      self._lines = self._path.read_text().splitlines() if self._path.exists() else []
    else:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      self._file = open(path, "a", encoding="utf-8")

  def append(self, line: str) -> None:
    if self._remote:
      self._lines.append(line)
      self._path.write_text("\n".join(self._lines) + "\n")
    else:
      self._file.write(line + "\n")
      self._file.flush()

  def close(self) -> None:
    if not self._remote:
      self._file.close()


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl, oldest first."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]

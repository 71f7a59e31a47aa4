"""GLUE tasks: the task table, reading GLUE-format TSV files or tfds `glue/*`, and tokenization.

Every task of the benchmark is a row of `TASKS`: where its text and label live in the published
TSV files (by header name; CoLA's files have no header, so by column index), its labels (None for
the STS-B regression), the metrics it is scored by and its dev splits (MNLI: matched and
mismatched). The label order of each task is tfds's, so a model trained from TSV files and one
trained from tfds agree on what class 0 means.

Inputs are encoded the way DebertaV2 does: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`, a pair
truncated longest-first (HF's default) to `max_seq_length`. Token type ids (0 for the first
segment, 1 for the second) are produced for completeness; DeBERTaV3 has `type_vocab_size` 0 and
does not read them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from deberta_jax.data import DataError
from deberta_jax.data.spm import CLS_ID
from deberta_jax.data.spm import PAD_ID
from deberta_jax.data.spm import SEP_ID


@dataclasses.dataclass(frozen=True)
class Task:
  """One GLUE task: TSV layout, labels, metrics and its tfds twin."""

  name: str                       # our name, as in --config.task
  dir_name: str                   # the directory of its TSV files in a GLUE download
  text_a: str | int               # header name of the first sentence (int: column index)
  text_b: str | int | None        # header name of the second sentence; None: single sentence
  label: str | int                # header name of the label
  labels: tuple[str, ...] | None  # label strings in class-index order; None: regression
  metrics: tuple[str, ...]        # keys of glue_metrics.METRICS; the task score is their mean
  eval_files: tuple[tuple[str, str], ...] = (("dev", "dev.tsv"),)
  header: bool = True
  tfds_a: str = "sentence"        # feature names in tfds glue/<name>
  tfds_b: str | None = None
  tfds_eval_splits: tuple[tuple[str, str], ...] = (("dev", "validation"),)

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def num_labels(self) -> int:
    return 1 if self.labels is None else len(self.labels)

  @property
  def eval_splits(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.eval_files)


_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cola", "CoLA", 3, None, 1, ("0", "1"), ("matthews_corrcoef",), header=False),
    Task("sst2", "SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",)),
    Task("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("f1", "accuracy"),
         tfds_a="sentence1", tfds_b="sentence2"),
    Task("qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("f1", "accuracy"),
         tfds_a="question1", tfds_b="question2"),
    Task("stsb", "STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman"),
         tfds_a="sentence1", tfds_b="sentence2"),
    Task("mnli", "MNLI", "sentence1", "sentence2", "gold_label",
         ("entailment", "neutral", "contradiction"), ("accuracy",),
         eval_files=(("dev_matched", "dev_matched.tsv"), ("dev_mismatched", "dev_mismatched.tsv")),
         tfds_a="premise", tfds_b="hypothesis",
         tfds_eval_splits=(("dev_matched", "validation_matched"),
                           ("dev_mismatched", "validation_mismatched"))),
    Task("qnli", "QNLI", "question", "sentence", "label", _NLI2, ("accuracy",),
         tfds_a="question", tfds_b="sentence"),
    Task("rte", "RTE", "sentence1", "sentence2", "label", _NLI2, ("accuracy",),
         tfds_a="sentence1", tfds_b="sentence2"),
    Task("wnli", "WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("accuracy",),
         tfds_a="sentence1", tfds_b="sentence2"),
]}
# Other spellings of the task names (GLUE directory names, HF names).
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def get_task(name: str) -> Task:
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  if key not in TASKS:
    raise DataError(f"config.task={name!r} is not a GLUE task; known: {', '.join(TASKS)}")
  return TASKS[key]


@dataclasses.dataclass
class Split:
  """Raw examples of one split: texts and labels (int class ids, or float scores)."""

  text_a: list[str]
  text_b: list[str] | None
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.text_a)

  def take(self, n: int) -> "Split":
    """The first n examples (all when n <= 0)."""
    if n <= 0 or n >= len(self):
      return self
    return Split(self.text_a[:n], None if self.text_b is None else self.text_b[:n],
                 self.labels[:n])


# ------------------------------------------------------------------------------------------- TSV

def task_dir(task: Task, glue_dir: str) -> str:
  """The task's TSV directory: GLUE_DIR/<CoLA|SST-2|...>, or GLUE_DIR itself when it holds
  train.tsv (a directory of just that task)."""
  if os.path.isfile(os.path.join(glue_dir, "train.tsv")):
    return glue_dir
  for name in (task.dir_name, task.name, task.name.upper()):
    path = os.path.join(glue_dir, name)
    if os.path.isdir(path):
      return path
  raise DataError(f"config.glue_dir={glue_dir!r} has no {task.dir_name}/ directory (nor a "
                  f"train.tsv of its own) for task {task.name!r}")


def read_tsv(task: Task, path: str) -> Split:
  """Examples of one GLUE-format TSV file; rows with too few columns are skipped (QQP has some)."""
  if not os.path.isfile(path):
    raise DataError(f"GLUE file not found: {path}")
  with open(path, encoding="utf-8-sig") as f:  # no csv module: GLUE text holds unbalanced quotes
    rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
  if not rows:
    raise DataError(f"{path} is empty")
  start = 0
  if task.header:
    header = rows[0]
    start = 1
    def column(key):
      if key is None or isinstance(key, int):
        return key
      if key not in header:
        raise DataError(f"{path}: no column {key!r} in the header {header} (task {task.name})")
      return header.index(key)
    # MNLI/STS-B keep the label in the last column; headers may be shorter than data rows.
    ia, ib, il = column(task.text_a), column(task.text_b), column(task.label)
    if task.name in ("mnli", "stsb"):
      il = -1
  else:
    ia, ib, il = task.text_a, task.text_b, task.label
  needed = max(i for i in (ia, ib, il) if i is not None and i >= 0) + 1
  text_a, text_b, labels, skipped = [], [], [], 0
  for number, row in enumerate(rows[start:], start=start + 1):
    if len(row) < needed:
      skipped += 1
      continue
    raw = row[il].strip()
    if task.is_regression:
      try:
        labels.append(float(raw))
      except ValueError:
        raise DataError(f"{path} line {number}: label {raw!r} is not a number") from None
    else:
      if raw not in task.labels:
        if number == 1 and not task.header:   # a headed copy of a header-less file
          continue
        raise DataError(f"{path} line {number}: label {raw!r} is not one of {list(task.labels)}")
      labels.append(task.labels.index(raw))
    text_a.append(row[ia])
    if ib is not None:
      text_b.append(row[ib])
  if skipped:
    logging.warning("%s: skipped %d rows with fewer than %d columns", path, skipped, needed)
  if not text_a:
    raise DataError(f"{path}: no usable rows for task {task.name}")
  return Split(text_a, text_b if ib is not None else None,
               np.asarray(labels, np.float32 if task.is_regression else np.int32))


def read_glue_dir(task: Task, glue_dir: str) -> dict[str, Split]:
  """{'train': ..., <eval split>: ...} from a directory of GLUE TSV files."""
  path = task_dir(task, glue_dir)
  out = {"train": read_tsv(task, os.path.join(path, "train.tsv"))}
  for split, name in task.eval_files:
    out[split] = read_tsv(task, os.path.join(path, name))
  return out


# ------------------------------------------------------------------------------------------ tfds

def _tfds_source(name: str, split: str, data_dir: str):
  """tfds.data_source: no TensorFlow, so only datasets prepared as array_record can be read."""
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # DatasetNotFoundError, NotImplementedError..  pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".: ")
    raise DataError(f"cannot read tfds {name!r} split {split!r} (config.tfds_data_dir="
                    f"{data_dir!r}): {first}. Prepare it with file_format='array_record', or set "
                    f"config.glue_dir to a directory of GLUE TSV files.") from e


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_tfds_split(task: Task, split: str, data_dir: str, source_fn=None) -> Split:
  source = (source_fn or _tfds_source)(f"glue/{task.name}", split, data_dir)
  n = len(source)
  records = source.__getitems__(list(range(n))) if hasattr(source, "__getitems__") else \
      [source[i] for i in range(n)]
  text_a = [_text(r[task.tfds_a]) for r in records]
  text_b = [_text(r[task.tfds_b]) for r in records] if task.tfds_b else None
  labels = np.asarray([r["label"] for r in records],
                      np.float32 if task.is_regression else np.int32)
  if not task.is_regression and np.any(labels < 0):
    raise DataError(f"tfds glue/{task.name} split {split!r} has no labels (a test split?)")
  return Split(text_a, text_b, labels)


def read_tfds(task: Task, data_dir: str, source_fn=None) -> dict[str, Split]:
  out = {"train": read_tfds_split(task, "train", data_dir, source_fn)}
  for ours, theirs in task.tfds_eval_splits:
    out[ours] = read_tfds_split(task, theirs, data_dir, source_fn)
  return out


def load(task: Task, glue_dir: str = "", tfds_data_dir: str = "") -> dict[str, Split]:
  """The task's train and dev splits: from `glue_dir` TSV files, or tfds glue/<task> when ''."""
  if glue_dir:
    if not os.path.isdir(glue_dir):
      raise DataError(f"config.glue_dir={glue_dir!r} is not a directory")
    return read_glue_dir(task, glue_dir)
  return read_tfds(task, tfds_data_dir)


# ---------------------------------------------------------------------------------- tokenization

@dataclasses.dataclass
class Features:
  """Padded model inputs of a split: int32 [N, L] arrays and labels [N]."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray
  truncated: int = 0   # examples that lost tokens to max_seq_length

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def seq_len(self) -> int:
    return int(self.input_ids.shape[1])


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """HF 'longest_first': drop the last token of the longer segment (of b on ties) until
  len_a + len_b <= budget. Closed form of that loop."""
  if len_a + len_b <= budget:
    return len_a, len_b
  new_b = min(len_b, max(budget - len_a, budget // 2))
  return min(len_a, budget - new_b), new_b


def encode(split: Split, tokenizer, max_seq_length: int, pad_multiple: int = 8) -> Features:
  """[CLS] a [SEP] (b [SEP]) per example, right-padded with [PAD] to the longest example of the
  split rounded up to `pad_multiple` (at most max_seq_length): one shape per split, so each split
  compiles once, and short-sentence tasks do not pay for 512-token padding."""
  pair = split.text_b is not None
  special = 3 if pair else 2
  if max_seq_length <= special:
    raise DataError(f"config.max_seq_length={max_seq_length} leaves no room for text")
  budget = max_seq_length - special
  ids_a = tokenizer.encode_batch(split.text_a)
  ids_b = tokenizer.encode_batch(split.text_b) if pair else [None] * len(ids_a)
  rows, types, truncated = [], [], 0
  for a, b in zip(ids_a, ids_b):
    if pair:
      la, lb = truncate_pair(len(a), len(b), budget)
      truncated += (la, lb) != (len(a), len(b))
      row = np.concatenate([[CLS_ID], a[:la], [SEP_ID], b[:lb], [SEP_ID]])
      type_row = np.concatenate([np.zeros(la + 2, np.int32), np.ones(lb + 1, np.int32)])
    else:
      truncated += len(a) > budget
      row = np.concatenate([[CLS_ID], a[:budget], [SEP_ID]])
      type_row = np.zeros(len(row), np.int32)
    rows.append(row)
    types.append(type_row)
  longest = max(len(r) for r in rows)
  seq_len = min(max_seq_length, -(-longest // pad_multiple) * pad_multiple)
  input_ids = np.full((len(rows), seq_len), PAD_ID, np.int32)
  token_type_ids = np.zeros((len(rows), seq_len), np.int32)
  for i, (row, type_row) in enumerate(zip(rows, types)):
    input_ids[i, : len(row)] = row
    token_type_ids[i, : len(row)] = type_row
  attention_mask = (np.arange(seq_len)[None, :] < np.asarray([len(r) for r in rows])[:, None])
  return Features(input_ids, attention_mask.astype(np.int32), token_type_ids,
                  np.asarray(split.labels), truncated)


def label_names(task: Task) -> Sequence[str]:
  return ("score",) if task.labels is None else task.labels

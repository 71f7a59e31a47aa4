"""The GLUE scores, in numpy only (no scikit-learn or scipy at run time).

  accuracy            fraction of exact matches
  matthews_corrcoef   Matthews correlation (CoLA); the multi-class form (Gorodkin's R_K), which
                      equals the usual binary (TP*TN - FP*FN) / sqrt(...) for two classes;
                      0 when a marginal is constant (as scikit-learn does)
  f1                  F1 of the positive class 1 (MRPC, QQP)
  pearson, spearman   correlations of a regression (STS-B); Spearman ranks ties by their average

`compute(names, predictions, labels)` returns {name: value} for a task's metric list, and
`task_score` the single number a task is ranked by (GLUE's convention: the mean of its metrics).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


def accuracy(predictions, labels) -> float:
  p, y = np.asarray(predictions), np.asarray(labels)
  _check(p, y)
  return float(np.mean(p == y))


def matthews_corrcoef(predictions, labels) -> float:
  p, y = np.asarray(predictions).astype(np.int64), np.asarray(labels).astype(np.int64)
  _check(p, y)
  classes = np.unique(np.concatenate([p, y]))
  p_idx = np.searchsorted(classes, p)
  y_idx = np.searchsorted(classes, y)
  k = len(classes)
  confusion = np.zeros((k, k), np.float64)  # rows: true class, columns: predicted class
  np.add.at(confusion, (y_idx, p_idx), 1.0)
  t = confusion.sum(axis=1)   # occurrences of each true class
  q = confusion.sum(axis=0)   # occurrences of each predicted class
  c = np.trace(confusion)
  s = confusion.sum()
  numerator = c * s - np.dot(t, q)
  denominator = np.sqrt(s * s - np.dot(q, q)) * np.sqrt(s * s - np.dot(t, t))
  return 0.0 if denominator == 0 else float(numerator / denominator)


def f1(predictions, labels, positive: int = 1) -> float:
  p, y = np.asarray(predictions), np.asarray(labels)
  _check(p, y)
  tp = float(np.sum((p == positive) & (y == positive)))
  fp = float(np.sum((p == positive) & (y != positive)))
  fn = float(np.sum((p != positive) & (y == positive)))
  return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def pearson(predictions, labels) -> float:
  x = np.asarray(predictions, np.float64).reshape(-1)
  y = np.asarray(labels, np.float64).reshape(-1)
  _check(x, y)
  x, y = x - x.mean(), y - y.mean()
  denominator = np.sqrt(np.dot(x, x) * np.dot(y, y))
  return 0.0 if denominator == 0 else float(np.dot(x, y) / denominator)


def rankdata(values) -> np.ndarray:
  """Ranks 1..n, ties given the mean of the ranks they span (scipy's 'average' method)."""
  v = np.asarray(values, np.float64).reshape(-1)
  order = np.argsort(v, kind="mergesort")
  sorted_v = v[order]
  # Start of each run of equal values in sorted order.
  new_run = np.concatenate([[True], sorted_v[1:] != sorted_v[:-1]])
  run_id = np.cumsum(new_run) - 1
  starts = np.flatnonzero(new_run)
  ends = np.concatenate([starts[1:], [len(v)]])
  mean_rank = (starts + ends - 1) / 2.0 + 1.0   # ranks start+1 .. end, averaged
  ranks = np.empty_like(v)
  ranks[order] = mean_rank[run_id]
  return ranks


def spearman(predictions, labels) -> float:
  return pearson(rankdata(predictions), rankdata(labels))


METRICS = {
    "accuracy": accuracy,
    "matthews_corrcoef": matthews_corrcoef,
    "f1": f1,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names: Iterable[str], predictions, labels) -> dict[str, float]:
  """{metric: value} for each name in `names` (keys of METRICS)."""
  out = {}
  for name in names:
    if name not in METRICS:
      raise ValueError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    out[name] = METRICS[name](predictions, labels)
  return out


def task_score(metrics: Mapping[str, float], names: Sequence[str]) -> float:
  """The mean of a task's metrics (GLUE's convention: F1 and accuracy for MRPC and QQP,
  Pearson and Spearman for STS-B)."""
  return float(np.mean([metrics[n] for n in names]))


def _check(a: np.ndarray, b: np.ndarray) -> None:
  if a.shape != b.shape:
    raise ValueError(f"predictions {a.shape} and labels {b.shape} differ in shape")
  if a.size == 0:
    raise ValueError("no examples to score")

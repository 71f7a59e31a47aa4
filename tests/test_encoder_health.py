"""The encoder-health metrics of the held-out evaluation: effective rank and mean cosine of the
discriminator's features, from sums that add up across batches and hosts."""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax.pretraining import evaluation
from deberta_jax.runtime import metrics


def _by_hand(x):
  centred = x - x.mean(0)
  eig = np.clip(np.linalg.eigvalsh(centred.T @ centred / len(x)), 0, None)
  p = eig[eig > 0] / eig.sum()
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  cos = unit @ unit.T
  return np.exp(-(p * np.log(p)).sum()), (cos.sum() - len(x)) / (len(x) * (len(x) - 1))


def _sums(x, pad=0):
  """feature_sums of rows `x` given as [B, 3 tokens (+ pad), H], split into two batches."""
  tokens = np.repeat(x[:, None, :], 3 + pad, axis=1)
  attention = np.ones(tokens.shape[:2])
  attention[:, 3:] = 0
  tokens[:, 3:] = 100.0  # padding must not move the mean-pooled features
  halves = [evaluation.feature_sums(jnp.asarray(tokens[s]), jnp.asarray(attention[s]))
            for s in (slice(0, len(x) // 2), slice(len(x) // 2, None))]
  return jax.device_get(jax.tree.map(jnp.add, *halves))


def test_rank_and_cosine_match_a_direct_computation():
  rng = np.random.default_rng(0)
  spread = rng.normal(size=(300, 16)) * np.linspace(0.2, 2.0, 16)
  collapsed = np.outer(rng.normal(size=300), rng.normal(size=16)) + 3.0 + 0.01 * rng.normal(
      size=(300, 16))
  for x in (spread, collapsed):
    rank, cosine = evaluation.feature_health(_sums(x, pad=2), "disc")
    want_rank, want_cosine = _by_hand(x)
    chex.assert_trees_all_close((rank, cosine), (want_rank, want_cosine), rtol=1e-4, atol=1e-5)
  assert evaluation.feature_health(_sums(spread), "disc")[0] > 10
  assert evaluation.feature_health(_sums(collapsed), "disc")[0] < 1.1
  assert evaluation.feature_health(_sums(collapsed), "disc")[1] > 0.8


def test_effective_rank_bounds():
  chex.assert_trees_all_close(evaluation.effective_rank(np.eye(8)), 8.0, rtol=1e-6)
  chex.assert_trees_all_close(evaluation.effective_rank(np.diag([1.0] + [0.0] * 7)), 1.0)
  assert evaluation.effective_rank(np.zeros((4, 4))) == 0.0


def _watch_lines(caplog, threshold, ranks):
  """The collapse watch's log lines over evaluations at steps 500, 1000, ... of `ranks`."""
  watch = evaluation.CollapseWatch(threshold)
  with caplog.at_level(logging.INFO, logger="absl"):
    for i, rank in enumerate(ranks):
      watch(rank, 0.9, 64, step=500 * (i + 1))
  return [(r.levelno, r.getMessage()) for r in caplog.records
          if "discriminator's features" in r.getMessage()]


def test_collapse_watch_warns_at_each_low_evaluation(caplog):
  lines = _watch_lines(caplog, 5.0, [1.4, 3.2, 1.7])
  assert [level for level, _ in lines] == [logging.WARNING] * 3
  assert "collapsing at step 500: effective rank 1.4 of 64 dimensions" in lines[0][1]
  assert "min_effective_rank=5" in lines[0][1] and "in a row" not in lines[0][1]
  assert lines[2][1].endswith("3 evaluations in a row")


def test_collapse_watch_says_when_a_dip_recovers(caplog):
  lines = _watch_lines(caplog, 5.0, [4.1, 5.7, 6.2, 4.8, 4.9, 7.0])
  assert [level for level, _ in lines] == [logging.WARNING, logging.INFO, logging.WARNING,
                                           logging.WARNING, logging.INFO]
  assert "recovered at step 1000: effective rank 5.7" in lines[1][1]
  assert lines[1][1].endswith("after 1 evaluation(s) below it since step 500")
  assert lines[4][1].endswith("after 2 evaluation(s) below it since step 2000")


def test_collapse_watch_is_silent_above_the_threshold_or_when_off(caplog):
  assert not _watch_lines(caplog, 5.0, [25.0, 7.9, 5.0])
  assert not _watch_lines(caplog, 0.0, [1.0, 0.5])


def test_a_resumed_collapse_watch_closes_a_dip_logged_before_the_restart(caplog):
  """Evaluations logged up to the restored step carry over: a stretch below the threshold they
  end with is counted on, and the first evaluation above it gets the recovery line."""
  logged = [{"step": 0, "eval_disc_effective_rank": 27.0}, {"step": 100, "mlm_loss": 5.0},
            {"step": 500, "eval_disc_effective_rank": 4.4},
            {"step": 1000, "eval_disc_effective_rank": 3.9},
            {"step": 1500, "eval_disc_effective_rank": 1.0}]  # past the restart: not taken up
  watch = evaluation.CollapseWatch(5.0)
  with caplog.at_level(logging.INFO, logger="absl"):
    watch.resume(logged, start_step=1000)
    assert watch.low_evaluations == 2 and not caplog.records  # taken up silently
    watch(6.1, 0.9, 64, step=1500)
  (line,) = [r.getMessage() for r in caplog.records]
  assert line.endswith("after 2 evaluation(s) below it since step 500")
  fresh = evaluation.CollapseWatch(5.0)
  fresh.resume([{"step": 500, "eval_disc_effective_rank": 4.4},
                {"step": 1000, "eval_disc_effective_rank": 5.9}], start_step=1000)
  assert fresh.low_evaluations == 0  # the dip had closed before the restart


def test_logged_records_of_a_workdir_without_metrics_is_empty(tmp_path):
  assert metrics.logged_records(str(tmp_path)) == []
  (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  assert metrics.logged_records(str(tmp_path)) == []  # damaged: the run goes on without them

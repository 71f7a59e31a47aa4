"""The encoder-health metrics of the held-out evaluation: effective rank and mean cosine of the
discriminator's features, from sums that add up across batches and hosts."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax.pretraining import evaluation


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

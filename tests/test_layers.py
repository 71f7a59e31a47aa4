"""The building blocks' own contracts: the hash dropout and the head-major skew attention."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deberta_jax.models import attention
from deberta_jax.models import layers


def _apply_dropout(rate, x, seed=0, deterministic=False):
  module = layers.Dropout(rate)
  return module.apply({}, x, deterministic=deterministic, rngs={"dropout": jax.random.key(seed)})


@pytest.mark.parametrize("shape", [(64, 255), (7, 3, 129), (1,), ()])
def test_dropout_drops_at_the_rate_and_keeps_the_expectation(shape):
  x = jnp.ones(shape, jnp.float32)
  rate = 0.1
  out = _apply_dropout(rate, x)
  chex.assert_shape(out, shape)
  kept = np.asarray(out) != 0
  scale = 2.0**23 / (2.0**23 - round(rate * 2**23))
  np.testing.assert_allclose(np.asarray(out)[kept], scale, rtol=1e-6)
  if x.size >= 10_000:
    # 16k Bernoulli(0.9) draws: the drop fraction lies within 5 standard deviations of 0.1.
    sd = np.sqrt(rate * (1 - rate) / x.size)
    assert abs((1 - kept.mean()) - rate) < 5 * sd
    assert abs(np.asarray(out).mean() - 1.0) < 5 * sd * scale


def test_dropout_masks_differ_by_key_row_and_position():
  """Independent Bernoulli(0.5) masks agree on half the entries: between keys, between rows of
  one call (each row is its own hash stream), and between neighbouring positions of a row."""
  x = jnp.ones((2, 8, 1000), jnp.float32)
  kept = lambda seed: np.asarray(_apply_dropout(0.5, x, seed=seed)) != 0
  a, b = kept(0), kept(1)
  assert 0.45 < np.mean(a == b) < 0.55
  assert 0.45 < np.mean(a[0] == a[1]) < 0.55
  assert 0.45 < np.mean(a[:, :-1] == a[:, 1:]) < 0.55
  assert 0.45 < np.mean(a[:, :, :-1] == a[:, :, 1:]) < 0.55


def test_dropout_mask_is_the_same_on_a_mesh():
  """The mask comes from global positions: computed with the input sharded over 8 devices it
  equals the single-device mask."""
  x = jnp.ones((8, 16, 32), jnp.float32)
  single = _apply_dropout(0.3, x)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", None, "b"))
  sharded = jax.jit(lambda x: _apply_dropout(0.3, x), out_shardings=spec)(jax.device_put(x, spec))
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_dropout_is_the_identity_when_deterministic_or_rate_zero():
  x = jax.random.normal(jax.random.key(3), (5, 6))
  chex.assert_trees_all_equal(_apply_dropout(0.3, x, deterministic=True), x)
  chex.assert_trees_all_equal(_apply_dropout(0.0, x), x)
  chex.assert_trees_all_equal(_apply_dropout(1.0, x), jnp.zeros_like(x))


def test_dropout_gradient_is_the_mask_times_the_scale():
  x = jnp.linspace(-1.0, 1.0, 300).reshape(3, 100)
  f = lambda x: jnp.sum(_apply_dropout(0.25, x))
  grad = jax.grad(f)(x)
  out = _apply_dropout(0.25, jnp.ones_like(x))
  chex.assert_trees_all_close(grad, out)


@pytest.mark.parametrize("length", [1, 2, 5, 16])
def test_skew_terms_equal_the_indexed_products(length):
  """relative_terms_skew against a direct loop over (i, j): c2p uses distance i - j for the key
  table, p2c the same distance for the query table."""
  batch, heads, dim = 2, 3, 4
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, heads, length, dim))
  k = jax.random.normal(keys[1], (batch, heads, length, dim))
  qr = jax.random.normal(keys[2], (2 * length - 1, heads, dim))
  kr = jax.random.normal(keys[3], (2 * length - 1, heads, dim))
  got = attention.relative_terms_skew(q, k, qr, kr)
  chex.assert_shape(got, (batch, heads, length, length))
  q_, k_, qr_, kr_ = map(np.asarray, (q, k, qr, kr))
  want = np.zeros((batch, heads, length, length), np.float32)
  for i in range(length):
    for j in range(length):
      t = i - j + length - 1
      want[:, :, i, j] = (np.einsum("bnd,nd->bn", q_[:, :, i], kr_[t])
                          + np.einsum("nd,bnd->bn", qr_[t], k_[:, :, j]))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_layers_equal_the_layer_loop(remat):
  """model.scan_layers runs the same parameters through one lax.scan: outputs and gradients
  equal the Python loop's (deterministic), for the discriminator (all layers) and the
  generator (all but the last layer, then the EMD passes)."""
  from deberta_jax.models import config as model_config  # pylint: disable=import-outside-toplevel
  from deberta_jax.models import pretraining  # pylint: disable=import-outside-toplevel
  from flax.linen import meta  # pylint: disable=import-outside-toplevel

  base = model_config.ModelConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4,
                                  intermediate_size=64, max_position_embeddings=64,
                                  position_buckets=16, attention_impl="skew", remat=remat)
  ids = jax.random.randint(jax.random.key(0), (2, 12), 4, 100)
  mask = jnp.ones_like(ids).at[1, 9:].set(0)
  for module_cls, cfg in ((pretraining.Discriminator, base.replace(position_table=False)),
                          (pretraining.Generator, base)):
    loop, scan = module_cls(cfg), module_cls(cfg.replace(scan_layers=True))
    params = meta.unbox(loop.init(jax.random.key(1), ids, mask))
    # The scanned module declares the same parameters (one subtree per layer).
    chex.assert_trees_all_equal_shapes(params, meta.unbox(scan.init(jax.random.key(1), ids, mask)))
    f = lambda p, m: jnp.sum(jnp.tanh(m.apply(p, ids, mask)))
    chex.assert_trees_all_close(loop.apply(params, ids, mask), scan.apply(params, ids, mask),
                                rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.grad(f)(params, loop), jax.grad(f)(params, scan),
                                rtol=1e-4, atol=1e-5)


def test_scanned_layers_train_with_dropout():
  from deberta_jax.models import config as model_config  # pylint: disable=import-outside-toplevel
  from deberta_jax.models import pretraining  # pylint: disable=import-outside-toplevel
  from flax.linen import meta  # pylint: disable=import-outside-toplevel

  cfg = model_config.ModelConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4,
                                 intermediate_size=64, position_buckets=16, position_table=False,
                                 attention_impl="skew", scan_layers=True)
  model = pretraining.Discriminator(cfg)
  ids = jax.random.randint(jax.random.key(0), (2, 12), 4, 100)
  mask = jnp.ones_like(ids)
  params = meta.unbox(model.init(jax.random.key(1), ids, mask))
  run = lambda key: model.apply(params, ids, mask, deterministic=False, rngs={"dropout": key})
  a, b = run(jax.random.key(2)), run(jax.random.key(3))
  chex.assert_tree_all_finite((a, b))
  assert not np.allclose(np.asarray(a), np.asarray(b))  # dropout is on, keyed per call
  np.testing.assert_array_equal(np.asarray(run(jax.random.key(2))), np.asarray(a))

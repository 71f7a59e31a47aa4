"""The generator's blocked vocabulary layout (vocab_blocks.py): same logits, loss, accuracy,
gradient and samples as the flat layout, and a training step with no flat [B, K, V] array."""

import dataclasses
import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen import meta
from jax.sharding import Mesh

from deberta_jax.pretraining import losses
from deberta_jax.pretraining import masking
from deberta_jax.pretraining import train_step as ts
from deberta_jax.models import vocab_blocks
from deberta_jax.models import ModelConfig
from deberta_jax.models.heads import LMHead
from deberta_jax.models.rtd import RTDModel
from tests.test_rtd import TOKENS, _batch, _config


def _platform_mesh(platform):
  """An abstract one-device mesh that says `platform`: tracing under it takes the code path a
  compile for that platform takes (as in test_flash_attention), here on a CPU."""
  cpu = Mesh(np.array(jax.devices()[:1]), ("x",)).abstract_mesh
  device = dataclasses.replace(cpu.abstract_device, platform=platform)
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh(cpu.axis_sizes, cpu.axis_names, abstract_device=device))


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("vocab,pad_multiple", [(300, 1), (300, 128), (256, 128)])
def test_blocked_lm_head_equals_the_flat_one(vocab, pad_multiple, platform):
  """Blocked logits are the flat ones split into rows of 128; entries past the vocabulary (the
  table's padding and the last block's) are the float32 minimum; a draw from either is the same.
  Both code paths: the TPU one (blocks from the table's rows) and the row-major one."""
  config = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2,
                       intermediate_size=64, vocab_pad_multiple=pad_multiple)
  hidden = jax.random.normal(jax.random.key(0), (2, 5, 32))
  table = jax.random.normal(jax.random.key(1), (config.padded_vocab_size, 32)) * 0.1
  head = LMHead(config)
  params = head.init(jax.random.key(2), hidden, table)
  params = jax.tree.map(lambda p: p + 0.01, params)  # a nonzero bias
  flat = head.apply(params, hidden, table)
  with _platform_mesh(platform):
    blocked = jax.jit(functools.partial(head.apply, blocked=True))(params, hidden, table)
  blocks = vocab_blocks.num_blocks(config.padded_vocab_size)
  chex.assert_shape(blocked, (2, 5, blocks, vocab_blocks.VOCAB_BLOCK))
  as_flat = np.asarray(blocked).reshape(2, 5, -1)
  np.testing.assert_allclose(as_flat[..., :vocab], np.asarray(flat)[..., :vocab], rtol=1e-6,
                             atol=1e-6)
  assert np.all(as_flat[..., vocab:] == vocab_blocks.NEVER)
  key = jax.random.key(3)
  np.testing.assert_array_equal(masking.sample_from_blocks(key, blocked, 1.0),
                                masking.sample_replacements(key, flat, 1.0))


def _optax_sums(flat_logits, labels, weights):
  loss = optax.softmax_cross_entropy_with_integer_labels(flat_logits, labels)
  correct = (jnp.argmax(flat_logits, -1) == labels).astype(jnp.float32)
  return jnp.sum(loss * weights), jnp.sum(correct * weights)


def test_blocked_loss_accuracy_and_gradient_equal_the_flat_ones():
  vocab = 300
  logits = jax.random.normal(jax.random.key(0), (3, 6, vocab)) * 4.0
  logits = logits.at[..., 290:].set(vocab_blocks.NEVER)          # padded-like entries
  labels = jax.random.randint(jax.random.key(1), (3, 6), 0, 290)
  # Ties: the label holds the maximum but a smaller id does too (wrong, as argmax says), and
  # the label is the smallest of two maxima (right).
  logits = logits.at[0, 0, 5].set(50.0).at[0, 0, 7].set(50.0)
  labels = labels.at[0, 0].set(7)
  logits = logits.at[0, 1, 9].set(50.0).at[0, 1, 200].set(50.0)
  labels = labels.at[0, 1].set(9)
  weights = jnp.ones((3, 6)).at[2, 4:].set(0.0)

  def blocked_loss(flat):
    return losses.mlm_sums(vocab_blocks.to_blocks(flat, vocab_blocks.NEVER), labels, weights)

  sums = blocked_loss(logits)
  loss, correct = _optax_sums(logits, labels, weights)
  np.testing.assert_allclose(sums["mlm_loss_sum"], loss, rtol=1e-6)
  assert float(sums["mlm_correct"]) == float(correct)
  assert float(sums["mlm_count"]) == 16.0
  grads = jax.grad(lambda x: blocked_loss(x)["mlm_loss_sum"])(logits)
  expected = jax.grad(lambda x: _optax_sums(x, labels, weights)[0])(logits)
  chex.assert_trees_all_close(grads, expected, atol=1e-6)


def _arrays_of(jaxpr):
  """Every input and output shape of every equation, sub-jaxprs (scan, jit, custom_vjp) included."""
  for eqn in jaxpr.eqns:
    for var in list(eqn.invars) + list(eqn.outvars):
      if hasattr(var, "aval") and hasattr(var.aval, "shape"):
        yield eqn.primitive.name, var.aval.shape
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _arrays_of(sub)


@pytest.mark.parametrize("platform", ["tpu", "cpu"])
def test_training_step_never_copies_the_logits(platform):
  """The operations on [.., K, V] arrays (the flat logits) in a whole training step, forward,
  sampling, loss and gradient. On TPU there are none: the LM head's matmul writes the blocked
  layout. On a row-major backend only the plain matmul, the bias and the reshape to blocks (and
  their transposes) touch them: no pad, gather or copy. The old code had 45 such arrays (pads,
  slices, the sampler's reshapes, the loss's gather)."""
  config = _config()
  model = RTDModel.from_config(config)
  optimizers = ts.make_optimizers(config)
  state = meta.unbox(ts.init_state(model, optimizers, config, jax.random.key(0)))
  step = ts.make_train_step(model, optimizers, config, TOKENS, 1)
  with _platform_mesh(platform):
    jaxpr = jax.make_jaxpr(step)(state, _batch())
  padded = ModelConfig(vocab_size=config.model.vocab_size,
                       vocab_pad_multiple=config.model.vocab_pad_multiple).padded_vocab_size
  slots = masking.max_predictions(config.seq_len, config.rtd.mask_prob)
  arrays = list(_arrays_of(jaxpr.jaxpr))
  flat_ops = {name for name, shape in arrays if len(shape) >= 2 and shape[-2:] == (slots, padded)}
  allowed = set() if platform == "tpu" else {"dot_general", "add", "reshape", "reduce_sum"}
  assert flat_ops <= allowed, flat_ops - allowed
  blocked = (vocab_blocks.num_blocks(padded), vocab_blocks.VOCAB_BLOCK)
  assert any(shape[-3:] == (slots,) + blocked for _, shape in arrays)  # the logits are there

"""Output heads: the generator's tied MLM head and the discriminator's RTD head."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deberta_jax.models import vocab_blocks
from deberta_jax.models import layers
from deberta_jax.models.config import ModelConfig


class LMHead(nn.Module):
  """dense -> gelu -> LayerNorm -> logits against the (tied) word embedding, plus a bias.

  Logits are float32; rows added to pad the vocabulary to a shardable size get the float32
  minimum, so they never win a softmax, a sample or an argmax. With `blocked` the vocabulary
  axis comes out as [blocks, VOCAB_BLOCK] (vocab_blocks.py: the layout the training step's loss
  and sampler read, produced by the matmul itself instead of by a copy of the logits).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, word_embeddings, blocked: bool = False):
    cfg = self.config
    h = layers.dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(hidden)
    h = layers.layer_norm(cfg, "LayerNorm")(layers.gelu(h))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                      (cfg.padded_vocab_size,), jnp.float32)
    table = word_embeddings.astype(cfg.compute_dtype)
    if blocked and layers.target_platform() == "tpu":
      # [.., V] and [.., V/128, 128] are different tiled layouts on TPU, so reshaping the
      # logits would copy them. Split the table's rows instead (a bitcast): the matmul then
      # writes the blocked layout itself.
      logits = jnp.einsum("...h,bvh->...bv", h, vocab_blocks.to_blocks(table, 0.0, axis=0),
                          preferred_element_type=jnp.float32)
      logits += vocab_blocks.to_blocks(bias, 0.0)
    else:
      # Row-major layouts (CPU, GPU): reshaping after the plain matmul is free, and XLA's CPU
      # backend runs the plain matmul faster than the blocked one (docs/benchmarks.md).
      logits = jnp.einsum("...h,vh->...v", h, table, preferred_element_type=jnp.float32) + bias
      if blocked:
        logits = vocab_blocks.to_blocks(logits, 0.0)
    ids = (vocab_blocks.token_ids(logits.shape[-2]) if blocked
           else jnp.arange(logits.shape[-1]))
    vocab_axes = ("act_vocab", None) if blocked else ("act_vocab",)
    if logits.shape[-len(vocab_axes)] % layers.shards("act_vocab"):  # e.g. 1001 blocks, 2 shards
      vocab_axes = (None,) * len(vocab_axes)
    names = ("batch",) + (None,) * (logits.ndim - 1 - len(vocab_axes)) + vocab_axes
    logits = layers.constrain(logits, names)
    if ids.size != cfg.vocab_size:
      logits = jnp.where(ids < cfg.vocab_size, logits, vocab_blocks.NEVER)
    return logits


class RTDHead(nn.Module):
  """LayerNorm(h + h_[CLS]) -> dense -> gelu -> dense(1): the official LMMaskPredictionHead.

  Adding the [CLS] vector to every position before the LayerNorm differs from ELECTRA's head; the
  released discriminators were trained with this one.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden):
    cfg = self.config
    u = layers.layer_norm(cfg, "LayerNorm")(hidden + hidden[:, :1, :])
    u = layers.gelu(layers.dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(u))
    logits = layers.dense(cfg, 1, ("mlp", None), "classifier")(u)
    return logits[..., 0].astype(jnp.float32)

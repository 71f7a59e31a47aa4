"""Output heads: the generator's tied MLM head and the discriminator's RTD head."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deberta_jax.models import layers
from deberta_jax.models.config import ModelConfig


class LMHead(nn.Module):
  """dense -> gelu -> LayerNorm -> logits against the (tied) word embedding, plus a bias.

  Logits are float32; rows added to pad the vocabulary to a shardable size get the float32
  minimum, so they never win a softmax, a sample or an argmax.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, word_embeddings):
    cfg = self.config
    h = layers.dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(hidden)
    h = layers.layer_norm(cfg, "LayerNorm")(layers.gelu(h))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                      (cfg.padded_vocab_size,), jnp.float32)
    logits = jnp.einsum("...h,vh->...v", h, word_embeddings.astype(cfg.compute_dtype),
                        preferred_element_type=jnp.float32) + bias
    logits = layers.constrain(logits, ("batch", "act_vocab"))
    if cfg.padded_vocab_size != cfg.vocab_size:
      real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
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

"""The two networks of RTD pre-training: the MLM generator (with EMD) and the RTD discriminator.

Both extend the backbone's parameter tree (`embeddings`, `encoder`) with their head, so either
tree can be applied by `DebertaEncoder` and converted by `deberta_jax.hf` as it is.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from deberta_jax.models import attention
from deberta_jax.models.config import ModelConfig
from deberta_jax.models.encoder import Embeddings, Encoder
from deberta_jax.models.hash_dropout import RowLayout
from deberta_jax.models.heads import LMHead, RTDHead


class Generator(nn.Module):
  """Encoder + Enhanced Mask Decoder + LM head tied to the generator's own word embedding.

  The EMD (reference section 3.2) takes the penultimate layer's output as keys/values, adds the raw
  absolute position embedding to it as the query stream, and applies the last layer's weights to
  that query twice. The encoder's own pass through the last layer, which the official code computes
  and throws away, is skipped.
  """

  config: ModelConfig

  def setup(self):
    if not self.config.position_table:
      raise ValueError("the generator's Enhanced Mask Decoder needs position_table=True")
    self.embeddings = Embeddings(self.config)
    self.encoder = Encoder(self.config)
    self.lm_head = LMHead(self.config)

  def __call__(self, input_ids, attention_mask, deterministic: bool = True, positions=None,
               blocked_logits: bool = False, rows: RowLayout | None = None):
    """MLM logits [B, L, V] float32, or [B, K, V] at `positions` [B, K] when given; with
    `blocked_logits` the last axis is [V / VOCAB_BLOCK, VOCAB_BLOCK] (vocab_blocks.py).
    `rows` places the batch in the step's global batch for the dropout masks.

    Computing the 128k-way head only at the masked positions (15% of tokens) is what keeps the
    generator cheap at the paper's vocabulary.
    """
    x, absolute, word_embeddings = self.embeddings(input_ids, attention_mask, deterministic,
                                                   rows=rows)
    mask = attention.pair_mask(attention_mask)
    keys_values, rel_table = self.encoder(x, mask, deterministic,
                                          num_layers=self.config.num_layers - 1, rows=rows)
    query = keys_values + absolute[None]
    last_layer = self.encoder.layer[-1]
    for _ in range(2):
      query = last_layer(keys_values, query, rel_table, mask, deterministic, rows)
    if positions is not None:
      query = jnp.take_along_axis(query, positions[..., None], axis=1)
    return self.lm_head(query, word_embeddings, blocked_logits)


class Discriminator(nn.Module):
  """Encoder + RTD head; returns one float32 "replaced" logit per token [B, L].

  `word_embeddings`, when given, replaces the discriminator's own table: embedding sharing (ES,
  GDES) is decided by the caller, which keeps this module a plain function of its inputs.
  """

  config: ModelConfig

  def setup(self):
    self.embeddings = Embeddings(self.config)
    self.encoder = Encoder(self.config)
    self.mask_predictions = RTDHead(self.config)

  def __call__(self, input_ids, attention_mask, deterministic: bool = True, word_embeddings=None,
               rows: RowLayout | None = None, with_features: bool = False):
    """Logits [B, L]; with `with_features`, (logits, last-layer hidden states [B, L, H]): what a
    fine-tuned model builds on, which the held-out evaluation watches for collapse."""
    x, _, _ = self.embeddings(input_ids, attention_mask, deterministic, word_embeddings, rows)
    hidden, _ = self.encoder(x, attention.pair_mask(attention_mask), deterministic, rows=rows)
    logits = self.mask_predictions(hidden)
    return (logits, hidden) if with_features else logits

  def hidden_states(self, input_ids, attention_mask, word_embeddings=None):
    """(logits [B, L], [embedding output, layer 1, ..., layer N], each [B, L, H]), dropout off:
    where along the depth the features lose their spread (analyze.py `layers`). The layers run
    one by one, the unscanned form of the same computation."""
    x, _, _ = self.embeddings(input_ids, attention_mask, True, word_embeddings)
    mask = attention.pair_mask(attention_mask)
    rel_table = self.encoder.relative_table()
    states = [x]
    for layer in self.encoder.layer:
      states.append(layer(states[-1], states[-1], rel_table, mask, True))
    return self.mask_predictions(states[-1]), states

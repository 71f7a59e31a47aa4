"""Sequence classification / regression on the [CLS] state: DeBERTaV3's fine-tuning model.

    hidden = DebertaEncoder(input_ids, attention_mask)           # [B, L, H]
    pooled = gelu(pooler.dense(dropout_p(hidden[:, 0])))           # the reference's ContextPooler
    logits = classifier(dropout_c(pooled))                         # [B, num_labels]

as transformers' DebertaV2ForSequenceClassification (pooler_dropout p, 0 in the released
configs; cls_dropout c, "dropout of task layer" in the paper's Table 11). The parameter tree is
the backbone's (`embeddings`, `encoder`) plus `pooler/dense` and `classifier`, the HF names, so
`hf.save_sequence_classifier` writes a directory that `DebertaV2ForSequenceClassification.from_pretrained`
loads without missing keys. `pooling='mean'` (the masked mean of `hidden` in place of
`hidden[:, 0]`) is the one variant with no transformers counterpart.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from deberta_jax.models import attention
from deberta_jax.models import layers
from deberta_jax.models.config import ModelConfig
from deberta_jax.models.encoder import Embeddings
from deberta_jax.models.encoder import Encoder

BACKBONE_KEYS = ("embeddings", "encoder")
POOLINGS = ("cls", "mean")
HEAD_KEYS = ("pooler", "classifier")


class ContextPooler(nn.Module):
  """dropout -> dense(H) -> gelu on the [CLS] state, or with `pooling='mean'` on the mean of
  the real tokens' states.

  The mean exists because a discriminator pre-trained by RTD alone never trains its [CLS] state
  for anything: pooling the tokens it did learn to read costs a fresh classifier less to undo
  (docs/benchmarks.md, "The mini recipe"). transformers' DebertaV2ForSequenceClassification
  only pools [CLS], so only that pooling can be exported.
  """

  config: ModelConfig
  dropout: float = 0.0
  pooling: str = "cls"

  @nn.compact
  def __call__(self, hidden, attention_mask, deterministic: bool):
    cfg = self.config
    if self.pooling == "mean":
      weights = attention_mask.astype(hidden.dtype)[..., None]
      pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    else:
      pooled = hidden[:, 0]
    context = layers.Dropout(self.dropout)(pooled, deterministic=deterministic)
    return layers.gelu(layers.dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(context))


class SequenceClassifier(nn.Module):
  """Backbone + ContextPooler + linear classifier; float32 logits [B, num_labels].

  `num_labels` = 1 is a regression (the logit is the prediction, trained with squared error).
  """

  config: ModelConfig
  num_labels: int
  cls_dropout: float = 0.1
  pooler_dropout: float = 0.0
  pooling: str = "cls"

  def setup(self):
    self.embeddings = Embeddings(self.config)
    self.encoder = Encoder(self.config)
    self.pooler = ContextPooler(self.config, self.pooler_dropout, self.pooling)
    self.dropout = layers.Dropout(self.cls_dropout)
    self.classifier = layers.dense(self.config, self.num_labels, ("mlp", None), "classifier")

  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True):
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x, _, _ = self.embeddings(input_ids, attention_mask, deterministic)
    hidden, _ = self.encoder(x, attention.pair_mask(attention_mask), deterministic)
    pooled = self.pooler(hidden, attention_mask, deterministic)
    pooled = self.dropout(pooled, deterministic=deterministic)
    return self.classifier(pooled).astype(jnp.float32)


def merge_backbone(params: Mapping[str, Any], backbone: Mapping[str, Any],
                   reinit_top_layers: int = 0) -> dict:
  """`params` (a fresh classifier tree) with its embeddings/encoder replaced by `backbone`'s,
  except the top `reinit_top_layers` encoder layers, which keep their fresh values (a remedy
  for pre-trained top layers too specialised to their pre-training task).

  Raises ValueError naming the first parameter whose shape differs or that the backbone lacks;
  heads the backbone carries (RTD `mask_predictions`, MLM `lm_head`) are ignored.
  """
  ours = traverse_util.flatten_dict(dict(params))
  theirs = traverse_util.flatten_dict({k: backbone[k] for k in BACKBONE_KEYS if k in backbone})
  depth = len({p[1] for p in ours if p[0] == "encoder" and p[1].startswith("layer_")})
  fresh_layers = {f"layer_{i}" for i in range(depth - reinit_top_layers, depth)}
  out = {}
  for path, value in ours.items():
    if path[0] in HEAD_KEYS or (path[0] == "encoder" and path[1] in fresh_layers):
      out[path] = value
      continue
    if path not in theirs:
      raise ValueError(f"the pre-trained model has no parameter {'/'.join(path)}")
    new = theirs[path]
    if tuple(np.shape(new)) != tuple(np.shape(value)):
      raise ValueError(f"parameter {'/'.join(path)}: pre-trained shape {np.shape(new)}, "
                       f"model shape {np.shape(value)}")
    out[path] = new
  return traverse_util.unflatten_dict(out)

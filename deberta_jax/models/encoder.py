"""The DeBERTaV3 encoder: embeddings, post-LN disentangled-attention layers and the stack.

Parameter names follow Hugging Face DebertaV2 (`embeddings/LayerNorm`, `encoder/layer_3/...`) so
the checkpoint converter in `deberta_jax.hf` is a rename, not a translation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import meta

from deberta_jax.models import attention
from deberta_jax.models import layers
from deberta_jax.models.config import ModelConfig
from deberta_jax.models.hash_dropout import RowLayout


def lookup(table: jax.Array, ids: jax.Array, pad_id: int) -> jax.Array:
  """Rows of `table` at `ids`; the [PAD] row passes no gradient back (torch's padding_idx).

  A sampled [PAD] replacement sits at a real (unmasked) position, so without this the row would
  learn from the discriminator's loss; the official embedding never updates it. Stopping the
  gradient at the lookup covers every table the lookup reads: E_G, E_D, and E_delta through
  stop_gradient(E_G) + E_delta. (The generator's tied LM head still scores [PAD] as a vocabulary
  entry, as the official head does.)
  """
  rows = jnp.take(table, ids, axis=0)
  return jnp.where((ids == pad_id)[..., None], jax.lax.stop_gradient(rows), rows)


class Embeddings(nn.Module):
  """Word embedding -> LayerNorm -> zero pad positions -> dropout (no absolute positions added).

  `word_embeddings` may be passed in instead of owned: that is how the discriminator receives
  E_G (ES) or stop_gradient(E_G) + E_delta (GDES) from the pre-training model. The absolute
  position table, when configured, is returned raw for the generator's Enhanced Mask Decoder.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic: bool, word_embeddings=None,
               rows: RowLayout | None = None):
    cfg = self.config
    if word_embeddings is None:
      word_embeddings = self.param(
          "word_embeddings", layers.vocab_table_init(cfg, ("vocab", "embed")),
          (cfg.padded_vocab_size, cfg.hidden_size), jnp.float32)
    x = lookup(word_embeddings, input_ids, cfg.pad_token_id).astype(cfg.compute_dtype)
    x = layers.layer_norm(cfg, "LayerNorm")(x)
    x = x * attention_mask[..., None].astype(x.dtype)
    x = layers.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic, rows=rows)
    x = layers.constrain(x, ("batch", "length", "act_embed"))
    positions = None
    if cfg.position_table:
      table = self.param(
          "position_embeddings", layers.normal_init(cfg, ("position", "embed")),
          (cfg.max_position_embeddings, cfg.hidden_size), jnp.float32)
      positions = table[: input_ids.shape[1]].astype(cfg.compute_dtype)
    return x, positions, word_embeddings


class Layer(nn.Module):
  """Attention -> (dense, dropout, residual, LN) -> FFN (gelu) -> (dropout, residual, LN).

  `query` is the residual stream; it equals `hidden` except in the Enhanced Mask Decoder, where
  keys and values stay fixed while the query stream is refined. `rows` places the batch in the
  global batch for the dropout masks (hash_dropout.RowLayout).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, hidden, query, rel_table, mask, deterministic: bool,
               rows: RowLayout | None = None):
    cfg = self.config
    context = attention.DisentangledSelfAttention(cfg, name="attention")(
        hidden, query, rel_table, mask, deterministic, rows)
    out = layers.dense(cfg, cfg.hidden_size, ("heads", "embed"), "attention_output")(context)
    out = layers.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic, rows=rows)
    a = layers.layer_norm(cfg, "attention_LayerNorm")(out + query)
    h = layers.gelu(layers.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(a))
    h = layers.constrain(h, ("batch", "length", "act_mlp"))
    out = layers.dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h)
    out = layers.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic, rows=rows)
    out = layers.layer_norm(cfg, "output_LayerNorm")(out + a)
    return layers.constrain(out, ("batch", "length", "act_embed"))


def _remat_policy(config: ModelConfig):
  """The checkpoint policy of config.remat='dots' (None = save nothing, for 'full')."""
  if config.remat == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return None


def _layer_class(config: ModelConfig):
  """Layer, optionally rematerialised in the backward pass (config.remat)."""
  if config.remat == "none":
    return Layer
  # Argument 5 (counting self as 0) is `deterministic`, a Python bool.
  return nn.remat(Layer, policy=_remat_policy(config), static_argnums=(5,))


class Encoder(nn.Module):
  """The layer stack plus the relative-position table (LayerNormed once per forward)."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.rel_embeddings = self.param(
        "rel_embeddings", layers.normal_init(cfg, ("relpos", "embed")),
        (2 * cfg.position_buckets, cfg.hidden_size), jnp.float32)
    self.LayerNorm = layers.layer_norm(cfg, "LayerNorm")
    layer_cls = _layer_class(cfg)
    self.layer = [layer_cls(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]

  def relative_table(self) -> jax.Array:
    return self.LayerNorm(self.rel_embeddings.astype(self.config.compute_dtype))

  def __call__(self, x, mask, deterministic: bool, num_layers: int | None = None,
               rows: RowLayout | None = None):
    """Runs the first `num_layers` layers (all by default); returns the last hidden state (x
    itself for zero layers) and the relative table."""
    rel_table = self.relative_table()
    count = self.config.num_layers if num_layers is None else num_layers
    if self.config.scan_layers and count > 1 and not self.is_initializing():
      return self._scan(count, x, rel_table, mask, deterministic, rows), rel_table
    for layer in self.layer[:count]:
      x = layer(x, x, rel_table, mask, deterministic, rows)
    return x, rel_table

  def _scan(self, count, x, rel_table, mask, deterministic, rows):
    """The first `count` layers as one jax.lax.scan over their stacked parameters.

    XLA then compiles one layer body instead of `count` copies, which is what makes deep stacks
    compile faster (config.scan_layers). The parameters stay one subtree per layer (`layer_i`,
    the names Hugging Face uses), so checkpoints, export and the analysis tools do not care
    which form ran; the per-step stacking is a copy of the layer weights. Each layer gets its
    own dropout key, split from this module's 'dropout' stream.
    """
    cfg = self.config
    params = [meta.unbox(self.variables["params"][f"layer_{i}"]) for i in range(count)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
    keys = None if deterministic else jax.random.split(self.make_rng("dropout"), count)
    template = Layer(cfg, parent=None)

    def body(hidden, per_layer):
      layer_params, key = per_layer
      rngs = None if key is None else {"dropout": key}
      hidden = template.apply({"params": layer_params}, hidden, hidden, rel_table, mask,
                              deterministic, rows, rngs=rngs)
      return hidden, None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=_remat_policy(cfg), prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (stacked, keys))
    return x


class DebertaEncoder(nn.Module):
  """The backbone: `apply({'params': p}, input_ids, attention_mask, deterministic=True)` -> [B, L, H].

  Parameters are `{'embeddings': ..., 'encoder': ...}`; the generator and discriminator extend this
  tree with their heads, so their parameters apply here unchanged.
  """

  config: ModelConfig

  def setup(self):
    self.embeddings = Embeddings(self.config)
    self.encoder = Encoder(self.config)

  def __call__(self, input_ids, attention_mask=None, deterministic: bool = True,
               word_embeddings=None):
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    x, _, _ = self.embeddings(input_ids, attention_mask, deterministic, word_embeddings)
    hidden, _ = self.encoder(x, attention.pair_mask(attention_mask), deterministic)
    return hidden

"""The RTD pre-training model: generator + discriminator with ES / NES / GDES embedding sharing.

Parameters are one tree, `{'generator': ..., 'discriminator': ...}`. How the discriminator's word
embedding E_D is formed is the only thing the sharing mode changes:

  nes   E_D is the discriminator's own table (no sharing).
  es    E_D = E_G: the generator's table, gradients of both losses reach it (joint update).
  gdes  E_D = stop_gradient(E_G) + E_delta, E_delta a discriminator parameter initialised to 0
        (kept with an absolute-position twin P_delta, as in the official checkpoints).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import meta

from deberta_jax.models import Discriminator, Generator, generator_config
from deberta_jax.models.config import ModelConfig
from deberta_jax.models.hash_dropout import RowLayout

DELTA = "gdes_delta"


class RTDModel:
  """The two linen modules and the sharing rule; every method is a pure function of params."""

  def __init__(self, generator: ModelConfig, discriminator: ModelConfig, sharing: str):
    self.sharing = sharing
    self.generator_config = generator
    self.discriminator_config = discriminator
    self.generator = Generator(generator)
    self.discriminator = Discriminator(discriminator)

  @classmethod
  def from_config(cls, config) -> "RTDModel":
    """The pair a run config's `model` section describes."""
    return cls(generator_config(config.model), ModelConfig.from_config(config.model),
               config.model.embedding_sharing)

  def init(self, rng: jax.Array, seq_len: int) -> dict:
    """Boxed (logically partitioned) parameters of both networks."""
    gen_rng, disc_rng = jax.random.split(rng)
    ids = jnp.zeros((1, seq_len), jnp.int32)
    mask = jnp.ones((1, seq_len), jnp.int32)
    positions = jnp.zeros((1, 1), jnp.int32)
    generator = self.generator.init(gen_rng, ids, mask, True, positions)["params"]
    table = None
    if self.sharing != "nes":
      table = meta.unbox(generator)["embeddings"]["word_embeddings"]
    discriminator = dict(self.discriminator.init(disc_rng, ids, mask, True, table)["params"])
    if self.sharing == "gdes":
      cfg = self.generator_config
      discriminator[DELTA] = {
          "word_embeddings": nn.LogicallyPartitioned(
              jnp.zeros((cfg.padded_vocab_size, cfg.hidden_size), jnp.float32), ("vocab", "embed")),
          "position_embeddings": nn.LogicallyPartitioned(
              jnp.zeros((cfg.max_position_embeddings, cfg.hidden_size), jnp.float32),
              ("position", "embed")),
      }
    return {"generator": dict(generator), "discriminator": discriminator}

  def discriminator_table(self, params: dict):
    """E_D for the sharing mode (None: the discriminator's own table)."""
    if self.sharing == "nes":
      return None
    shared = params["generator"]["embeddings"]["word_embeddings"]
    if self.sharing == "es":
      return shared
    return jax.lax.stop_gradient(shared) + params["discriminator"][DELTA]["word_embeddings"]

  def generator_logits(self, generator_params, input_ids, attention_mask, positions, rng,
                       deterministic: bool = False, rows: RowLayout | None = None):
    """[B, K, V / VOCAB_BLOCK, VOCAB_BLOCK] float32 at the masked `positions` (vocab_blocks.py).

    `rows`: where these rows sit in the step's global batch, so that their dropout masks do not
    depend on how the batch was split into micro-batches (hash_dropout.RowLayout).
    """
    rngs = None if deterministic else {"dropout": rng}
    return self.generator.apply({"params": generator_params}, input_ids, attention_mask,
                                deterministic, positions, True, rows, rngs=rngs)

  def discriminator_logits(self, params, input_ids, attention_mask, rng,
                           deterministic: bool = False, rows: RowLayout | None = None,
                           with_features: bool = False):
    """[B, L] float32 "replaced" logits; with `with_features` also the last layer [B, L, H]."""
    rngs = None if deterministic else {"dropout": rng}
    return self.discriminator.apply({"params": params["discriminator"]}, input_ids,
                                    attention_mask, deterministic, self.discriminator_table(params),
                                    rows, with_features, rngs=rngs)

  def export_discriminator_params(self, params: dict) -> dict:
    """The discriminator as a standalone network: E_D materialised (E_G + E_delta under GDES)."""
    disc = {k: v for k, v in params["discriminator"].items() if k != DELTA}
    table = self.discriminator_table(params)
    if table is not None:
      disc["embeddings"] = {**disc["embeddings"], "word_embeddings": table}
    generator_positions = params["generator"]["embeddings"].get("position_embeddings")
    if self.sharing == "gdes" and generator_positions is not None:
      # P_D = P_G + P_delta: the position table the official discriminator checkpoints carry.
      disc["embeddings"] = {**disc["embeddings"], "position_embeddings": (
          generator_positions + params["discriminator"][DELTA]["position_embeddings"])}
    return disc

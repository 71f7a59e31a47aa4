"""Flax linen modules of DeBERTaV3: the backbone, the generator and the discriminator."""

from deberta_jax.models.config import ModelConfig, generator_config
from deberta_jax.models.encoder import DebertaEncoder
from deberta_jax.models.pretraining import Discriminator, Generator

__all__ = ["ModelConfig", "generator_config", "DebertaEncoder", "Generator", "Discriminator"]

"""The architecture of one DeBERTaV3 network as an immutable, hashable value.

Flax modules are dataclasses that jax may hash (jit static arguments, `nn.scan`, `nn.remat`), so the
network description handed to them is a frozen dataclass rather than the mutable ml-collections
config. `ModelConfig.from_config(config.model)` builds the discriminator description from a run
config and `generator_config` the generator's (same width, half the depth: paper section 5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("gather", "skew", "flash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of one encoder, named after the fields of a HF DebertaV2 config.json."""

  vocab_size: int = 128100
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  position_buckets: int = 256
  max_relative_positions: int = -1
  layer_norm_eps: float = 1e-7
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  # Rows of the embedding tables are padded to a multiple of this so the vocabulary axis shards
  # evenly; the padding rows are masked out of every softmax and stripped on export.
  vocab_pad_multiple: int = 128
  # The [PAD] id: its embedding row is looked up but never learns (the official padding_idx).
  pad_token_id: int = 0
  # The absolute position table is used only by the generator's Enhanced Mask Decoder; the
  # discriminator and HF encoders (position_biased_input=false) do not have one.
  position_table: bool = True
  # Compute dtype of matmuls and activations; parameters always stay float32.
  dtype: str = "float32"
  # Attention implementation: 'gather' (the reference's index gather), 'skew' (relative shift) or
  # 'flash' (fused Pallas kernels for GPU and TPU; models/flash_attention.py).
  attention_impl: str = "gather"
  # Tile size (rows of queries and keys) of the 'flash' kernels: a power of two >= 16. GPU: 64
  # compiles without register spills for sm_90, 128 spills (docs/benchmarks.md); TPU uses >= 128.
  flash_block: int = 64
  # Rematerialisation of each layer in the backward pass: 'none', 'full' or 'dots'.
  remat: str = "none"
  # Run the layer stack as one lax.scan (one compiled layer body; faster compiles of deep stacks).
  scan_layers: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"model.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    if self.flash_block < 16 or self.flash_block & (self.flash_block - 1):
      raise ValueError(f"model.flash_block={self.flash_block} is not a power of two >= 16")
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat={self.remat!r} is not 'none', 'full' or 'dots'")
    if self.position_buckets <= 0:
      raise ValueError("model.position_buckets must be positive (DeBERTaV3 uses 256)")

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    m = max(1, self.vocab_pad_multiple)
    return -(-self.vocab_size // m) * m

  @property
  def max_relative_distance(self) -> int:
    """P in the bucket formula: relative distances are clamped to +-(P-1)."""
    if self.max_relative_positions > 0:
      return self.max_relative_positions
    return self.max_position_embeddings

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, model: Mapping[str, Any]) -> "ModelConfig":
    """The discriminator's description from `config.model` (unknown keys are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: model[k] for k in model.keys() if k in names}
    values["position_table"] = False
    return cls(**values)


def generator_config(model: Mapping[str, Any]) -> ModelConfig:
  """The generator's description: the discriminator's width, `model.generator_num_layers` deep.

  The generator always keeps the absolute position table because its Enhanced Mask Decoder adds
  absolute positions to the query stream.
  """
  disc = ModelConfig.from_config(model)
  layers = model.get("generator_num_layers", 0) or max(1, disc.num_layers // 2)
  return disc.replace(num_layers=int(layers), position_table=True)

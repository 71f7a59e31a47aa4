"""Linen building blocks whose parameters carry logical axis names.

Every parameter is declared through `nn.with_logical_partitioning`, so one rule table in the config
decides how it is sharded on any mesh; without a mesh the names are inert metadata that
`flax.linen.meta.unbox` strips.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deberta_jax.models import hash_dropout
from deberta_jax.models.config import ModelConfig


def normal_init(config: ModelConfig, names: Sequence[str | None]):
  """N(0, initializer_range), not truncated, as the official nnmodule init."""
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), tuple(names))


def vocab_table_init(config: ModelConfig, names: Sequence[str | None]):
  """N(0, 0.02) for real vocabulary rows, zeros for the rows that only pad the table.

  Pad rows never take part in a lookup or a softmax; keeping them zero makes a save/load round
  trip (which strips and re-adds them) exact.
  """
  def init(key, shape, dtype=jnp.float32):
    table = nn.initializers.normal(config.initializer_range)(key, shape, dtype)
    return jnp.where(jnp.arange(shape[0])[:, None] < config.vocab_size, table, 0).astype(dtype)
  return nn.with_logical_partitioning(init, tuple(names))


def dense(config: ModelConfig, features: int, names: Sequence[str | None], name: str) -> nn.Dense:
  """A Linear layer: N(0, 0.02) kernel, zero bias, float32 parameters, compute in config dtype."""
  return nn.Dense(
      features,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      kernel_init=normal_init(config, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[-1],)),
      name=name,
  )


def layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
  """Affine LayerNorm with the reference epsilon (1e-7; flax's default is 1e-6)."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=config.compute_dtype,
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name,
  )


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) gelu, as torch.nn.functional.gelu; jax's default is the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def target_platform() -> str:
  """The platform the traced computation is compiled for: that of the mesh in context
  (jax.set_mesh), else the default backend.

  The two differ when a step is compiled for devices this process does not run on (the
  compile-only devices of jax.experimental.topologies): following the default backend there
  would put the CPU interpreter's version of the kernels into a TPU program.
  """
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


def shards(name: str) -> int:
  """Into how many pieces the current mesh and logical rules split an axis called `name` (1
  outside a mesh). A constraint needs the axis size to be a multiple of it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes((name,))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(dict(mesh.shape)[a] for a in axes)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding hint; a no-op outside a mesh with logical rules."""
  return nn.with_logical_constraint(x, tuple(names))


class Dropout(nn.Module):
  """Inverted dropout whose mask is a counter hash (hash_dropout.py) instead of threefry bits.

  One 32-bit seed per call comes from the 'dropout' RNG stream (as flax's nn.Dropout); the keep
  decisions hash it with each entry's position, a few integer operations per entry instead of
  threefry's rounds. The drop probability is quantized to multiples of 2^-23 and survivors are
  scaled by the exact inverse keep probability, so E[output] = input.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               rows: hash_dropout.RowLayout | None = None) -> jax.Array:
    """`rows`: where axis 0's rows sit in the global batch (None: x has no batch axis)."""
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    seed = jax.random.bits(self.make_rng("dropout"), (), jnp.uint32)
    return hash_dropout.dropout(x, seed, self.rate, rows)

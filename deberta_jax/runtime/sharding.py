"""Device mesh, logical-axis rules and shardings of the training state and batch.

The model names every parameter and key activation with logical axes (layers.py); one rule table
maps them to the mesh axes (data, fsdp, tensor). Changing how a model is sharded is a config
change (`config.mesh.*`), never a model change.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from deberta_jax.errors import BadInput

MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(BadInput):
  """config.mesh does not fit the devices present; the message names the field."""

# Logical name -> mesh axes. First match wins; a mesh axis is used at most once per array.
LOGICAL_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_embed", None),
    ("length", None),
    ("kv", None),
    ("relpos", None),
    ("position", None),
    ("norm", None),
)


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) from config.mesh with at most one -1 filled by the remaining devices."""
  sizes = [int(config.mesh[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError("config.mesh: at most one of data/fsdp/tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} does not divide the "
                       f"{num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(f"config.mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
                     f"{num_devices} devices")
  return tuple(sizes)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  if devices is None:
    devices = jax.devices()
    if config.mesh.get("num_devices", 0):
      devices = devices[: config.mesh.num_devices]
  devices = list(devices)
  if config.mesh.get("num_devices", 0) > len(jax.devices()):
    raise MeshError(f"config.mesh.num_devices: {config.mesh.num_devices} asked for, but only "
                    f"{len(jax.devices())} devices are present")
  shape = mesh_shape(config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # pylint: disable=broad-except  # non-TPU topologies / subsets of devices
    grid = np.array(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_sharding(tree, mesh: Mesh):
  """NamedShardings for a tree of (boxed) abstract values via the logical rules."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def on_mesh(fn, mesh: Mesh):
  """`fn` (a jitted function) called under `mesh` and the logical-axis rules: the model's
  sharding constraints and the fused kernels' shard_map read both when the function is traced,
  and without them would see one device holding the global batch."""

  def call(*args, **kwargs):
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      return fn(*args, **kwargs)

  return call


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]

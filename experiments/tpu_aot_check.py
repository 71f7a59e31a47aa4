"""Compiles the fused attention (and a whole training step) for a TPU on a machine without one.

libtpu can compile for a described topology with no chip present (jax.experimental.topologies),
so Mosaic's own compiler checks the TPU kernel, and XLA's TPU memory figures come out, before
any TPU time is spent. libtpu is not a project dependency (~210 MB); use a separate venv that
sees the project's packages:

  python3 -m venv /tmp/tpuv
  echo /path/to/project/venv/lib/python3.11/site-packages > /tmp/tpuv/lib/python3.11/site-packages/project.pth
  echo /path/to/the/checkout >> /tmp/tpuv/lib/python3.11/site-packages/project.pth
  /tmp/tpuv/bin/pip install --no-deps "libtpu==0.0.42.*"        # the version jax[tpu] pins
  export JAX_PLATFORMS=cpu TPU_WORKER_HOSTNAMES=localhost TPU_ACCELERATOR_TYPE=v5p-8
  /tmp/tpuv/bin/python experiments/tpu_aot_check.py attention              # kernel fwd+bwd
  /tmp/tpuv/bin/python experiments/tpu_aot_check.py stack --layers 6       # memory per layer
  /tmp/tpuv/bin/python experiments/tpu_aot_check.py step --impl flash      # base dry run

`step` is the `dry_run` of configs/base.py (or `--config large`: per-chip memory, micro-batch
search) on the topology's compile-only devices instead of this host's.
"""

from __future__ import annotations

import argparse
import importlib
import time

import jax
from jax.experimental import topologies
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from deberta_jax.models.kernels import flash_attention
from deberta_jax.pretraining import train
from deberta_jax.runtime import sharding


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("what", choices=["attention", "stack", "step"])
  parser.add_argument("--topology", default="v5p:2x2x1")
  parser.add_argument("--impl", default="flash", help="step: model.attention_impl")
  parser.add_argument("--config", default="base", help="step: a module of configs/")
  parser.add_argument("--per_chip", type=int, default=32, help="step: sequences per chip")
  parser.add_argument("--memory_gb", type=float, default=95.0, help="step: HBM per chip")
  parser.add_argument("--microbatch", type=int, default=0,
                      help="step: sequences per micro-batch (0: search, as the dry run does)")
  parser.add_argument("--layers", type=int, default=2, help="stack: fused layers in a row")
  parser.add_argument("--batch", type=int, default=16, help="stack: sequences")
  parser.add_argument("--heads", type=int, default=16, help="stack: heads (of size 64)")
  args = parser.parse_args()


  devices = list(topologies.get_topology_desc(args.topology, "tpu").devices)
  one = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype, sharding=one)
  if args.what == "attention":
    batch, heads, length, head_dim = 2, 12, 512, 64

    def loss(q, k, v, qr, kr, mask, seed):
      out = flash_attention.fused_attention(q, k, v, qr, kr, mask, dropout_rate=0.1,
                                            dropout_seed=seed, backend="mosaic", interpret=False)
      return jnp.sum(out.astype(jnp.float32))

    operands = ((shape(batch, heads, length, head_dim),) * 3
                + (shape(2 * length - 1, heads, head_dim),) * 2
                + (shape(batch, length, dtype=jnp.int32), shape(dtype=jnp.uint32)))
    start = time.time()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=range(5))).lower(*operands).compile()
    memory = compiled.memory_analysis()
    print(f"{args.topology}: fused attention fwd+bwd {batch}x{heads}x{length}x{head_dim} bf16 "
          f"compiled in {time.time() - start:.1f} s; temporaries "
          f"{memory.temp_size_in_bytes / 2**30:.2f} GiB")
    return

  if args.what == "stack":
    # Temporaries of N fused layers in a row, fwd+bwd: what each layer keeps for its backward
    # pass is the growth per layer (its tables, if XLA merged their recomputation).
    length = 512

    def stack(x, qr, kr, mask):
      for _ in range(args.layers):
        x = flash_attention.fused_attention(x, x * 0.5, x * 0.25, qr, kr, mask, backend="mosaic",
                                            interpret=False)
      return jnp.sum(x.astype(jnp.float32))

    operands = (shape(args.batch, args.heads, length, 64), shape(2 * length - 1, args.heads, 64),
                shape(2 * length - 1, args.heads, 64), shape(args.batch, length, dtype=jnp.int32))
    compiled = jax.jit(jax.grad(stack, argnums=(0, 1, 2))).lower(*operands).compile()
    memory = compiled.memory_analysis()
    print(f"{args.layers} fused layers, {args.batch} x {args.heads} x {length} x 64 bf16: "
          f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB")
    return

  make_mesh = sharding.make_mesh
  sharding.make_mesh = lambda config, _=None: make_mesh(config, devices)
  config = importlib.import_module(f"configs.{args.config}").get_config()
  config.global_batch_size = args.per_chip * len(devices)
  config.model.attention_impl = args.impl
  config.mesh.device_memory_gb = args.memory_gb
  config.mesh.per_device_microbatch = args.microbatch
  config.dry_run = True
  train.dry_run(config)


if __name__ == "__main__":
  main()

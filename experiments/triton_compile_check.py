"""Compiles the fused-attention GPU kernels to a Hopper cubin on a machine without a GPU.

The tests stop at Triton IR (the Pallas lowering); this goes the rest of the way with the Triton
compiler from PyPI (its LLVM and ptxas), and reports what decides whether a tile configuration
is viable before any GPU time is spent on it: registers per thread, spilled bytes (stack) and
shared memory. Triton on PyPI is not the Triton inside jaxlib, so "compiles here" is strong
evidence, not proof, that XLA compiles the same IR.

Two steps, because the project's virtualenv has jax and the other has triton (285 MB, not a
project dependency):

  python experiments/triton_compile_check.py dump --out /tmp/ttir            # project venv
  python3 -m venv /tmp/tv && /tmp/tv/bin/pip install triton
  /tmp/tv/bin/python experiments/triton_compile_check.py compile /tmp/ttir/*.ttir --num_warps 4

`dump` lowers forward + backward (bf16, dropout on) for CUDA at each --blocks tile and writes one
.ttir file per kernel: <tag>_<kernel>.ttir.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import jax
from jax import export
from jax._src.pallas.triton import pallas_call_registration as registration
import jax.numpy as jnp

from deberta_jax.models.kernels import flash_attention


def dump(out: str, batch: int, heads: int, length: int, head_dim: int, blocks, rate: float):

  captured = []
  lower = registration.lowering.lower_jaxpr_to_triton_module

  def capturing_lower(*args, **kwargs):  # keeps the module Pallas hands to XLA, as text
    result = lower(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capturing_lower
  shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
  args = ((shape(batch, heads, length, head_dim),) * 3
          + (shape(2 * length - 1, heads, head_dim),) * 2
          + (shape(batch, length, dtype=jnp.int32), shape(dtype=jnp.uint32)))
  os.makedirs(out, exist_ok=True)
  for block in blocks:
    def loss(q, k, v, qr, kr, mask, seed, block=block):
      context = flash_attention.fused_attention(
          q, k, v, qr, kr, mask, dropout_rate=rate, dropout_seed=seed, block=block,
          backend="triton", interpret=False)
      return jnp.sum(context.astype(jnp.float32))

    captured.clear()
    triton_call = "__gpu$xla.gpu.triton"
    export.export(jax.jit(jax.value_and_grad(loss, argnums=range(5))), platforms=["cuda"],
                  disabled_checks=[export.DisabledSafetyCheck.custom_call(triton_call)])(*args)
    for module in captured:
      kernel = re.search(r"tt.func public @(\w+)", module).group(1)
      path = os.path.join(out, f"block{block}_{kernel}.ttir")
      with open(path, "w") as f:
        f.write(module)
      print(path)


def compile_all(paths, num_warps: int, num_stages: int, arch: int):
  # Late: PyPI's triton is installed only for this step (the lowering above does not need it).
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel

  cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
  print(f"triton {triton.__version__}, sm_{arch}, num_warps {num_warps}, num_stages {num_stages}")
  for path in paths:
    name = os.path.basename(path)
    try:
      kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # pylint: disable=broad-except  # reported per kernel
      print(f"{name:45s} FAILED {type(e).__name__}: {str(e)[:400]}")
      continue
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
      f.write(kernel.asm["cubin"])
      f.flush()
      usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", usage)
    regs, stack = found.groups() if found else ("?", "?")
    print(f"{name:45s} compiled  registers {regs:>3}  spilled (stack) bytes {stack:>5}  "
          f"shared {kernel.metadata.shared} bytes")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  d = sub.add_parser("dump", help="write the kernels' Triton IR (project venv)")
  d.add_argument("--out", default="/tmp/ttir")
  d.add_argument("--batch", type=int, default=2)
  d.add_argument("--heads", type=int, default=12)
  d.add_argument("--seq_len", type=int, default=512)
  d.add_argument("--head_dim", type=int, default=64)
  d.add_argument("--blocks", default="32,64,128")
  d.add_argument("--dropout", type=float, default=0.1)
  c = sub.add_parser("compile", help="compile .ttir files to cubin (venv with triton)")
  c.add_argument("paths", nargs="+")
  c.add_argument("--num_warps", type=int, default=4)
  c.add_argument("--num_stages", type=int, default=2)
  c.add_argument("--arch", type=int, default=90, help="SM version: 90 = H100/H200")
  args = parser.parse_args()
  if args.command == "dump":
    dump(args.out, args.batch, args.heads, args.seq_len, args.head_dim,
         [int(b) for b in args.blocks.split(",")], args.dropout)
  else:
    compile_all(args.paths, args.num_warps, args.num_stages, args.arch)


if __name__ == "__main__":
  main()

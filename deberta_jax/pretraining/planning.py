"""Fitting the step to the hardware: how many micro-batches, and the memory report.

The trainer hands over its jitted step for a micro-batch count (`train.jit_step`); here it is
lowered and compiled against abstract arrays (shapes, dtypes and shardings only), so nothing is
allocated: this is what lets the dry run report whether a size fits a mesh before anyone rents
it, and what lets the trainer pick the largest per-device micro-batch that fits a memory budget.
Memory figures are XLA's own buffer assignment for one device's program.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax import config as config_lib
from deberta_jax.pretraining import flops
from deberta_jax.runtime import sharding

GiB = 1024**3
# Fraction of a device's reported memory the automatic micro-batch may plan to use: the rest is
# left to the runtime (collectives' buffers, allocator fragmentation, the input batch in flight).
DEVICE_MEMORY_FRACTION = 0.9
BATCH_FIELDS = ("input_ids", "attention_mask")


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device bytes of one compiled training step."""
  params: int          # parameters (float32) held by one device
  optimizer: int       # optimizer states held by one device
  batch: int           # the input batch shard
  temporaries: int     # activations, gradients and everything else XLA allocates for the step
  generated_code: int

  @property
  def total(self) -> int:
    # The state is donated: its output aliases its input, so it is counted once.
    return self.params + self.optimizer + self.batch + self.temporaries + self.generated_code


@dataclasses.dataclass(frozen=True)
class StepPlan:
  num_micro: int
  per_device_microbatch: int
  memory: StepMemory
  flops_per_device: float | None   # XLA's count for one device's program (None if unreported)
  # XLA's cost-model time of one device's program (`optimal_seconds`: each operation at its own
  # FLOP or memory roofline; libtpu reports it, other backends may not). An estimate.
  estimated_seconds: float | None
  compiled: object                 # jax.stages.Compiled; callable as compiled(state, batch)


def abstract_batch(config, mesh) -> dict:
  """The global batch as ShapeDtypeStructs: int32 [global_batch_size, seq_len] per field."""
  shape = (config.global_batch_size, config.seq_len)
  spec = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec) for k in BATCH_FIELDS}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded abstract (or concrete) arrays (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def compile_step(jitted, config, mesh, abstract_state, num_micro: int) -> StepPlan:
  """Lowers and compiles `jitted` (the step for `num_micro` micro-batches); allocates nothing."""
  batch = abstract_batch(config, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    compiled = jitted.lower(abstract_state, batch).compile()
  analysis = compiled.memory_analysis()
  temporaries = int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis else 0
  code = int(getattr(analysis, "generated_code_size_in_bytes", 0) or 0) if analysis else 0
  memory = StepMemory(params=per_device_bytes(abstract_state.params),
                      optimizer=per_device_bytes(abstract_state.opt_state),
                      batch=per_device_bytes(batch), temporaries=temporaries,
                      generated_code=code)
  per_device = config.global_batch_size // sharding.data_parallel_size(mesh)
  cost = _cost(compiled)
  positive = lambda key: float(cost[key]) if cost.get(key, 0) > 0 else None
  return StepPlan(num_micro=num_micro, per_device_microbatch=per_device // num_micro,
                  memory=memory, flops_per_device=positive("flops"),
                  estimated_seconds=positive("optimal_seconds"), compiled=compiled)


def _cost(compiled) -> dict:
  """XLA's cost analysis of the compiled program ({} where the backend reports none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports costs
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return dict(cost or {})


def memory_budget(config) -> int | None:
  """Bytes per device the step may use: config.mesh.device_memory_gb, else what the device
  reports (times DEVICE_MEMORY_FRACTION); None when neither is known (CPU)."""
  if config.mesh.device_memory_gb > 0:
    return int(config.mesh.device_memory_gb * GiB)
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"] * DEVICE_MEMORY_FRACTION)
  return None


def microbatch_candidates(per_device: int) -> list[int]:
  """Micro-batch counts to try, fewest first: the divisors of the per-device batch."""
  return [m for m in range(1, per_device + 1) if per_device % m == 0]


def plan_step(jit_for, config, mesh, abstract_state,
              budget: int | None) -> tuple[StepPlan, list[StepPlan]]:
  """The plan with the fewest micro-batches whose memory fits `budget`, and every plan compiled.

  jit_for(num_micro) -> the jitted step for that many micro-batches (train.jit_step).

  An explicit config.mesh.per_device_microbatch is honoured as given. Otherwise the candidates
  are searched by bisection (memory falls as the number of micro-batches grows), so a per-device
  batch of 32 costs at most 3 compilations. When nothing fits, the smallest micro-batch's plan is
  returned and the caller decides (the dry run reports it; training refuses to start).
  """
  per_device = config.global_batch_size // sharding.data_parallel_size(mesh)
  compile_for = lambda m: compile_step(jit_for(m), config, mesh, abstract_state, m)
  if config.mesh.per_device_microbatch:
    plan = compile_for(per_device // config.mesh.per_device_microbatch)
    return plan, [plan]
  candidates = microbatch_candidates(per_device)
  if budget is None:
    plan = compile_for(1)
    return plan, [plan]
  tried: dict[int, StepPlan] = {}
  lo, hi = 0, len(candidates) - 1
  best = None
  while lo <= hi:
    mid = (lo + hi) // 2
    plan = tried[candidates[mid]] = compile_for(candidates[mid])
    if plan.memory.total <= budget:
      best, hi = plan, mid - 1
    else:
      lo = mid + 1
  if best is None:
    best = tried.get(candidates[-1]) or compile_for(candidates[-1])
    tried[candidates[-1]] = best
  return best, [tried[m] for m in sorted(tried)]


class DoesNotFitError(config_lib.ConfigError):
  """Even one sequence per device per micro-batch exceeds the per-device memory budget."""


def check_fits(plan: StepPlan, budget: int | None) -> None:
  if budget is not None and plan.memory.total > budget:
    raise DoesNotFitError(
        f"config.mesh.device_memory_gb: the step needs {plan.memory.total / GiB:.2f} GiB per "
        f"device with {plan.per_device_microbatch} sequence(s) per micro-batch, more than the "
        f"budget of {budget / GiB:.2f} GiB; use more devices (mesh.fsdp), model.remat='full' or "
        "a shorter seq_len")


def format_report(config, mesh, plan: StepPlan, tried: list[StepPlan], budget: int | None,
                  analytic_flops_per_token: float | None) -> str:
  """The dry run's printout: mesh, per-device memory by kind, FLOPs per step."""
  per_device = config.global_batch_size // sharding.data_parallel_size(mesh)
  m = plan.memory
  gib = _human
  lines = [
      f"dry run: {config.model.num_layers}-layer discriminator, hidden {config.model.hidden_size}, "
      f"vocab {config.model.vocab_size}, seq_len {config.seq_len}, dtype {config.model.dtype}, "
      f"remat {config.model.remat}",
      f"mesh: {dict(mesh.shape)} = {mesh.size} devices ({mesh.devices.flat[0].platform}); "
      f"global batch {config.global_batch_size} = {per_device} per data-parallel device",
      f"micro-batching: {plan.num_micro} x {plan.per_device_microbatch} sequences per device"
      + (f" (searched: {', '.join(f'{p.per_device_microbatch}->{_human(p.memory.total).strip()}' for p in tried)})"
         if len(tried) > 1 else ""),
      "per-device memory:",
      f"  parameters        {gib(m.params)}",
      f"  optimizer state   {gib(m.optimizer)}",
      f"  input batch       {gib(m.batch)}",
      f"  activations+temps {gib(m.temporaries)}",
      f"  total             {gib(m.total)}"
      + (f"  (budget {budget / GiB:.2f} GiB: {'fits' if m.total <= budget else 'DOES NOT FIT'})"
         if budget is not None else "  (no budget given: set --config.mesh.device_memory_gb)"),
  ]
  tokens = config.global_batch_size * config.seq_len
  if analytic_flops_per_token:
    lines.append(f"FLOPs per step (analytic, model FLOPs): {analytic_flops_per_token * tokens:.3e} "
                 f"total, {analytic_flops_per_token * tokens / mesh.size:.3e} per device")
  if plan.flops_per_device is not None:
    # XLA counts the body of the micro-batch loop once, whatever its trip count.
    lines.append(f"FLOPs per step (XLA cost analysis of one device's program, micro-batch loop "
                 f"counted {plan.num_micro}x): {plan.flops_per_device * plan.num_micro:.3e} per "
                 "device")
  if plan.estimated_seconds is not None:
    seconds = plan.estimated_seconds * plan.num_micro
    per_device = tokens / mesh.size / seconds
    device_kind = mesh.devices.flat[0].device_kind
    mfu = (flops.mfu(analytic_flops_per_token, per_device, device_kind)
           if analytic_flops_per_token else None)
    lines.append(f"step time (XLA's cost-model estimate, not a measurement): {seconds:.4f} s = "
                 f"{per_device:,.0f} tokens/s per device"
                 + (f", model-FLOP MFU {100 * mfu:.1f}% of the {device_kind} bf16 peak"
                    if mfu is not None else ""))
  return "\n".join(lines)


def _human(num_bytes: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
    if num_bytes >= size or unit == "KiB":
      return f"{num_bytes / size:8.2f} {unit}"
  return ""


def analytic_flops_per_token(config) -> float | None:
  """The model-FLOP count of deberta_jax.pretraining.flops."""
  return float(flops.flops_per_token(config))

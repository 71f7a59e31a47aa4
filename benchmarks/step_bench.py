"""The timing side of `benchmarks.bench`: our RTD step built as training builds it, on synthetic
batches, timed, profiled, and optionally beside the PyTorch reference (torch_reference.py).

bench.py's main imports this module only after the CPU device split is applied (jax reads the
device count once, when it starts), so it imports jax at the top like any library module.
"""

from __future__ import annotations

import glob
import os
import re
import resource
import statistics
import sys
import time

from absl import logging
import jax
import numpy as np

from deberta_jax import config as config_lib
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import flops
from deberta_jax.pretraining import planning
from deberta_jax.pretraining import train
from deberta_jax.pretraining import train_step as ts
from deberta_jax.runtime import dispatch
from deberta_jax.runtime import sharding

_NUM_BATCHES = 4  # distinct synthetic batches cycled through (already on the device)


# ------------------------------------------------------------------------------ synthetic data

def synthetic_batches(batch: int, seq_len: int, vocab_size: int, count: int, seed: int = 0):
  """`count` batches of int32 input_ids / attention_mask [batch, seq_len], numpy.

  Each row is [CLS] w_1 ... w_{L-2} [SEP] with w uniform over the ordinary ids [4, mask_id) and no
  padding (every token is real, so tokens/s counts real tokens). Ids follow the tokenizer's
  layout: pad 0, [CLS] 1, [SEP] 2, [UNK] 3, [MASK] = vocab_size - 1 (see `special_ids`).
  """
  _, cls, sep, _, mask = special_ids(vocab_size)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    ids = rng.integers(4, mask, size=(batch, seq_len), dtype=np.int32)
    ids[:, 0], ids[:, -1] = cls, sep
    out.append({"input_ids": ids, "attention_mask": np.ones((batch, seq_len), np.int32)})
  return out


def special_ids(vocab_size: int) -> tuple[int, int, int, int, int]:
  """(pad, cls, sep, unk, mask) as train_step.SpecialTokens expects them."""
  return 0, 1, 2, 3, vocab_size - 1


# ------------------------------------------------------------------------------------- JAX side

def bench_jax(config, batches, steps: int, warmup: int, repeats: int = 1,
              profile_dir: str | None = None) -> dict:
  """Compiles and times the training step of `config` on `batches` (numpy); returns figures.

  Times `repeats` windows of `steps` steps (one block_until_ready per window) and reports the
  median window's seconds per step.
  """

  mesh = sharding.make_mesh(config)
  num_micro = train.microbatches(config, mesh)
  model = RTDModel.from_config(config)
  optimizers = ts.make_optimizers(config)
  t0 = time.perf_counter()
  state, state_shardings = train.create_state(model, optimizers, config, mesh)
  jax.block_until_ready(state)
  init_seconds = time.perf_counter() - t0

  batch_sharding = sharding.batch_sharding(mesh)
  on_device = [{k: jax.make_array_from_process_local_data(batch_sharding, v)
                for k, v in b.items()} for b in batches]
  tokens = ts.SpecialTokens(*special_ids(config.model.vocab_size))
  t0 = time.perf_counter()
  jitted = train.jit_step(model, optimizers, config, tokens, mesh, state_shardings, num_micro)
  compiled = planning.compile_step(jitted, config, mesh, train.abstract_of(state),
                                   num_micro).compiled
  compile_seconds = time.perf_counter() - t0

  metrics = None
  in_flight = dispatch.StepsInFlight(ahead=1)  # queued as the trainer queues them
  for i in range(warmup):
    state, metrics = compiled(state, on_device[i % len(on_device)])
    in_flight.dispatched(metrics)
  jax.block_until_ready((state, metrics))
  windows = []
  for r in range(repeats):
    t0 = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, on_device[(r * steps + i) % len(on_device)])
      in_flight.dispatched(metrics)
    jax.block_until_ready((state, metrics))
    windows.append((time.perf_counter() - t0) / steps)

  peak, source = _device_peak_memory(jax)  # before the profiler adds its own buffers
  profile = None
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      for i in range(3):
        state, metrics = compiled(state, on_device[i % len(on_device)])
      jax.block_until_ready((state, metrics))
    profile = summarise_trace(profile_dir, compiled.as_text(), traced_steps=3)

  final = {k: float(v) for k, v in jax.device_get(metrics).items()} if metrics else {}
  for name in ("mlm_loss", "rtd_loss"):
    if name in final and not np.isfinite(final[name]):
      raise RuntimeError(f"non-finite {name} in the benchmark: {final}")
  device = jax.local_devices()[0]
  step_seconds = statistics.median(windows)
  return {
      "step_seconds": step_seconds,
      "window_step_seconds": windows,
      "tokens_per_second": config.global_batch_size * config.seq_len / step_seconds,
      "compile_seconds": compile_seconds,
      "init_seconds": init_seconds,
      "peak_memory_bytes": peak,
      "peak_memory_source": source,
      "platform": device.platform,
      "device": device.device_kind,
      "num_devices": int(mesh.size),
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "num_micro": num_micro,
      "xla_flops_per_step": _xla_flops(compiled, mesh.size),
      "final_metrics": {k: final[k] for k in ("mlm_loss", "rtd_loss") if k in final},
      "jax_version": jax.__version__,
      "profile": profile,
  }


def _device_peak_memory(jax_module) -> tuple[int | None, str]:
  """Peak allocator bytes of the busiest local device, else this process's max RSS."""
  peaks = []
  for device in jax_module.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  # backends without allocator stats
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "device_peak_bytes_in_use"
  return _max_rss_bytes(), "process_max_rss"


def _max_rss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def _xla_flops(compiled, num_devices: int) -> float | None:
  """XLA's own FLOP count for the whole step (its per-device program times the devices)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"]) * num_devices


# ------------------------------------------------------------------------------------ profiling

def _op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> the JAX op_name (name stack) in its metadata."""
  pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]+)"')
  out = {}
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if m:
      out.setdefault(m.group(1), m.group(2))
  return out


def categorise(op_name: str) -> str:
  """'generator/attention/fwd'-style bucket of a JAX op_name (name stack)."""
  if not op_name:
    return "unattributed"
  if "Generator" in op_name:
    network = "generator"
  elif "Discriminator" in op_name:
    network = "discriminator"
  else:
    return "step (masking, sampling, losses, optimizer)"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  parts = (("attention_output", "attention_output"), ("attention_LayerNorm", "layernorm"),
           ("output_LayerNorm", "layernorm"), ("/attention/", "attention"),
           ("intermediate", "ffn"), ("/output/", "ffn"), ("lm_head", "lm_head"),
           ("mask_predictions", "rtd_head"), ("embeddings", "embeddings"),
           ("Dropout", "dropout"), ("LayerNorm", "layernorm"))
  part = next((label for key, label in parts if key in op_name), "other")
  if part == "attention" and "dropout" in op_name:
    part = "attention_dropout"
  return f"{network}/{part}/{direction}"


def summarise_trace(trace_dir: str, hlo_text: str, traced_steps: int, top: int = 12) -> dict | None:
  """Device time per HLO op (self time) and per model part, per step, from a jax.profiler trace.

  GPU/TPU: the device planes' "XLA Ops" lines; CPU: the host threads' events that carry an
  hlo_op stat. Nested events (e.g. a while loop's body ops) are counted once (self time).
  """
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    return None
  try:
    data = jax.profiler.ProfileData.from_file(paths[-1])  # jax >= 0.4.3x
  except Exception as e:  # pylint: disable=broad-except  # incl. a jax without ProfileData
    return {"trace_dir": trace_dir, "error": f"could not read {paths[-1]}: {e}"}
  names = _op_names(hlo_text)
  device_planes = [p for p in data.planes if p.name.startswith("/device:")]
  events = []
  for plane in device_planes or [p for p in data.planes if p.name.startswith("/host:")]:
    for line in plane.lines:
      if device_planes and line.name != "XLA Ops":
        continue
      line_events = []
      for e in line.events:
        stats = dict(e.stats)
        op = stats.get("hlo_op")
        if op is None and not device_planes:
          continue
        line_events.append((e.start_ns, e.end_ns, str(op or e.name)))
      events.extend(_self_times(line_events))
  if not events:
    return None
  per_op, per_part = {}, {}
  for op, ns in events:
    per_op[op] = per_op.get(op, 0.0) + ns
    part = categorise(names.get(op, ""))
    per_part[part] = per_part.get(part, 0.0) + ns
  total = sum(per_op.values())
  ms = lambda ns: ns / 1e6 / traced_steps
  top_ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
  return {
      "trace_dir": trace_dir,
      "device_ms_per_step": ms(total),
      "by_part_ms_per_step": {k: round(ms(v), 3) for k, v in
                              sorted(per_part.items(), key=lambda kv: -kv[1])},
      "top_ops": [{"op": op, "ms_per_step": round(ms(ns), 3), "share": round(ns / total, 4),
                   "op_name": names.get(op, "")[-160:]} for op, ns in top_ops],
  }


def _self_times(line_events):
  """[(start, end, name)] of one timeline -> [(name, self ns)], children subtracted."""
  out, stack = [], []  # stack of [end, name, duration, children]
  for start, end, name in sorted(line_events, key=lambda e: (e[0], -e[1])):
    while stack and stack[-1][0] <= start:
      done = stack.pop()
      out.append((done[1], done[2] - done[3]))
    if stack:
      stack[-1][3] += end - start
    stack.append([end, name, end - start, 0.0])
  out.extend((item[1], item[2] - item[3]) for item in stack)
  return out


# ------------------------------------------------------------------------------------- driver

def _progress(message: str) -> None:
  """Stage timestamps on stderr, so a run cut short by a time limit still shows where it was."""
  print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(config, steps: int, warmup: int, reference: str = "none",
            torch_compile: bool = False, repeats: int = 1, torch_threads: int = 0,
            profile_dir: str | None = None, config_name: str | None = None) -> dict:
  """Benchmarks `config` (seq_len and global_batch_size already set); returns the JSON record."""

  config_lib.validate(config)
  batches = synthetic_batches(config.global_batch_size, config.seq_len, config.model.vocab_size,
                              min(_NUM_BATCHES, max(1, steps * repeats + warmup)), config.seed)
  ref = None
  platform = jax.default_backend()
  torch_device = "cpu"
  if reference == "torch":
    # Late: torch and transformers are test-only dependencies, needed only for the reference.
    import torch  # pylint: disable=import-outside-toplevel

    from benchmarks import torch_reference  # pylint: disable=import-outside-toplevel
    if platform == "gpu" and torch.cuda.is_available():
      torch_device = "cuda"
    elif platform != "cpu":
      logging.warning("JAX runs on %s but torch has no such device: the reference runs on CPU "
                      "and the speedup compares different devices", platform)
    if torch_device == "cuda":  # reference first, then its cache is freed for JAX
      _progress("torch reference: start")
      ref = torch_reference.bench_torch(config, batches, special_ids(config.model.vocab_size),
                                        steps, warmup, torch_device, torch_compile, repeats,
                                        torch_threads)
      _progress(f"torch reference: {ref['reference_tokens_per_second']:.0f} tokens/s")
  _progress("jax: build, compile and time")
  ours = bench_jax(config, batches, steps, warmup, repeats, profile_dir)
  _progress(f"jax: {ours['tokens_per_second']:.0f} tokens/s (compile "
            f"{ours['compile_seconds']:.1f} s)")
  if reference == "torch" and ref is None:
    _progress("torch reference: start")
    ref = torch_reference.bench_torch(config, batches, special_ids(config.model.vocab_size),
                                      steps, warmup, torch_device, torch_compile, repeats,
                                      torch_threads)

  spec = flops.flops_per_token(config)
  executed = flops.flops_per_token(config, count="executed")
  tps = ours["tokens_per_second"]
  tokens_per_step = config.global_batch_size * config.seq_len
  record = {
      "tokens_per_second": tps,
      "step_seconds": ours["step_seconds"],
      "mfu": flops.mfu(spec, tps, ours["device"], ours["num_devices"]),
      "mfu_executed": flops.mfu(executed, tps, ours["device"], ours["num_devices"]),
      "peak_memory_bytes": ours["peak_memory_bytes"],
      "peak_memory_source": ours["peak_memory_source"],
      "device": ours["device"],
      "platform": ours["platform"],
      "num_devices": ours["num_devices"],
      "peak_flops_per_device": flops.peak_flops(ours["device"]),
      "config": config_name,
      "seq_len": int(config.seq_len),
      "batch": int(config.global_batch_size),
      "steps": int(steps),
      "warmup": int(warmup),
      "repeats": int(repeats),
      "window_step_seconds": ours["window_step_seconds"],
      "dtype": config.model.dtype,
      "attention_impl": config.model.attention_impl,
      "remat": config.model.remat,
      "num_micro": ours["num_micro"],
      "flops_per_token": spec,
      "flops_per_token_executed": executed,
      "xla_flops_per_token": (ours["xla_flops_per_step"] / tokens_per_step
                              if ours["xla_flops_per_step"] else None),
      "compile_seconds": ours["compile_seconds"],
      "final_metrics": ours["final_metrics"],
      "jax_version": ours["jax_version"],
  }
  if ours["profile"] is not None:
    record["profile"] = ours["profile"]
  if ref is not None:
    record.update(ref)
    record["reference"] = "torch"
    record["speedup"] = tps / ref["reference_tokens_per_second"]
  return record



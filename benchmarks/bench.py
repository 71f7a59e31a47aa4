"""Throughput of the full RTD training step, optionally side by side with a PyTorch reference.

  python -m benchmarks.bench --config=configs/base.py --seq_len 512 --batch 32 --reference=torch

Builds the model, both optimizers and the sharded state exactly as training does
(`train.create_state`, `train_step.make_train_step`, `sharding.make_mesh`), feeds synthetic token
batches ([CLS] random ids [SEP], no padding, no corpus), compiles the step ahead of time, runs
`--warmup` steps, then times `--steps` steps (one `block_until_ready` at the end: throughput, as
training overlaps dispatch) and reports tokens/s, seconds per step, peak memory and MFU against
the analytic FLOP count of `deberta_jax.pretraining.flops` (spec section 2.2) and the device's bf16 peak.

With `--reference=torch` the same process also times the PyTorch RTD step of
`benchmarks/torch_reference.py` (transformers' DebertaV2, the same sizes) on the same device
(CUDA when JAX runs on a GPU and torch has CUDA, else CPU).

The last line of stdout is one JSON object (tokens_per_second, step_seconds, mfu,
peak_memory_bytes, device, config, seq_len, batch, ...; with a reference also
reference_tokens_per_second and speedup = ours / reference). Everything else goes before it.

Notes:
  * `--batch` is the global batch (default 8 per data-parallel device). The whole batch is one
    forward/backward unless `--config.mesh.per_device_microbatch=N` asks for accumulation (no
    automatic search here: a batch that does not fit fails loudly).
  * Any config field can be overridden (`--config.model.remat=dots`,
    `--config.model.attention_impl=gather`, `--config.model.dtype=float32`, ...).
  * peak_memory_bytes: the device allocator's peak (`memory_stats()['peak_bytes_in_use']`) where
    the backend reports one (GPU/TPU); on CPU the process's max RSS after the JAX run
    (peak_memory_source says which). With a torch reference on a GPU, JAX is started without
    preallocation and the reference runs first and frees its cache, so both fit one device.
  * torch is imported only with --reference=torch.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time

from absl import flags
from absl import logging
from ml_collections import config_flags

from deberta_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file under configs/ (e.g. configs/base.py).",
    lock_config=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: config.seq_len).")
_BATCH = flags.DEFINE_integer(
    "batch", None, "Global batch in sequences (default: 8 per data-parallel device).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Timed windows of --steps steps each; the median window is reported (use 3+ on "
    "a shared, noisy machine).")
_REFERENCE = flags.DEFINE_enum("reference", "none", ["none", "torch"],
                               "Also time a PyTorch (transformers DebertaV2) RTD step.")
_TORCH_COMPILE = flags.DEFINE_bool(
    "torch_compile", False, "torch.compile the reference's two backbones (default: eager, HF's "
    "usual mode).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for a CPU reference (0 = torch's default, one per "
    "core). On a loaded machine torch's OpenMP pool can be several times slower with 2 threads "
    "than with 1: measure both.")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "After timing, trace 3 more steps with jax.profiler and summarise device "
    "time by HLO op and by model part (stdout and the JSON's 'profile').")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "Where the trace is written (default: a temporary directory); view it with "
    "TensorBoard's profile plugin or Perfetto.")
_NUM_BATCHES = 4  # distinct synthetic batches cycled through (already on the device)


# ------------------------------------------------------------------------------ synthetic data

def synthetic_batches(batch: int, seq_len: int, vocab_size: int, count: int, seed: int = 0):
  """`count` batches of int32 input_ids / attention_mask [batch, seq_len], numpy.

  Each row is [CLS] w_1 ... w_{L-2} [SEP] with w uniform over the ordinary ids [4, mask_id) and no
  padding (every token is real, so tokens/s counts real tokens). Ids follow the tokenizer's
  layout: pad 0, [CLS] 1, [SEP] 2, [UNK] 3, [MASK] = vocab_size - 1 (see `special_ids`).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
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
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import planning  # pylint: disable=import-outside-toplevel
  from deberta_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import train  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import train_step as ts  # pylint: disable=import-outside-toplevel
  from deberta_jax.models.rtd import RTDModel  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(config)
  num_micro = train.microbatches(config, mesh)
  model = RTDModel(config)
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
  for i in range(warmup):
    state, metrics = compiled(state, on_device[i % len(on_device)])
  jax.block_until_ready((state, metrics))
  windows = []
  for r in range(repeats):
    t0 = time.perf_counter()
    for i in range(steps):
      state, metrics = compiled(state, on_device[(r * steps + i) % len(on_device)])
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
  import re  # pylint: disable=import-outside-toplevel
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
  import glob  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
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

def configure(config, seq_len: int | None, batch: int | None, num_devices: int):
  """Applies --seq_len / --batch to the config (global batch; default 8 per device)."""
  if seq_len is not None:
    config.seq_len = int(seq_len)
  config.global_batch_size = int(batch) if batch is not None else 8 * num_devices
  config.dry_run = False
  return config


def _progress(message: str) -> None:
  """Stage timestamps on stderr, so a run cut short by a time limit still shows where it was."""
  print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(config, steps: int, warmup: int, reference: str = "none",
            torch_compile: bool = False, repeats: int = 1, torch_threads: int = 0,
            profile_dir: str | None = None) -> dict:
  """Benchmarks `config` (seq_len and global_batch_size already set); returns the JSON record."""
  import jax  # pylint: disable=import-outside-toplevel
  from deberta_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import flops  # pylint: disable=import-outside-toplevel

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
      "config": _config_name(),
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


def _config_name() -> str | None:
  try:
    return config_flags.get_config_filename(flags.FLAGS["config"])
  except Exception:  # pylint: disable=broad-except
    return None


def _summary(r: dict) -> str:
  gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"
  pct = lambda x: "n/a (no peak known for this device)" if x is None else f"{100 * x:.1f}%"
  lines = [
      f"config {r['config']}  seq_len {r['seq_len']}  batch {r['batch']}  dtype {r['dtype']}  "
      f"attention {r['attention_impl']}  remat {r['remat']}  micro-batches {r['num_micro']}",
      f"device {r['device']} x{r['num_devices']} ({r['platform']}), jax {r['jax_version']}, "
      f"compile {r['compile_seconds']:.1f} s",
      f"ours:      {r['tokens_per_second']:12.1f} tokens/s  {r['step_seconds'] * 1e3:9.1f} ms/step"
      f"  peak memory {gib(r['peak_memory_bytes'])} ({r['peak_memory_source']})",
      f"MFU {pct(r['mfu'])} (spec formula, {r['flops_per_token'] / 1e9:.4f} GFLOP/token); "
      f"{pct(r['mfu_executed'])} (executed count, {r['flops_per_token_executed'] / 1e9:.4f})"
      + (f"; XLA counts {r['xla_flops_per_token'] / 1e9:.4f} GFLOP/token"
         if r.get("xla_flops_per_token") else ""),
  ]
  if "reference_tokens_per_second" in r:
    lines.append(
        f"reference: {r['reference_tokens_per_second']:12.1f} tokens/s  "
        f"{r['reference_step_seconds'] * 1e3:9.1f} ms/step  ({r['reference_device']}, torch "
        f"{r['torch_version']}, {r['reference_threads']} threads, autocast "
        f"{r['reference_autocast']}, peak "
        f"{gib(r['reference_peak_memory_bytes'])})")
    lines.append(f"speedup (ours / reference): {r['speedup']:.2f}x")
  prof = r.get("profile")
  if prof and "top_ops" in prof:
    lines.append(f"profile ({prof['trace_dir']}): {prof['device_ms_per_step']:.1f} ms of device "
                 "time per step; by part (ms/step):")
    parts = list(prof["by_part_ms_per_step"].items())
    lines.extend(f"  {k:55s} {v:9.2f}" for k, v in parts[:15])
    if len(parts) > 15:
      lines.append(f"  {'(' + str(len(parts) - 15) + ' more parts)':55s} "
                   f"{sum(v for _, v in parts[15:]):9.2f}")
    lines.append("top ops (ms/step, share, op_name):")
    lines.extend(f"  {o['op']:30s} {o['ms_per_step']:9.2f} {100 * o['share']:5.1f}%  "
                 f"{o['op_name'][-90:]}" for o in prof["top_ops"])
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _REFERENCE.value == "torch":
    # Both frameworks share one accelerator: JAX must not grab 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  config = _CONFIG.value
  # As training does: one CPU device per core (a no-op on accelerators). With no --batch the
  # global batch is 8 per device, which any device count divides.
  from deberta_jax.runtime import cpu_devices  # pylint: disable=import-outside-toplevel
  split = config.copy_and_resolve_references()
  split.global_batch_size = (_BATCH.value if _BATCH.value is not None
                             else 8 * cpu_devices.available_cores())
  cpu_devices.apply(split)
  # Imported here so that nothing touches jax before the environment is settled.
  import jax  # pylint: disable=import-outside-toplevel
  from deberta_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from deberta_jax.runtime import sharding  # pylint: disable=import-outside-toplevel

  try:
    devices = jax.devices()
    if config.mesh.get("num_devices", 0):
      devices = devices[: config.mesh.num_devices]
    dp = math.prod(sharding.mesh_shape(config, len(devices))[:2])
    configure(config, _SEQ_LEN.value, _BATCH.value, dp)
    config_lib.validate(config)
    config_lib.check_backend(config, jax.default_backend())
    if config.global_batch_size % dp:
      raise config_lib.ConfigError(f"--batch={config.global_batch_size} is not divisible by the "
                                   f"{dp} data-parallel devices")
  except ValueError as e:  # a mesh that does not fit; ConfigError is handled by cli.run
    raise config_lib.ConfigError(str(e)) from e
  if _STEPS.value < 1 or _WARMUP.value < 0 or _REPEATS.value < 1:
    raise cli.app.UsageError("--steps and --repeats must be >= 1, --warmup >= 0")
  profile_dir = None
  if _PROFILE.value:
    import tempfile  # pylint: disable=import-outside-toplevel
    profile_dir = _PROFILE_DIR.value or tempfile.mkdtemp(prefix="deberta_jax_profile_")
  record = measure(config, _STEPS.value, _WARMUP.value, _REFERENCE.value, _TORCH_COMPILE.value,
                   _REPEATS.value, _TORCH_THREADS.value, profile_dir)
  print(_summary(record), flush=True)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  cli.run(main)

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
import tempfile

from absl import flags
from ml_collections import config_flags

from deberta_jax import cli
from deberta_jax.runtime import cpu_devices

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


def configure(config, seq_len: int | None, batch: int | None, num_devices: int):
  """Applies --seq_len / --batch to the config (global batch; default 8 per device)."""
  if seq_len is not None:
    config.seq_len = int(seq_len)
  config.global_batch_size = int(batch) if batch is not None else 8 * num_devices
  config.dry_run = False
  return config


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
  split = config.copy_and_resolve_references()
  split.global_batch_size = (_BATCH.value if _BATCH.value is not None
                             else 8 * cpu_devices.available_cores())
  cpu_devices.apply(split)
  # Late: these import jax, which must not start before the device split above.
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import step_bench  # pylint: disable=import-outside-toplevel
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
    profile_dir = _PROFILE_DIR.value or tempfile.mkdtemp(prefix="deberta_jax_profile_")
  record = step_bench.measure(config, _STEPS.value, _WARMUP.value, _REFERENCE.value,
                              _TORCH_COMPILE.value, _REPEATS.value, _TORCH_THREADS.value,
                              profile_dir, _config_name())
  print(_summary(record), flush=True)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  cli.run(main)

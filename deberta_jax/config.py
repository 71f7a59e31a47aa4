"""Validation of a run config and the values derived from it, in one place.

Everything that can be checked before a device is touched is checked here, so a wrong setting
fails in the first second with the field named, not hours into a run.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from deberta_jax import errors
from deberta_jax.models.config import ATTENTION_IMPLS, ModelConfig, generator_config

SHARING_MODES = ("gdes", "es", "nes")
UPDATE_MODES = ("auto", "two_stage", "joint")
DATA_SOURCES = ("embedded", "text_files", "jsonl", "parquet", "tfds", "prepared")

# The data fields that only one source reads, with the value that leaves them unset (the
# defaults of configs/common.py; tests/test_reliability.py checks the two agree). Any other
# value under another source is refused: it names a corpus, or a reading of one, that the run
# would silently not use.
# The data fields that only some sources read: setting one for another source is refused, since
# it would be silently ignored.
SOURCE_FIELDS = {
    "embedded": {"embedded_max_bytes": 8_000_000},
    "text_files": {"text_files": "", "split_on_blank_lines": False},
    "jsonl": {"jsonl_files": "", "text_field": "text"},
    "parquet": {"parquet_files": "", "text_field": "text"},
    "tfds": {"tfds_name": "", "tfds_split": "train", "tfds_text_feature": "text",
             "tfds_data_dir": ""},
    "prepared": {"prepared_dir": ""},
}

FLOAT16_REFUSED = (
    "'float16' is refused: its 5 exponent bits flush gradients below 6e-8 to zero and overflow "
    "above 65504, so it needs dynamic loss scaling, which this trainer does not do; 'bfloat16' "
    "has float32's range and needs none (use it on GPU and TPU), or 'float32'")


class ConfigError(errors.BadInput):
  """A config value that cannot work; the message names the field."""


def _require(condition: bool, field: str, message: str):
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def check_backend(config: ml_collections.ConfigDict, backend: str) -> None:
  """Settings that depend on the accelerator: called once jax knows its backend."""
  if config.model.attention_impl == "flash" and backend not in ("gpu", "cuda", "rocm", "tpu",
                                                                  "cpu"):
    raise ConfigError(
        f"config.model.attention_impl: 'flash' has Pallas kernels for GPU (Triton) and TPU "
        f"(Mosaic), and runs them interpreted on CPU; this backend is {backend!r}: use 'skew'")
  head = config.model.hidden_size // config.model.num_heads
  if (config.model.attention_impl == "flash" and backend in ("gpu", "cuda", "rocm")
      and (head < 16 or head & (head - 1))):
    raise ConfigError(
        f"config.model.attention_impl: the 'flash' GPU kernels need a power-of-two head size "
        f">= 16; hidden_size / num_heads = {head}: use 'skew'")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that cannot work."""
  _require(config.num_train_steps > 0, "num_train_steps", "must be positive")
  _require(config.global_batch_size > 0, "global_batch_size", "must be positive")
  _require(3 <= config.seq_len <= config.model.max_position_embeddings, "seq_len",
           f"must be in [3, model.max_position_embeddings={config.model.max_position_embeddings}]")
  m = config.model
  _require(m.hidden_size > 0 and m.num_heads > 0, "model.num_heads", "must be positive")
  _require(m.hidden_size % m.num_heads == 0, "model.num_heads",
           f"{m.num_heads} does not divide model.hidden_size={m.hidden_size}")
  _require(m.num_layers >= 1, "model.num_layers", "must be at least 1")
  _require(m.generator_num_layers >= 0, "model.generator_num_layers", "must be >= 0 (0 = half)")
  _require(m.vocab_size > 5, "model.vocab_size", "must hold the special tokens")
  _require(m.embedding_sharing in SHARING_MODES, "model.embedding_sharing",
           f"{m.embedding_sharing!r} is not one of {SHARING_MODES}")
  _require(m.dtype != "float16", "model.dtype", FLOAT16_REFUSED)
  _require(m.dtype in ("float32", "bfloat16"), "model.dtype",
           f"{m.dtype!r} is not float32 or bfloat16")
  _require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
           f"{m.attention_impl!r} is not one of {ATTENTION_IMPLS}")
  block = m.get("flash_block", 64)
  _require(isinstance(block, int) and block >= 16 and not block & (block - 1), "model.flash_block",
           f"{block!r} is not a power of two >= 16")
  _require(m.remat in ("none", "full", "dots"), "model.remat", f"{m.remat!r} is not none|full|dots")
  _require(isinstance(m.get("scan_layers", False), bool), "model.scan_layers",
           "must be True or False")
  _require(0 < config.rtd.mask_prob < 1, "rtd.mask_prob", "must be in (0, 1)")
  _require(config.rtd.temperature > 0, "rtd.temperature", "must be positive")
  _require(config.rtd.rtd_lambda >= 0, "rtd.rtd_lambda", "must be >= 0")
  _require(config.rtd.update_mode in UPDATE_MODES, "rtd.update_mode",
           f"{config.rtd.update_mode!r} is not one of {UPDATE_MODES}")
  _require(not (m.embedding_sharing == "es" and config.rtd.update_mode == "two_stage"),
           "rtd.update_mode",
           "'two_stage' with embedding_sharing='es' would discard the RTD gradient on the shared "
           "embedding; ES is defined with the joint loss")
  o = config.optim
  _require(o.learning_rate > 0, "optim.learning_rate", "must be positive")
  _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  _require(not (o.discriminator_learning_rate > 0 and not two_stage(config)),
           "optim.discriminator_learning_rate",
           f"is set ({o.discriminator_learning_rate}), but the joint update "
           f"(rtd.update_mode={config.rtd.update_mode!r}, model.embedding_sharing="
           f"{m.embedding_sharing!r}) has one optimizer for both networks, at "
           f"optim.learning_rate; leave it at -1 or use a two-stage mode")
  _require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optim.b1", "betas must be in [0, 1)")
  _require(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")
  _require(config.data.source in DATA_SOURCES, "data.source",
           f"{config.data.source!r} is not one of {DATA_SOURCES}")
  readers: dict[str, list[str]] = {}
  for source, fields in SOURCE_FIELDS.items():
    for field, unset in fields.items():
      readers.setdefault(field, []).append(source)
  for field, sources in readers.items():
    unset = SOURCE_FIELDS[sources[0]][field]
    value = config.data.get(field, unset)
    _require(config.data.source in sources or value == unset, f"data.{field}",
             f"is set ({value!r}) but config.data.source={config.data.source!r} does not read "
             f"it; only source={' or '.join(map(repr, sources))} does "
             f"(--config.data.source={sources[0]})")
  _require(config.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0 = off)")
  _require(config.eval.num_batches >= 0, "eval.num_batches",
           "must be >= 0 (0 = every whole batch of the held-out rows)")
  _require(config.eval.batch_size >= 0, "eval.batch_size", "must be >= 0 (0 = global batch)")
  _require(config.eval.min_effective_rank >= 0, "eval.min_effective_rank",
           "must be >= 0 (0 = no warning)")
  _require(0 <= config.eval.holdout_fraction < 0.5, "eval.holdout_fraction",
           "must be in [0, 0.5)")
  _require(config.data.part_mb > 0, "data.part_mb", "must be > 0")
  _require(config.data.read_threads >= 1, "data.read_threads", "must be >= 1")
  _require(config.data.prefetch_batches >= 1, "data.prefetch_batches", "must be >= 1")
  _require(config.data.get("read_block_rows", 64) >= 1, "data.read_block_rows",
           "must be >= 1 (1 = one request per row)")
  _require(config.data.get("shuffle_window_blocks", 16) >= 1, "data.shuffle_window_blocks",
           "must be >= 1")
  _require(config.data.get("read_connections", 100) >= 1, "data.read_connections",
           "must be >= 1")
  _require(config.data.get("read_retry_minutes", 10.0) >= 0, "data.read_retry_minutes",
           "must be >= 0 (0 = only the client's own retries)")
  _require(config.data.get("prepare_wait_minutes", 60.0) > 0, "data.prepare_wait_minutes",
           "must be > 0")
  _require(config.ckpt.every_steps > 0, "ckpt.every_steps", "must be positive")
  _require(config.ckpt.keep > 0, "ckpt.keep", "must be positive")
  _require(config.ckpt.every_minutes >= 0, "ckpt.every_minutes", "must be >= 0 (0 = off)")
  _require(config.nonfinite in ("stop", "skip"), "nonfinite",
           f"{config.nonfinite!r} is not 'stop' or 'skip'")
  _require(config.nonfinite_max_skips >= 0, "nonfinite_max_skips", "must be >= 0")
  _require(config.log.every_steps > 0, "log.every_steps", "must be positive")
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    _require(size == -1 or size >= 1, f"mesh.{axis}", "must be >= 1 or -1 (the rest)")
  _require(config.mesh.num_devices >= 0, "mesh.num_devices", "must be >= 0 (0 = all)")
  _require(config.mesh.cpu_devices >= 0, "mesh.cpu_devices", "must be >= 0 (0 = one per core)")
  _require(config.mesh.per_device_microbatch >= 0, "mesh.per_device_microbatch", "must be >= 0")
  _require(config.mesh.device_memory_gb >= 0, "mesh.device_memory_gb", "must be >= 0 (0 = auto)")
  _require(config.dry_run_devices >= 0, "dry_run_devices", "must be >= 0")
  _require(config.dry_run or not config.dry_run_devices, "dry_run_devices",
           f"is set ({config.dry_run_devices}) but config.dry_run is False; it only simulates "
           f"devices for a dry run (--config.dry_run=True)")
  _require(isinstance(config.get("compilation_cache_dir", "auto"), str), "compilation_cache_dir",
           "must be a path, 'auto' or '' (off)")
  try:
    discriminator_config(config)
    generator_config(config.model)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from e


def check_eval_batch(config: ml_collections.ConfigDict, data_parallel: int,
                     process_count: int) -> None:
  """The held-out batch is split like a training batch: into equal shares per data-parallel
  device and per process. Checked once the mesh is known and before anything compiles, since a
  misfit batch would otherwise fail after the step's compilation or drop held-out rows."""
  if not int(config.eval.every_steps):
    return
  size = int(config.eval.batch_size) or int(config.global_batch_size)
  given = "" if int(config.eval.batch_size) else " (0: the global batch)"
  for parts, what in ((data_parallel, "data-parallel devices (mesh.data * mesh.fsdp)"),
                      (process_count, "processes")):
    _require(size % parts == 0, "eval.batch_size",
             f"{size}{given} is not divisible by the {parts} {what}")


def warnings(config: ml_collections.ConfigDict) -> list[str]:
  """Legitimate but unusual settings, one line each, for the run's log."""
  notes = []
  o = config.optim
  if o.warmup_steps > config.num_train_steps:
    notes.append(
        f"config.optim.warmup_steps={o.warmup_steps} exceeds num_train_steps="
        f"{config.num_train_steps}: the learning rate rises for the whole run and ends at "
        f"{config.num_train_steps / o.warmup_steps:.0%} of its peak")
  if config.model.attention_impl != "flash" and config.model.get("flash_block", 64) != 64:
    notes.append(f"config.model.flash_block={config.model.flash_block} is read only by "
                 f"attention_impl='flash', not {config.model.attention_impl!r}")
  if config.nonfinite == "stop" and config.nonfinite_max_skips != 20:
    notes.append("config.nonfinite_max_skips is read only with nonfinite='skip'")
  if config.mesh.per_device_microbatch and config.mesh.device_memory_gb:
    notes.append("config.mesh.device_memory_gb is read only when per_device_microbatch=0 "
                 "(the automatic micro-batch); the micro-batch is fixed at "
                 f"{config.mesh.per_device_microbatch}")
  return notes


def discriminator_config(config) -> ModelConfig:
  return ModelConfig.from_config(config.model)


def two_stage(config) -> bool:
  """Whether a step updates the generator and then the discriminator (paper Fig. 1b/1c)."""
  if config.rtd.update_mode == "auto":
    return config.model.embedding_sharing != "es"
  return config.rtd.update_mode == "two_stage"


def model_fingerprint(config) -> dict:
  """The shape-defining part of a run: a workdir trained with another one must not be reused."""
  disc = dataclasses.asdict(discriminator_config(config))
  gen = dataclasses.asdict(generator_config(config.model))
  keep = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
          "max_position_embeddings", "position_buckets", "vocab_pad_multiple")
  return {
      "discriminator": {k: disc[k] for k in keep},
      "generator_num_layers": gen["num_layers"],
      "embedding_sharing": config.model.embedding_sharing,
      "two_stage": two_stage(config),
  }


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)

"""The pre-training loop, top to bottom: config -> mesh -> data -> state -> compile -> loop.

Restarting the same command resumes from the newest checkpoint in `workdir` (params, optimizer
states, step, RNG, data position) and continues the trajectory of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax.linen import meta as flax_meta
import flax.linen as nn

from deberta_jax import checkpointing
from deberta_jax import config_lib
from deberta_jax import metrics as metrics_lib
from deberta_jax import optim
from deberta_jax import sharding
from deberta_jax import train_step as ts
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.rtd import RTDModel

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
SPM_FILE = "spm.model"


class NonFiniteError(RuntimeError):
  """A loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


class WorkdirError(ValueError):
  """The work directory cannot be used for this run."""


def check_workdir(config, workdir: str) -> None:
  """Refuses a workdir that holds a run of a different model shape; never overwrites it."""
  fingerprint = config_lib.model_fingerprint(config)
  path = os.path.join(workdir, RUN_FILE)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f).get("fingerprint")
    if previous != fingerprint:
      raise WorkdirError(
          f"{workdir} holds a run with a different model ({previous}); this config has "
          f"{fingerprint}. Use another --workdir.")
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise WorkdirError(f"{workdir} is not writable")


def microbatches(config, mesh) -> int:
  """How many micro-batches the global batch is accumulated from."""
  dp = sharding.data_parallel_size(mesh)
  if config.global_batch_size % dp:
    raise config_lib.ConfigError(
        f"config.global_batch_size: {config.global_batch_size} is not divisible by the "
        f"{dp} data-parallel devices (mesh.data * mesh.fsdp)")
  per_device = config.global_batch_size // dp
  micro = config.mesh.per_device_microbatch or per_device
  if per_device % micro:
    raise config_lib.ConfigError(
        f"config.mesh.per_device_microbatch: {micro} does not divide the per-device batch "
        f"{per_device}")
  return per_device // micro


def state_shardings(model, optimizers, config, mesh):
  """Shardings of the train state from its shapes alone (jax.eval_shape: nothing is allocated)."""
  init = lambda key: ts.init_state(model, optimizers, config, key)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    return sharding.logical_to_sharding(abstract, mesh)


def create_state(model, optimizers, config, mesh):
  """(state, shardings): parameters and optimizer states created already sharded, never
  gathered on one host: init runs under jit with the target out_shardings."""
  shardings = state_shardings(model, optimizers, config, mesh)
  init = lambda key: flax_meta.unbox(ts.init_state(model, optimizers, config, key))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
  return state, shardings


def abstract_state(model, optimizers, config, mesh):
  """ShapeDtypeStructs with shardings: the restore target for orbax."""
  shardings = state_shardings(model, optimizers, config, mesh)
  init = lambda key: flax_meta.unbox(ts.init_state(model, optimizers, config, key))
  shapes = jax.eval_shape(init, jax.random.key(config.seed))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, shardings)


def abstract_of(state):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def run(config, workdir: str) -> dict:
  """Trains until config.num_train_steps; returns the last logged metrics."""
  # --- 1. Config and workdir: everything checkable is checked before any compute.
  config_lib.validate(config)
  check_workdir(config, workdir)
  mesh = sharding.make_mesh(config)
  num_micro = microbatches(config, mesh)
  is_chief = jax.process_index() == 0

  # --- 2. Data.
  pipeline = pipeline_lib.make_pipeline(config, jax.process_index(), jax.process_count())
  tok = pipeline.tokenizer
  tokens = ts.SpecialTokens(tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id, tok.mask_id)
  if is_chief:
    _write_run_files(config, workdir, tok)

  # --- 3. Model, optimizers and state (restored when the workdir has a checkpoint).
  model = RTDModel(config)
  optimizers = ts.make_optimizers(config)
  state, state_shardings = create_state(model, optimizers, config, mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every_steps=config.ckpt.every_steps, keep=config.ckpt.keep,
                                    async_save=config.ckpt.async_save)
  if ckpt.latest_step() is not None:
    step, state, meta = ckpt.restore(abstract_of(state))
    pipeline.restore(meta["data"])
    logging.info("Resumed from step %d (%s)", step, ckpt.step_path(step))
  start_step = int(state.step)

  # --- 4. The compiled step.
  batch_sharding = sharding.batch_sharding(mesh)
  metric_sharding = sharding.replicated(mesh)
  step_fn = ts.make_train_step(model, optimizers, config, tokens, num_micro)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, metric_sharding), donate_argnums=0)

  # --- 5. The loop.
  writer = metrics_lib.MetricWriter(workdir, config.num_train_steps, enabled=is_chief)
  schedules = _schedules(config)
  tokens_per_step = config.global_batch_size * config.seq_len
  last = stop_at = config.num_train_steps
  if config.stop_after_steps:
    stop_at = min(stop_at, start_step + config.stop_after_steps)
  sums, count, timer = None, 0, None
  last_logged = {}
  try:
    for step in range(start_step + 1, stop_at + 1):
      batch = _global_batch(pipeline.next_batch(), batch_sharding)
      with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, step_metrics = train_step(state, batch)
      sums = step_metrics if sums is None else jax.tree.map(jnp.add, sums, step_metrics)
      count += 1
      if timer is None:  # the first step includes compilation: time from its end
        jax.block_until_ready(state.step)
        timer, timed_from = time.time(), step
      log_now = step % config.log.every_steps == 0 or step == stop_at
      save_now = step % config.ckpt.every_steps == 0 or step == stop_at
      if log_now or save_now:
        scalars = {k: float(v) / count for k, v in jax.device_get(sums).items()}
        _check_finite(scalars, step, count)
        if log_now:
          elapsed = time.time() - timer
          scalars["learning_rate"] = float(schedules[0](step - 1))
          if step > timed_from:
            scalars["tokens_per_second"] = tokens_per_step * (step - timed_from) / elapsed
          writer.write(step, scalars)
          last_logged = scalars
          sums, count = None, 0
          timer, timed_from = time.time(), step
      if save_now:
        ckpt.save(step, state, {"data": pipeline.state(), "step": step,
                                "fingerprint": config_lib.model_fingerprint(config)},
                  force=step == stop_at)
  finally:
    ckpt.close()
    writer.close()
  logging.info("Finished at step %d of %d", stop_at, last)
  return last_logged


def _check_finite(scalars: dict, step: int, count: int) -> None:
  bad = [k for k in ("mlm_loss", "rtd_loss", "generator_grad_norm", "discriminator_grad_norm")
         if not np.isfinite(scalars.get(k, 0.0))]
  if bad:
    first = step - count + 1
    where = f"step {step}" if count == 1 else f"steps {first}-{step}"
    raise NonFiniteError(f"non-finite {', '.join(bad)} at {where}; the run is stopped and the "
                         "last checkpoint before it is kept")


def _schedules(config):
  gen_lr, disc_lr = optim.peak_learning_rates(config)
  return [optim.learning_rate_schedule(lr, config.optim.warmup_steps, config.num_train_steps,
                                       config.optim.end_learning_rate) for lr in (gen_lr, disc_lr)]


def _global_batch(local: dict, batch_sharding) -> dict:
  """Host-local numpy rows -> one global jax.Array per field (each host passes only its rows)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in local.items()}


def _write_run_files(config, workdir: str, tokenizer) -> None:
  """config.json (provenance), run.json (model fingerprint) and the spm model used."""
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config_lib.to_json(config))
  run_path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(run_path):
    with open(run_path, "w") as f:
      json.dump({"fingerprint": config_lib.model_fingerprint(config)}, f, indent=2)
  spm_path = os.path.join(workdir, SPM_FILE)
  if tokenizer.model_path and os.path.abspath(tokenizer.model_path) != os.path.abspath(spm_path):
    shutil.copyfile(tokenizer.model_path, spm_path)

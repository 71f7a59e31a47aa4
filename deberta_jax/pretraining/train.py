"""The pre-training loop, top to bottom: config -> mesh -> data -> state -> compile -> loop.

Restarting the same command resumes from the newest checkpoint in `workdir` (params, optimizer
states, step, RNG, data position) and continues the trajectory of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import time

from absl import logging
from flax.linen import meta as flax_meta
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deberta_jax import config as config_lib
from deberta_jax import errors
from deberta_jax import workdir as workdir_lib
from deberta_jax.data import DataError
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import evaluation
from deberta_jax.pretraining import init_from
from deberta_jax.pretraining import optim
from deberta_jax.pretraining import planning
from deberta_jax.pretraining import samples
from deberta_jax.pretraining import train_step as ts
from deberta_jax.runtime import checkpointing
from deberta_jax.runtime import dispatch
from deberta_jax.runtime import distributed
from deberta_jax.runtime import metrics as metrics_lib
from deberta_jax.runtime import preemption
from deberta_jax.runtime import sharding


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
  key = jax.random.key(config.seed)  # a concrete key, made outside the mesh (which may be
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):  # compile-only)
    abstract = jax.eval_shape(init, key)
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


def make_evaluator(model, config, tokens, pipeline, state_shardings, batch_sharding,
                   per_device_microbatch: int):
  """The held-out evaluation (evaluation.py), or None when config.eval.every_steps is 0. It runs
  at most the training step's micro-batch per device at a time, which is known to fit."""
  if not int(config.eval.every_steps):
    return None
  return evaluation.Evaluator(model, config, tokens, pipeline, state_shardings.params,
                              batch_sharding, lambda b: _global_batch(b, batch_sharding),
                              per_device_microbatch=per_device_microbatch)


def check_hosts_read_one_dataset(fingerprint: str) -> None:
  """Every process must index the same rows: if one host's dataset differs by a single row, the
  global permutations differ and some rows are read by two hosts, others by none. Refused before
  step 1, naming each process's fingerprint."""
  seen = distributed.values_per_process(fingerprint)
  if len(set(seen)) > 1:
    listing = ", ".join(f"process {i}: {f}" for i, f in enumerate(seen))
    raise DataError(f"The processes of this run read different datasets ({listing}); each host "
                    f"must see the same corpus, spm model and seq_len (prepare once with "
                    f"`python -m deberta_jax.prepare` and train on source='prepared').")


def run(config, workdir: str) -> dict:
  """Trains until config.num_train_steps; returns the last logged metrics.

  Raises Preempted after checkpointing the current step when SIGTERM arrives, NonFiniteError
  when a loss or gradient is not finite, and ConfigError/DataError/WorkdirError/CheckpointError
  before any compute for bad input (nothing is written to the workdir then).
  """
  # --- 1. Everything checkable is checked before any compute, and before the workdir is touched.
  config_lib.validate(config)
  config_lib.check_backend(config, jax.default_backend())
  for note in config_lib.warnings(config):
    logging.warning("%s", note)
  if config.dry_run:
    return dry_run(config)
  workdir_lib.check(config, workdir)
  mesh = sharding.make_mesh(config)
  microbatches(config, mesh)
  config_lib.check_eval_batch(config, sharding.data_parallel_size(mesh), jax.process_count())
  is_chief = jax.process_index() == 0

  # SIGTERM before the first step (preparing data, restoring, compiling) exits 4 when the
  # phase ends. If setting up fails or is stopped, the checkpointer is closed (its threads ended).
  with preemption.SetupStop() as setup_stop, contextlib.ExitStack() as close_on_error:
    # --- 2. Data (validates the corpus and the vocabulary against the tokenizer).
    pipeline = pipeline_lib.make_pipeline(config, jax.process_index(), jax.process_count())
    check_hosts_read_one_dataset(pipeline.fingerprint)
    tok = pipeline.tokenizer
    tokens = ts.SpecialTokens.of(tok)
    setup_stop.check("data preparation")

    # --- 3. Model, optimizers and state (restored when the workdir has a checkpoint).
    model = RTDModel.from_config(config)
    optimizers = ts.make_optimizers(config)
    state, state_shardings = create_state(model, optimizers, config, mesh)
    checkpoints = os.path.join(workdir, "checkpoints")
    resuming = bool(checkpointing.committed_steps(checkpoints))
    if not resuming and (config.init.generator or config.init.discriminator):
      # Before the checkpointer exists: a refused release leaves a new workdir as it was.
      params, notes = init_from.initial_params(config, model, init_from.host_copy(state.params))
      state = state.replace(params=init_from.place(params, state_shardings.params))
      init_from.log_notes(notes)
    ckpt = checkpointing.Checkpointer(
        checkpoints, every_steps=config.ckpt.every_steps, keep=config.ckpt.keep,
        async_save=config.ckpt.async_save,
        is_permanent=lambda s: s % config.ckpt.every_steps == 0 or s == config.num_train_steps)
    close_on_error.callback(ckpt.close)
    if resuming:
      step, state, meta = ckpt.restore(abstract_of(state))
      pipeline.restore(meta["data"])
      logging.info("Resumed from step %d (%s)", step, ckpt.step_path(step))
    if is_chief:  # after the resume checks: a refused resume leaves the workdir as it was
      workdir_lib.write_run_files(config, workdir, tok)
    start_step = int(state.step)
    setup_stop.check("restore")

    # --- 4. The jitted step (train_step.py: mask, generator update, sample, discriminator
    # update), compiled for the micro-batch count that fits the per-device memory (planning.py).
    batch_sharding = sharding.batch_sharding(mesh)
    jit_for = lambda num_micro: jit_step(model, optimizers, config, tokens, mesh, state_shardings,
                                         num_micro)
    plan = compile_for_memory(jit_for, config, mesh, state)
    train_step = plan.compiled
    setup_stop.check("compilation")
    close_on_error.pop_all()

  # --- 5. The loop. Metrics stay on the device between log steps; every step ends by asking
  # whether SIGTERM arrived, which costs nothing on one host and a coordination-service query
  # on several.
  writer = metrics_lib.MetricWriter(workdir, config.num_train_steps, enabled=is_chief,
                                    start_step=start_step)
  stop = preemption.StopChecker(ckpt)
  timed = preemption.TimedCheckpoints(config.ckpt.every_minutes)
  health = StepHealth(config, start_step)
  schedules = _schedules(config)
  tokens_per_step = config.global_batch_size * config.seq_len
  stop_at = config.num_train_steps
  if config.stop_after_steps:
    stop_at = min(stop_at, start_step + config.stop_after_steps)
  sums, timer, timed_from, preempted = None, None, start_step, False
  in_flight = dispatch.StepsInFlight(ahead=1)
  last_logged = {}
  evaluate = make_evaluator(model, config, tokens, pipeline, state_shardings, batch_sharding,
                            plan.per_device_microbatch)
  eval_every = int(config.eval.every_steps)
  if evaluate is not None and start_step > 0:  # a dip in the features that spans the restart
    evaluate.collapse_watch.resume(metrics_lib.logged_records(workdir), start_step)
  if evaluate is not None and start_step == 0:  # where a run (or a released model) starts from
    writer.write(0, evaluate(state.params, 0))

  def save(step, force):
    meta = {"data": pipeline.state(), "step": step,
            "fingerprint": config_lib.model_fingerprint(config)}
    if ckpt.save(step, state, meta, force=force):
      timed.saved()

  try:
    for step in range(start_step + 1, stop_at + 1):
      batch = _global_batch(pipeline.next_batch(), batch_sharding)
      state, step_metrics = train_step(state, batch)
      sums = step_metrics if sums is None else _accumulate(sums, step_metrics)
      in_flight.dispatched(step_metrics)  # step - 1 has finished: the queue stays one step deep
      if timer is None:  # the first step includes compilation: time from its end
        jax.block_until_ready(state.step)
        timer, timed_from = time.time(), step
      preempted = stop.should_stop(step)
      log_now = step % config.log.every_steps == 0 or step == stop_at
      eval_now = evaluate is not None and (step % eval_every == 0 or step == stop_at)
      periodic = step % config.ckpt.every_steps == 0 or step == stop_at
      timed_now = log_now and timed.due()
      if not (log_now or eval_now or periodic or preempted or timed_now):
        continue
      # Nothing is saved or logged past a non-finite step: this raises first ('stop' mode).
      health.add(jax.device_get(sums), step)
      sums = None
      if log_now:
        scalars = health.means()
        scalars["learning_rate"] = float(schedules[0](step - 1))
        if step > timed_from:
          scalars["tokens_per_second"] = tokens_per_step * (step - timed_from) / (
              time.time() - timer)
        if eval_now:
          scalars.update(evaluate(state.params, step))
        writer.write(step, scalars)
        last_logged = scalars
        health.reset()
        timer, timed_from = time.time(), step
      elif eval_now:
        eval_start = time.time()
        writer.write(step, evaluate(state.params, step))
        timer += time.time() - eval_start  # tokens/s counts training time only
      if periodic or preempted or timed_now:
        save(step, force=step == stop_at or preempted or timed_now)
      if preempted:
        break
  finally:
    stop.close()
    writer.close()
    ckpt.close()  # waits for the last write; a failed write raises CheckpointWriteError here
  if preempted:
    raise errors.Preempted(f"stopped by SIGTERM after step {step}; checkpoint {step} is saved in "
                    f"{ckpt.step_path(step)}. Rerun the same command to resume.")
  logging.info("Finished at step %d of %d", stop_at, config.num_train_steps)
  if evaluate is not None and is_chief and jax.process_count() == 1:
    samples.log_samples(model, state.params, tok,  # never fails the finished run
                        lambda: pipeline.holdout_batch(0, pipeline_lib.eval_batch_size(config)),
                        config, config.seed)
  return last_logged


class StepHealth:
  """Host-side running sums of the step metrics since the last log, and the non-finite policy.

  'stop': the first step whose loss or gradient norm is not finite raises NonFiniteError naming
  it. 'skip': such steps were not applied (train_step dropped the update); they are counted, left
  out of the averages, and the run stops once more than config.nonfinite_max_skips were skipped.
  """

  def __init__(self, config, start_step: int):
    self._last_step = start_step
    self.policy = config.nonfinite
    self.max_skips = config.nonfinite_max_skips
    self.total_skipped = 0
    self.reset()

  def reset(self):
    self._sums, self._steps, self._skipped = {}, 0, 0

  def add(self, fetched: dict, step: int) -> None:
    fetched = dict(fetched)
    first_bad = float(fetched.pop("first_nonfinite_step"))
    skipped = int(round(float(fetched.pop("skipped"))))
    steps, self._last_step = step - self._last_step, step
    if skipped and self.policy == "stop":
      raise errors.NonFiniteError(
          f"non-finite loss or gradient norm at step {int(first_bad)}; the run is stopped and "
          "the last checkpoint before it is kept (set --config.nonfinite=skip to drop such "
          "steps instead)")
    self.total_skipped += skipped
    if self.total_skipped > self.max_skips:
      raise errors.NonFiniteError(
          f"{self.total_skipped} steps had a non-finite loss or gradient norm (the latest at "
          f"step {int(first_bad)}), more than config.nonfinite_max_skips={self.max_skips}; the "
          "run is stopped and the last checkpoint is kept")
    if skipped:
      logging.warning("Skipped %d non-finite step(s) up to step %d (%d in this run)", skipped,
                      step, self.total_skipped)
    for k, v in fetched.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(v)
    self._steps += steps
    self._skipped += skipped

  def means(self) -> dict:
    applied = self._steps - self._skipped
    # An interval whose every step was skipped has no losses to report (not zeros).
    out = {k: v / applied for k, v in self._sums.items()} if applied > 0 else {}
    if self.policy == "skip":
      out["skipped_steps"] = float(self.total_skipped)
    return out


@jax.jit  # one program per step, not one per metric
def _accumulate(sums: dict, step_metrics: dict) -> dict:
  return {k: (jnp.minimum if k == "first_nonfinite_step" else jnp.add)(sums[k], v)
          for k, v in step_metrics.items()}


def jit_step(model, optimizers, config, tokens, mesh, state_shardings, num_micro: int):
  """The training step under jit: the state and the batch come in sharded over the mesh, the
  state goes out with the same shardings (donated, so updated in place) and the metrics
  replicated."""
  step_fn = ts.make_train_step(model, optimizers, config, tokens, num_micro)
  return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def compile_for_memory(jit_for, config, mesh, state):
  """The step's plan, compiled ahead of time (planning.plan_step). With a memory budget
  (config.mesh.device_memory_gb, or what an accelerator reports) and no explicit micro-batch,
  it is compiled for the largest micro-batch that fits; a run that cannot fit is refused."""
  budget = planning.memory_budget(config)
  start = time.perf_counter()
  plan, tried = planning.plan_step(jit_for, config, mesh, abstract_of(state), budget)
  if budget is not None:
    if config.mesh.per_device_microbatch:  # the user's explicit choice: warn, do not refuse
      if plan.memory.total > budget:
        logging.warning("The step needs %.2f GiB per device, more than the %.2f GiB budget",
                        plan.memory.total / planning.GiB, budget / planning.GiB)
    else:
      planning.check_fits(plan, budget)
    logging.info("Micro-batching %d x %d sequences per device: %.2f GiB of a %.2f GiB budget "
                 "(%d compilations)", plan.num_micro, plan.per_device_microbatch,
                 plan.memory.total / planning.GiB, budget / planning.GiB, len(tried))
  logging.info("Training step compiled in %.1f s", time.perf_counter() - start)
  return plan


def dry_run(config) -> dict:
  """Compiles the step for the configured mesh without allocating state or reading data, prints
  per-device memory and FLOPs, and returns them. Writes nothing (the workdir is not touched)."""
  mesh = sharding.make_mesh(config)
  microbatches(config, mesh)
  model = RTDModel.from_config(config)
  optimizers = ts.make_optimizers(config)
  abstract = abstract_state(model, optimizers, config, mesh)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  # Token ids only steer masking; any distinct ids give the same program.
  tokens = ts.SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=4)
  budget = planning.memory_budget(config)
  jit_for = lambda num_micro: jit_step(model, optimizers, config, tokens, mesh, shardings,
                                       num_micro)
  plan, tried = planning.plan_step(jit_for, config, mesh, abstract, budget)
  flops_per_token = planning.analytic_flops_per_token(config)
  print(planning.format_report(config, mesh, plan, tried, budget, flops_per_token), flush=True)
  m = plan.memory
  return {"mesh": dict(mesh.shape), "num_devices": int(mesh.size),
          "per_device_microbatch": plan.per_device_microbatch, "num_micro": plan.num_micro,
          "params_bytes": m.params, "optimizer_bytes": m.optimizer, "batch_bytes": m.batch,
          "temporaries_bytes": m.temporaries, "total_bytes": m.total,
          "budget_bytes": budget, "fits": budget is None or m.total <= budget,
          "xla_flops_per_device": (plan.flops_per_device * plan.num_micro
                                   if plan.flops_per_device is not None else None),
          "analytic_flops_per_step": (flops_per_token * config.global_batch_size * config.seq_len
                                      if flops_per_token else None)}


def _schedules(config):
  gen_lr, disc_lr = optim.peak_learning_rates(config)
  return [optim.learning_rate_schedule(lr, config.optim.warmup_steps, config.num_train_steps,
                                       config.optim.end_learning_rate) for lr in (gen_lr, disc_lr)]


def _global_batch(local: dict, batch_sharding) -> dict:
  """Host-local numpy rows -> one global jax.Array per field (each host passes only its rows)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
          for k, v in local.items()}

"""GLUE fine-tuning: `python -m deberta_jax.finetune --config=configs/finetune.py
--config.task=sst2 --config.init=DIR --config.glue_dir=GLUE --workdir=OUT`.

DIR is a pre-training workdir (its discriminator is fine-tuned: under GDES with the materialised
embedding E_G + E_delta, exactly what `export` writes; tokens from its spm.model) or a Hugging Face
DebertaV2 directory (`hf.load_pretrained`; its spm.model). The model is the backbone plus the
reference's context pooler and a classifier or regression head (models/classifier.py), trained with
AdamW, linear warmup and decay (configs/finetune.py: the paper's Table 11), with the batch split
over the mesh's data axes exactly like pre-training. The dev set is scored after every epoch.

Writes OUT/metrics.jsonl (training scalars every `log_every_steps`, dev scores every epoch),
OUT/results.json (the config, every epoch's dev scores and the best epoch; rewritten after each
evaluation) and, with `export_best`, OUT/best_model (a HF DebertaV2ForSequenceClassification),
from process 0 only; with parameters sharded over several processes the best model is gathered
from all of them. DIR and OUT may be local or gs:// (the GLUE files are read locally).
Bad input (unknown task, missing files, an init directory that is neither format) exits with code
2 and a one-line message; a non-finite loss with code 3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import flags
from absl import logging
from flax.linen import meta
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from deberta_jax import cli
from deberta_jax import errors
from deberta_jax import hf
from deberta_jax import workdir as workdir_lib
from deberta_jax.config import FLOAT16_REFUSED
from deberta_jax.data import storage
from deberta_jax.data.spm import Tokenizer
from deberta_jax.finetune import glue
from deberta_jax.finetune import glue_metrics
from deberta_jax.models import classifier as classifier_lib
from deberta_jax.models.config import ATTENTION_IMPLS
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import init_from
from deberta_jax.pretraining import optim
from deberta_jax.pretraining import train_step as pretrain_step
from deberta_jax.runtime import dispatch
from deberta_jax.runtime import distributed
from deberta_jax.runtime import sharding

_FLAGS = {}


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program: importing this module (the study
  driver, tests) must not claim flag names such as --workdir."""
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", None, "Path to the fine-tuning config (configs/finetune.py).", lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None,
                                          "Output directory of this fine-tuning run.")
  flags.mark_flags_as_required(["config", "workdir"])

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


class FinetuneError(errors.BadInput):
  """Bad fine-tuning input: the message names the config field or path."""


@dataclasses.dataclass
class Init:
  """The pre-trained backbone to start from."""

  kind: str                 # 'pretraining_workdir' | 'hf'
  path: str
  model_config: Any         # ModelConfig
  params: dict              # backbone tree (numpy): embeddings, encoder[, heads]
  spm_model: str
  step: int | None = None   # checkpoint step of a pre-training workdir
  embedding_sharing: str | None = None


# ----------------------------------------------------------------------------------- validation

def validate(config) -> None:

  def require(ok, field, message):
    if not ok:
      raise FinetuneError(f"config.{field}: {message}")
  require(bool(config.init), "init", "is empty; set it to a pre-training workdir or a Hugging "
          "Face DebertaV2 directory")
  require(config.max_seq_length >= 8, "max_seq_length", "must be at least 8")
  require(config.batch_size > 0, "batch_size", "must be positive")
  require(config.eval_batch_size > 0, "eval_batch_size", "must be positive")
  require(config.num_epochs > 0, "num_epochs", "must be positive")
  require(config.learning_rate > 0, "learning_rate", "must be positive")
  require(0 <= config.warmup_proportion < 1, "warmup_proportion", "must be in [0, 1)")
  require(config.warmup_steps >= 0, "warmup_steps", "must be >= 0")
  require(0 <= config.cls_dropout < 1, "cls_dropout", "must be in [0, 1)")
  require(0 <= config.pooler_dropout < 1, "pooler_dropout", "must be in [0, 1)")
  require(config.pooling in classifier_lib.POOLINGS, "pooling",
          f"{config.pooling!r} is not one of {classifier_lib.POOLINGS}")
  require(not (config.pooling != "cls" and config.export_best), "pooling",
          f"{config.pooling!r} has no counterpart in transformers' "
          "DebertaV2ForSequenceClassification (it pools [CLS]); set config.export_best=False")
  require(config.reinit_top_layers >= 0, "reinit_top_layers", "must be >= 0")
  require(0 < config.layer_lr_decay <= 1, "layer_lr_decay", "must be in (0, 1]")
  require(config.head_lr_scale > 0, "head_lr_scale", "must be positive")
  require(config.backbone_dropout < 1, "backbone_dropout", "must be < 1 (< 0 keeps the model's)")
  require(config.model_dtype != "float16", "model_dtype", FLOAT16_REFUSED)
  require(config.model_dtype in ("float32", "bfloat16"), "model_dtype",
          f"{config.model_dtype!r} is not float32 or bfloat16")
  require(config.attention_impl in ("",) + ATTENTION_IMPLS, "attention_impl",
          f"{config.attention_impl!r} is not '' or one of {ATTENTION_IMPLS}")
  require(config.log_every_steps > 0, "log_every_steps", "must be positive")
  require(config.eval_every_epochs > 0, "eval_every_epochs", "must be positive")


# --------------------------------------------------------------------------------------- init

def init_kind(path: str) -> str:
  """'pretraining_workdir' or 'hf' (local or gs://); FinetuneError for anything else (cheap:
  reads no weights)."""
  if not storage.isdir(path):
    raise FinetuneError(f"config.init={path!r} is not a directory")
  if workdir_lib.is_pretraining_workdir(path):
    return "pretraining_workdir"
  has_weights = any(storage.isfile(storage.join(path, f))
                    for f in (hf.SAFETENSORS_FILE, hf.TORCH_FILE))
  if storage.isfile(storage.join(path, hf.CONFIG_FILE)) and has_weights:
    return "hf"
  raise FinetuneError(
      f"config.init={path!r} is neither a pre-training workdir (config.json + checkpoints/) nor a "
      f"Hugging Face DebertaV2 directory (config.json + {hf.SAFETENSORS_FILE} or {hf.TORCH_FILE})")


def load_init(path: str, step: int | None = None) -> Init:
  kind = init_kind(path)
  spm = storage.join(path, workdir_lib.SPM_FILE if kind == "pretraining_workdir" else hf.SPM_FILE)
  if not storage.isfile(spm):
    raise FinetuneError(f"config.init={path!r} has no {os.path.basename(spm)} (the tokenizer)")
  if kind == "pretraining_workdir" and step == 0:
    return initial_init(path)
  if kind == "pretraining_workdir":
    return init_from_workdir(path, *workdir_lib.load(path, step))
  model_config, params = hf.load_pretrained(path)
  return Init(kind, path, model_config, params, spm)


def init_from_workdir(path: str, run_config, model, params, step: int) -> Init:
  """The Init of an already restored pre-training workdir (`workdir.load`'s values): the
  discriminator as a standalone network, E_D = E_G + E_delta materialised under GDES."""
  disc = jax.tree.map(np.asarray, jax.device_get(model.export_discriminator_params(params)))
  return Init("pretraining_workdir", path, model.discriminator_config, disc,
              storage.join(path, workdir_lib.SPM_FILE), step, run_config.model.embedding_sharing)


def initial_init(path: str) -> Init:
  """Step 0 of a pre-training workdir: the parameters its run started from, recomputed from its
  config.json (config.seed), with its tokenizer. Fine-tuned, this is the control a pre-training
  recipe is judged against: the same network, vocabulary and seed, without the pre-training."""
  run_config = workdir_lib.read_config(path)
  model = RTDModel.from_config(run_config)
  params = jax.device_get(meta.unbox(pretrain_step.initial_params(model, run_config)))
  return init_from_workdir(path, run_config, model, params, 0)


# --------------------------------------------------------------------------------------- data

@dataclasses.dataclass
class TaskData:
  task: Any
  train: Any                 # glue.Features
  evals: dict                # split name -> glue.Features


def load_data(config, tokenizer):
  task = glue.get_task(config.task)
  splits = glue.load(task, config.glue_dir, config.tfds_data_dir)
  train_split = splits["train"].take(config.max_train_examples)
  train = glue.encode(train_split, tokenizer, config.max_seq_length)
  evals = {name: glue.encode(splits[name].take(config.max_eval_examples), tokenizer,
                             config.max_seq_length) for name in task.eval_splits}
  for name, feats in [("train", train), *evals.items()]:
    logging.info("%s %s: %d examples, padded length %d, %d truncated to max_seq_length=%d",
                 task.name, name, len(feats), feats.seq_len, feats.truncated,
                 config.max_seq_length)
  return TaskData(task, train, evals)


# ------------------------------------------------------------------------------------- training

def _model_config(init: Init, config):
  changes = {"dtype": config.model_dtype}
  if config.attention_impl:
    changes["attention_impl"] = config.attention_impl
  if config.backbone_dropout >= 0:
    changes["hidden_dropout"] = config.backbone_dropout
    changes["attention_dropout"] = config.backbone_dropout
  return init.model_config.replace(**changes)


def learning_rate_scale(path, num_layers: int, layer_decay: float, head_scale: float) -> float:
  """The factor on `learning_rate` of the parameter at `path` (a tuple of names).

  Layer-wise decay: the task head gets `head_scale`, encoder layer i (0-based, of `num_layers`)
  gets layer_decay ** (num_layers - i), and everything below the layers (the embeddings, the
  relative-position table and its LayerNorm) layer_decay ** (num_layers + 1), so that what
  pre-training learned first moves least (ELECTRA's and the DeBERTa fine-tuning recipes).
  """
  if path[0] in classifier_lib.HEAD_KEYS:
    return head_scale
  if path[0] == "encoder" and str(path[1]).startswith("layer_"):
    return layer_decay ** (num_layers - int(str(path[1])[len("layer_"):]))
  return layer_decay ** (num_layers + 1)


def scale_by_parameter_group(num_layers: int, layer_decay: float,
                             head_scale: float) -> optax.GradientTransformation:
  """Multiplies each update by its `learning_rate_scale`: the optimizer's last step, so the
  weight decay AdamW adds is scaled too, as a per-group learning rate would."""

  def update(updates, state, params=None):
    del params
    def scale(path, u):
      names = tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)
      return u * learning_rate_scale(names, num_layers, layer_decay, head_scale)
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config, total_steps: int, num_layers: int):
  """(optimizer, schedule, warmup steps): the pre-training optimizer with the fine-tuning
  config's hyper-parameters; warmup_steps, else warmup_proportion of the run; then the
  per-group scale of `layer_lr_decay` and `head_lr_scale` when either is not 1."""
  warmup = config.warmup_steps or int(round(config.warmup_proportion * total_steps))
  warmup = min(warmup, total_steps)
  tx, schedule = optim.make_optimizer(config, config.learning_rate, warmup, total_steps)
  if config.layer_lr_decay != 1.0 or config.head_lr_scale != 1.0:
    tx = optax.chain(tx, scale_by_parameter_group(num_layers, config.layer_lr_decay,
                                                  config.head_lr_scale))
  return tx, schedule, warmup


def _write_json(path: str, value) -> None:
  """The whole file at once (a rename locally, one object upload on gs://): a reader never sees
  part of it."""
  storage.write_bytes(path, json.dumps(value, indent=2, sort_keys=True).encode("utf-8"))


def run(config, workdir: str, init: Init | None = None) -> dict:
  """Fine-tunes and evaluates; returns the results dict also written to OUT/results.json.

  `init`, when given, is the already loaded `config.init` (callers that fine-tune one model on
  several tasks restore it once).
  """
  # --- 1. Everything checkable before touching a device, then the model and the data.
  task = check_inputs(config)
  wall_start = time.time()
  if init is None or storage.absolute(init.path) != storage.absolute(config.init):
    init = load_init(config.init, None if config.init_step < 0 else config.init_step)
  tokenizer = Tokenizer(init.spm_model)
  if tokenizer.num_pieces >= init.model_config.vocab_size:
    raise FinetuneError(f"{init.spm_model} has {tokenizer.num_pieces} pieces but the model in "
                        f"{init.path} has only {init.model_config.vocab_size} embedding rows")
  data = load_data(config, tokenizer)
  model_config = _model_config(init, config)
  model = classifier_lib.SequenceClassifier(model_config, task.num_labels, config.cls_dropout,
                                            config.pooler_dropout, config.pooling)

  # --- 2. Mesh, optimizer, state (sharded by the logical-axis rules, as pre-training), steps.
  mesh = _mesh(config)
  steps_per_epoch = -(-len(data.train) // config.batch_size)
  total_steps = steps_per_epoch * config.num_epochs
  tx, schedule, warmup = make_optimizer(config, total_steps, model_config.num_layers)
  state, shardings = init_state(model, tx, config, mesh, data.train.seq_len, init)
  train_fn, eval_fn = jit_steps(model, tx, task.is_regression, config.seed, mesh, shardings)
  batches = Batches(mesh)

  # --- 3. The loop: shuffled epochs, dev evaluation each `eval_every_epochs`.
  is_chief = jax.process_index() == 0
  if is_chief:
    storage.makedirs(workdir)
  log = MetricsLog(storage.join(workdir, METRICS_FILE) if is_chief else None)
  results = _results_header(config, task, init, model_config, data, mesh, steps_per_epoch,
                            total_steps, warmup)
  logging.info("fine-tuning %s from %s (%s): %d examples, %d epochs x %d steps, warmup %d, "
               "mesh %s", task.name, init.path, init.kind, len(data.train), config.num_epochs,
               steps_per_epoch, warmup, dict(mesh.shape))
  step, best_params = 0, None
  try:
    for epoch in range(1, config.num_epochs + 1):
      state, step = train_epoch(train_fn, state, step, epoch, data.train, batches, config,
                                schedule, total_steps, log)
      if epoch % config.eval_every_epochs and epoch != config.num_epochs:
        continue
      entry = {"epoch": epoch, "step": step}
      for name, feats in data.evals.items():
        entry[name] = evaluate(eval_fn, state["params"], feats, task, batches, mesh,
                               config.eval_batch_size)
      log.write({"step": step, "epoch": epoch, **{f"{name}/{k}": v for name in data.evals
                                                   for k, v in entry[name].items()}})
      logging.info("epoch %d dev: %s", epoch, json.dumps({n: entry[n] for n in data.evals}))
      results["epochs"].append(entry)
      first = task.eval_splits[0]
      if results["best"] is None or entry[first]["score"] > results["best"][first]["score"]:
        results["best"] = entry
        if config.export_best:  # every process takes part in the gather; process 0 keeps it
          gathered = init_from.host_copy(state["params"])
          best_params = gathered if is_chief else None
      results["wall_time_s"] = time.time() - wall_start
      if is_chief:
        _write_json(storage.join(workdir, RESULTS_FILE), results)
  finally:
    log.close()
  if config.export_best and is_chief:
    hf.save_sequence_classifier(
        storage.join(workdir, "best_model"), model_config, best_params, task.num_labels,
        glue.label_names(task), init.spm_model, tokenizer.mask_id, config.cls_dropout)
  return results


def check_inputs(config):
  """The task, after every check that needs no device: the config, the init directory's kind,
  the GLUE directory's files."""
  validate(config)
  task = glue.get_task(config.task)
  init_kind(config.init)
  if config.glue_dir:
    if not os.path.isdir(config.glue_dir):
      raise FinetuneError(f"config.glue_dir={config.glue_dir!r} is not a directory")
    glue.task_dir(task, config.glue_dir)
  return task


def _mesh(config):
  try:
    mesh = sharding.make_mesh(config)
  except ValueError as e:
    raise FinetuneError(str(e)) from e
  dp = sharding.data_parallel_size(mesh)
  if config.batch_size % dp:
    raise FinetuneError(f"config.batch_size={config.batch_size} is not divisible by the {dp} "
                        f"data-parallel devices (mesh.data * mesh.fsdp)")
  return mesh


def init_state(model, tx, config, mesh, seq_len: int, init: Init):
  """(state, shardings): the classifier with `init`'s backbone, placed on the mesh, and a fresh
  optimizer state; shardings has 'step', 'params', 'opt_state' and 'batch'."""
  ids = jnp.zeros((1, seq_len), jnp.int32)

  def init_boxed(key):
    params = model.init(key, ids, jnp.ones_like(ids), True)["params"]
    return params, tx.init(params)

  key = jax.random.key(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract = jax.eval_shape(init_boxed, key)
    param_shardings, opt_shardings = sharding.logical_to_sharding(abstract, mesh)
    fresh = jax.jit(lambda k: meta.unbox(init_boxed(k)[0]))(key)
  try:
    params = classifier_lib.merge_backbone(init_from.host_copy(fresh), init.params,
                                          config.reinit_top_layers)
  except ValueError as e:
    raise FinetuneError(f"config.init={init.path!r}: {e}") from e
  params = jax.device_put(params, param_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
  shardings = {"step": sharding.replicated(mesh), "params": param_shardings,
               "opt_state": opt_shardings}
  return state, shardings


def jit_steps(model, tx, regression: bool, seed: int, mesh, shardings):
  """(train_fn(state, batch) -> (state, scalars), eval_fn(params, batch) -> logits), jitted
  with the state's shardings; batch fields are input_ids, attention_mask, label and weight (0
  for the rows that pad an epoch's last batch)."""
  dropout_key = jax.random.fold_in(jax.random.key(seed), 1)

  def per_example_loss(logits, labels):
    if regression:
      return jnp.square(logits[:, 0] - labels.astype(jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  def train_step(state, batch):
    rng = jax.random.fold_in(dropout_key, state["step"])
    w = batch["weight"]

    def loss_fn(p):
      logits = model.apply({"params": p}, batch["input_ids"], batch["attention_mask"], False,
                           rngs={"dropout": rng})
      loss = jnp.sum(per_example_loss(logits, batch["label"]) * w) / jnp.maximum(jnp.sum(w), 1.0)
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1,
                 "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state}
    scalars = {"loss": loss, "grad_norm": optax.tree.norm(grads), "weight": jnp.sum(w)}
    if not regression:
      hits = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
      scalars["accuracy"] = jnp.sum(hits * w) / jnp.maximum(jnp.sum(w), 1.0)
    return new_state, scalars

  def eval_step(params, batch):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], True)

  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  train_fn = jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, replicated), donate_argnums=0)
  eval_fn = jax.jit(eval_step, in_shardings=(shardings["params"], batch_sharding),
                    out_shardings=replicated)

  def on_mesh(fn):  # the model's sharding constraints read the mesh and rules when traced
    def call(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        return fn(*args)
    return call

  return on_mesh(train_fn), on_mesh(eval_fn)


class Batches:
  """Global example rows -> this process's slice -> one global jax.Array per field."""

  def __init__(self, mesh):
    self.sharding = sharding.batch_sharding(mesh)
    self.count, self.index = jax.process_count(), jax.process_index()

  def __call__(self, feats, rows, weight):
    local = slice(self.index * len(rows) // self.count,
                  (self.index + 1) * len(rows) // self.count)
    rows = rows[local]
    fields = {"input_ids": feats.input_ids[rows], "attention_mask": feats.attention_mask[rows],
              "label": feats.labels[rows], "weight": weight[local].astype(np.float32)}
    return {k: jax.make_array_from_process_local_data(self.sharding, v)
            for k, v in fields.items()}


class MetricsLog:
  """metrics.jsonl of the chief process (path None elsewhere: writes nothing).

  Locally a file appended line by line; on an object store (gs://, no appends) the object is
  rewritten whole at each record, which for one line per logged step stays small.
  """

  def __init__(self, path: str | None):
    self._path = path
    self._remote = bool(path) and storage.is_remote(path)
    self._lines: list[str] = []
    self._file = open(path, "w", encoding="utf-8") if path and not self._remote else None

  def write(self, record: dict) -> None:
    line = json.dumps(record) + "\n"
    if self._file:
      self._file.write(line)
      self._file.flush()
    elif self._remote:
      self._lines.append(line)
      storage.write_bytes(self._path, "".join(self._lines).encode("utf-8"))

  def close(self) -> None:
    if self._file:
      self._file.close()


def train_epoch(train_fn, state, step: int, epoch: int, train, batches, config, schedule,
                total_steps: int, log: MetricsLog):
  """One shuffled pass over the training set; logs averages every `log_every_steps` and at the
  epoch's end. Returns (state, step)."""
  order = np.random.default_rng([config.seed, epoch]).permutation(len(train))
  steps_per_epoch = -(-len(train) // config.batch_size)
  sums, count, timer, timed_from = None, 0, None, step
  in_flight = dispatch.StepsInFlight(ahead=1)
  for b in range(steps_per_epoch):
    rows = order[b * config.batch_size:(b + 1) * config.batch_size]
    weight = np.ones(config.batch_size, np.float32)
    if len(rows) < config.batch_size:   # the epoch's last, partial batch: padded, weight 0
      weight[len(rows):] = 0
      rows = np.concatenate([rows, np.zeros(config.batch_size - len(rows), rows.dtype)])
    state, scalars = train_fn(state, batches(train, rows, weight))
    in_flight.dispatched(scalars)
    step += 1
    sums = scalars if sums is None else dispatch.add_trees(sums, scalars)
    count += 1
    if timer is None:  # the first step includes compilation: time from its end
      jax.block_until_ready(state["step"])
      timer, timed_from = time.time(), step
    if step % config.log_every_steps and b != steps_per_epoch - 1:
      continue
    host = {k: float(v) / count for k, v in jax.device_get(sums).items()}
    if not np.isfinite(host["loss"]):
      raise errors.NonFiniteError(f"non-finite training loss at step {step} (epoch {epoch})")
    record = {"step": step, "epoch": epoch, "loss": host["loss"],
              "grad_norm": host["grad_norm"], "learning_rate": float(schedule(step - 1))}
    if "accuracy" in host:
      record["accuracy"] = host["accuracy"]
    if step > timed_from:
      record["examples_per_second"] = (config.batch_size * (step - timed_from) /
                                       (time.time() - timer))
    log.write(record)
    eta = ""
    if "examples_per_second" in record:
      seconds = (total_steps - step) * config.batch_size / record["examples_per_second"]
      eta = f" eta {int(seconds // 60)}m{int(seconds % 60):02d}s (training; dev evaluations extra)"
    logging.info("step %d/%d epoch %d loss=%.4f%s lr=%.3g%s", step, total_steps, epoch,
                 record["loss"], f" acc={record['accuracy']:.3f}" if "accuracy" in record
                 else "", record["learning_rate"], eta)
    sums, count = None, 0
    timer, timed_from = time.time(), step
  return state, step


def evaluate(eval_fn, params, feats, task, batches: Batches, mesh, eval_batch_size: int) -> dict:
  """The task's metrics on one split (its last batch padded with weight-0 rows)."""
  dp = sharding.data_parallel_size(mesh)
  eval_batch = -(-eval_batch_size // dp) * dp
  n = len(feats)
  outputs = []
  for start in range(0, n, eval_batch):
    rows = np.arange(start, start + eval_batch)
    weight = (rows < n).astype(np.float32)
    rows = np.where(rows < n, rows, 0)
    logits = eval_fn(params, batches(feats, rows, weight))
    outputs.append(np.asarray(jax.device_get(logits)))
  logits = np.concatenate(outputs)[:n]
  predictions = logits[:, 0] if task.is_regression else np.argmax(logits, -1)
  scores = glue_metrics.compute(task.metrics, predictions, feats.labels)
  scores["score"] = glue_metrics.task_score(scores, task.metrics)
  return scores


def _results_header(config, task, init, model_config, data, mesh, steps_per_epoch: int,
                    total_steps: int, warmup: int) -> dict:
  return {
      "task": task.name, "metrics": list(task.metrics), "score": "mean of " + "/".join(
          task.metrics) + f" on {task.eval_splits[0]}",
      "init": {"path": init.path, "kind": init.kind, "step": init.step,
               "embedding_sharing": init.embedding_sharing},
      "model": {"hidden_size": model_config.hidden_size, "num_layers": model_config.num_layers,
                "num_heads": model_config.num_heads, "vocab_size": model_config.vocab_size},
      "train_examples": len(data.train),
      "eval_examples": {k: len(v) for k, v in data.evals.items()},
      "seq_len": {"train": data.train.seq_len, **{k: v.seq_len for k, v in data.evals.items()}},
      "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
      "devices": f"{mesh.devices.size} x {jax.devices()[0].device_kind}",
      "config": config.to_dict(), "epochs": [], "best": None,
  }


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()
  results = run(cli.load_config(_FLAGS["config"]), _FLAGS["workdir"].value)
  best = results["best"]
  first = list(results["eval_examples"])[0]
  print(json.dumps({"task": results["task"], "best_epoch": best["epoch"],
                    **{f"{first}/{k}": v for k, v in best[first].items()}}))


def run_main():
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  run_main()

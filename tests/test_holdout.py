"""The held-out evaluation on the paths a pod run takes: whole shards held out, the same held-out
set for any global batch, the evaluation traced on the training mesh, a misfit evaluation batch
refused before compiling, SIGTERM before the first step exits 4, and the package's import layout."""

import ast
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from configs import tiny
from deberta_jax import config as config_lib
from deberta_jax.data import DataError
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.models.kernels import flash_attention
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import evaluation
from deberta_jax.pretraining import train
from deberta_jax.pretraining import train_step as ts
from deberta_jax.runtime import sharding
from tests.overrides import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(cache_dir, **overrides):
  """configs/tiny.py with evaluation on (its default), on one device unless a test says."""
  c = tiny.get_config()
  c.data.cache_dir = cache_dir
  c.mesh.num_devices = 1
  return apply_overrides(c, overrides)


def _shard_starts(pipeline):
  return np.cumsum([0] + [s["sequences"] for s in pipeline.rows.manifest["shards"]])


def _shard_of(pipeline, rows):
  starts = _shard_starts(pipeline)[:-1]
  return set((np.searchsorted(starts, np.asarray(rows), side="right") - 1).tolist())


def test_held_out_rows_are_whole_shards_never_trained_on(cache_dir):
  pipeline = pipeline_lib.make_pipeline(tiny_config(cache_dir))
  assert pipeline.holdout_rows > 0
  held = pipeline.holdout_indices(pipeline.holdout_rows)
  trained = pipeline.chunk_indices(0, pipeline.num_train_rows)  # one whole epoch
  assert len(set(held.tolist())) == pipeline.holdout_rows
  assert len(set(trained.tolist())) == pipeline.num_train_rows
  held_shards, trained_shards = _shard_of(pipeline, held), _shard_of(pipeline, trained)
  assert held_shards and not held_shards & trained_shards
  # Every row of a held-out shard is held out, and every row is on exactly one side.
  starts = _shard_starts(pipeline)
  for shard in held_shards:
    first, stop = starts[shard], starts[shard + 1]
    assert set(range(first, stop)) <= set(held.tolist())
  assert pipeline.holdout_rows + pipeline.num_train_rows == len(pipeline.rows)


def test_held_out_set_depends_on_the_dataset_and_eval_only(cache_dir):
  """A resume with another global batch (or seed) keeps the same held-out rows and accepts the
  saved position; another holdout fraction is refused by name."""
  first = pipeline_lib.make_pipeline(tiny_config(cache_dir, global_batch_size=32))
  for _ in range(2):
    first.next_batch()
  saved = first.state()
  other = pipeline_lib.make_pipeline(tiny_config(cache_dir, global_batch_size=16, seed=7))
  chex.assert_trees_all_equal(other.holdout_indices(300), first.holdout_indices(300))
  other.restore(saved)
  assert other.state()["examples_seen"] == 64
  more = pipeline_lib.make_pipeline(tiny_config(cache_dir, **{"eval.holdout_fraction": 0.2}))
  assert more.holdout_rows > first.holdout_rows
  with pytest.raises(DataError, match="holdout_fraction"):
    more.restore(saved)


def test_a_single_shard_dataset_cannot_hold_out_a_shard(cache_dir):
  with pytest.raises(DataError, match="part_mb"):
    pipeline_lib.make_pipeline(tiny_config(cache_dir, **{"data.part_mb": 64.0}))


def _evaluator(config, per_device_microbatch=0):
  mesh = sharding.make_mesh(config)
  pipeline = pipeline_lib.make_pipeline(config)
  tok = pipeline.tokenizer
  tokens = ts.SpecialTokens.of(tok)
  model = RTDModel.from_config(config)
  state, shardings = train.create_state(model, ts.make_optimizers(config), config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  chunking = {"per_device_microbatch": per_device_microbatch} if per_device_microbatch else {}
  evaluate = evaluation.Evaluator(model, config, tokens, pipeline, shardings.params,
                                  batch_sharding, lambda b: train._global_batch(b, batch_sharding),  # pylint: disable=protected-access
                                  **chunking)
  return evaluate, state.params


def test_evaluation_runs_the_kernels_on_the_per_device_share(cache_dir, monkeypatch):
  """attention_impl='flash' under data=2: each kernel call sees half of the 32-row eval batch."""
  config = tiny_config(cache_dir, **{
      "mesh.num_devices": 2, "mesh.data": 2, "mesh.fsdp": 1, "model.attention_impl": "flash",
      "eval.batch_size": 32, "eval.num_batches": 1, "model.num_layers": 1,
      "model.generator_num_layers": 1})
  seen = []
  real = flash_attention.fused_attention

  def recording(q, *args, **kwargs):
    seen.append(q.shape[0])
    return real(q, *args, **kwargs)

  monkeypatch.setattr(flash_attention, "fused_attention", recording)
  evaluate, params = _evaluator(config)
  seen.clear()  # init traced the kernels on its one-row batch
  result = evaluate(params)
  assert seen and set(seen) == {16}, seen
  assert np.isfinite(result["eval_mlm_loss"]) and np.isfinite(result["eval_rtd_loss"])


def test_evaluation_does_not_depend_on_the_mesh_or_the_chunks(cache_dir):
  """One device, whole batches == two devices in chunks of 4 rows per device: every row is
  masked and sampled with keys of its own number (the same parameters: seed 0 on both)."""
  overrides = {"eval.batch_size": 32, "eval.num_batches": 2}
  one, params = _evaluator(tiny_config(cache_dir, **overrides))
  two, params_two = _evaluator(tiny_config(cache_dir, **overrides, **{
      "mesh.num_devices": 2, "mesh.data": 2, "mesh.fsdp": 1}), per_device_microbatch=4)
  assert len(two._batches) == 2 * 4  # pylint: disable=protected-access
  chex.assert_trees_all_close(jax.device_get(params), jax.device_get(params_two))
  first, second = one(params), two(params_two)
  # The feature spectra of a random init are nearly degenerate at [CLS] (cosine ~1 between
  # rows): their effective rank moves with the summation order in the 4th digit.
  health = [k for k in first if "effective_rank" in k or "mean_cosine" in k]
  chex.assert_trees_all_close({k: first[k] for k in health}, {k: second[k] for k in health},
                              rtol=2e-3)
  chex.assert_trees_all_close({k: v for k, v in first.items() if k not in health},
                              {k: v for k, v in second.items() if k not in health}, rtol=2e-5)


def test_num_batches_0_reads_every_whole_held_out_batch(cache_dir):
  """eval.num_batches=0: the logged evaluation covers the whole held-out shard, the rows
  `analyze heldout` reads by default, so the feature spectrum comes from as many rows as there are."""
  config = tiny_config(cache_dir, **{"eval.batch_size": 32, "eval.num_batches": 0})
  evaluate, _ = _evaluator(config)
  holdout_rows = pipeline_lib.make_pipeline(config).holdout_rows
  assert evaluate.num_batches == holdout_rows // 32 > 8
  assert len(evaluate._batches) == evaluate.num_batches  # pylint: disable=protected-access


def test_a_misfit_eval_batch_is_refused_before_compiling(cache_dir, tmp_path):
  config = tiny_config(cache_dir, **{"mesh.num_devices": 8, "eval.batch_size": 12})
  workdir = tmp_path / "run"
  with pytest.raises(config_lib.ConfigError, match="eval.batch_size: 12 is not divisible by the 8"):
    train.run(config, str(workdir))
  assert not workdir.exists()


def test_check_eval_batch_names_the_process_count():
  config = tiny.get_config()
  config.eval.batch_size = 6
  with pytest.raises(config_lib.ConfigError, match="eval.batch_size.*4 processes"):
    config_lib.check_eval_batch(config, data_parallel=2, process_count=4)
  config.eval.every_steps = 0  # no evaluation: nothing to check
  config_lib.check_eval_batch(config, data_parallel=4, process_count=4)


def test_sigterm_before_the_first_step_exits_4(cache_dir, tmp_path):
  """SIGTERM while the run sets up (here: right after the data is ready, while the state is made
  and the step compiles) is exit 4, 'rerun to resume', before any step."""
  workdir = str(tmp_path / "run")
  command = [sys.executable, "-m", "deberta_jax.main", "--config=configs/tiny.py",
             f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}",
             "--config.num_train_steps=2", "--config.eval.every_steps=0",
             "--config.compilation_cache_dir=", "--config.mesh.cpu_devices=1"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
  lines = []
  deadline = time.time() + 300
  for line in proc.stderr:
    lines.append(line)
    if "Pipeline(" in line or time.time() > deadline:
      proc.send_signal(signal.SIGTERM)
      break
  _, rest = proc.communicate(timeout=300)
  output = "".join(lines) + rest
  assert proc.returncode == 4, output[-3000:]
  assert "stopped: stopped by SIGTERM during" in output, output[-3000:]
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "1")), "no step was taken"


# Which subpackage may import which (WORKSPACE.md): entry points -> pretraining, finetune ->
# models, data, runtime -> errors (and the other modules at the bottom).
_LOWER = {"models", "data", "runtime"}
_BOTTOM = {"errors", "caches", "paths"}


def _imports(path):
  tree = ast.parse(open(path, encoding="utf-8").read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deberta_jax"):
      names = [node.module + "." + a.name for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name.startswith("deberta_jax")]
    else:
      continue
    for name in names:
      yield name.split(".")[1] if "." in name else ""


def test_imports_run_one_way():
  package = os.path.join(REPO, "deberta_jax")
  wrong = []
  for layer in _LOWER:
    for root, _, files in os.walk(os.path.join(package, layer)):
      for f in files:
        if not f.endswith(".py"):
          continue
        for target in _imports(os.path.join(root, f)):
          if target and target != layer and target not in _BOTTOM:
            wrong.append(f"{os.path.relpath(os.path.join(root, f), REPO)} imports deberta_jax.{target}")
  assert not wrong, wrong

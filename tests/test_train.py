"""End to end on the embedded corpus: losses fall, resume equals an uninterrupted run, export
loads in transformers, bad input fails at once by name, a non-finite loss stops the run."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from configs import tiny
from deberta_jax import workdir as workdir_lib
from deberta_jax import errors
from deberta_jax import export as export_lib
from deberta_jax.runtime import metrics
from deberta_jax.pretraining import train
from deberta_jax.pretraining import train_step as ts
from tests.faults import poison_from
from tests.overrides import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(cache_dir, **overrides):
  """configs/tiny.py on one device, without held-out evaluation unless a test asks for it."""
  c = tiny.get_config()
  c.data.cache_dir = cache_dir
  c.mesh.num_devices = 1
  c.eval.every_steps = 0
  return apply_overrides(c, overrides)


def test_tiny_pretraining_losses_fall(cache_dir, tmp_path):
  """The README's main job (configs/tiny.py on the embedded corpus), cut from 3000 steps to 60
  (warmup 10, linear decay over the 60), evaluated on the held-out rows at steps 0, 30, 60.
  The tiny model leaves the uniform distribution within the first 50 steps (held-out MLM loss
  7.6 -> 6.3), so 60 steps show the fall; longer runs only creep along the unigram plateau."""
  workdir = str(tmp_path / "run")
  train.run(tiny_config(cache_dir, num_train_steps=60, **{"eval.every_steps": 30,
                                                           "eval.num_batches": 8,
                                                           "optim.warmup_steps": 10,
                                                           "log.every_steps": 10}), workdir)
  records = metrics.read_metrics(workdir)
  evals = [r for r in records if "eval_mlm_loss" in r]
  assert [r["step"] for r in evals] == [0, 30, 60]
  assert evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"] - 1.0
  assert evals[-1]["eval_rtd_loss"] < evals[0]["eval_rtd_loss"]
  assert 0.0 <= evals[-1]["eval_rtd_auc"] <= 1.0
  records = [r for r in records if "mlm_loss" in r]
  first, last = records[0], records[-1]
  print(f"tiny: step {first['step']} mlm_loss={first['mlm_loss']:.3f} "
        f"rtd_loss={first['rtd_loss']:.3f} -> step {last['step']} mlm_loss={last['mlm_loss']:.3f} "
        f"rtd_loss={last['rtd_loss']:.3f} rtd_accuracy={last['rtd_accuracy']:.3f}")
  assert last["step"] == 60
  assert last["mlm_loss"] < first["mlm_loss"] - 1.0
  assert last["rtd_loss"] < first["rtd_loss"] - 0.1
  assert last["mlm_accuracy"] > first["mlm_accuracy"]
  for key in ("mlm_loss", "mlm_accuracy", "rtd_loss", "rtd_accuracy", "replaced_fraction",
              "learning_rate", "generator_grad_norm", "discriminator_grad_norm",
              "tokens_per_second"):
    assert key in last, key
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.exists(os.path.join(workdir, "checkpoints", "60"))


def _short(cache_dir, **overrides):
  base = {"num_train_steps": 30, "optim.warmup_steps": 5, "ckpt.every_steps": 10,
          "log.every_steps": 5, "ckpt.async_save": False}
  return tiny_config(cache_dir, **{**base, **overrides})


@pytest.fixture(scope="module")
def resumed_run(cache_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("resume")
  straight, resumed = str(root / "straight"), str(root / "resumed")
  train.run(_short(cache_dir), straight)
  train.run(_short(cache_dir, stop_after_steps=10), resumed)  # "interrupted" after step 10
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["10"]
  train.run(_short(cache_dir), resumed)  # the same command again resumes
  return straight, resumed


def test_resume_continues_the_same_trajectory(resumed_run):
  straight, resumed = resumed_run
  a = {r["step"]: r for r in metrics.read_metrics(straight)}
  b = {r["step"]: r for r in metrics.read_metrics(resumed)}
  assert set(a) == set(b) == {5, 10, 15, 20, 25, 30}
  for step in (15, 20, 25, 30):
    for key in ("mlm_loss", "rtd_loss", "generator_grad_norm", "discriminator_grad_norm"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-6, err_msg=f"{key}@{step}")
  print("resume:", {s: (round(a[s]["mlm_loss"], 6), round(b[s]["mlm_loss"], 6)) for s in (15, 30)})


def test_export_loads_in_transformers(resumed_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from deberta_jax import hf  # pylint: disable=g-import-not-at-top
  from deberta_jax.models import DebertaEncoder  # pylint: disable=g-import-not-at-top
  _, workdir = resumed_run
  out = str(tmp_path / "hf")
  paths = export_lib.export(workdir, out)
  assert "generator" in os.path.basename(paths["generator"])
  assert "discriminator" in os.path.basename(paths["discriminator"])
  disc, info = transformers.AutoModel.from_pretrained(paths["discriminator"],
                                                      output_loading_info=True)
  assert not info["missing_keys"], info
  gen, info = transformers.DebertaV2ForMaskedLM.from_pretrained(paths["generator"],
                                                                output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert os.path.exists(os.path.join(paths["discriminator"], "spm.model"))
  config, params = hf.load_pretrained(paths["discriminator"])
  rng = np.random.default_rng(0)
  ids = rng.integers(4, 2000, (2, 64)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 40:] = 0
  ours = np.asarray(DebertaEncoder(config).apply({"params": params}, ids, mask))
  with torch.no_grad():
    ref = disc.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state
  diff = float(np.abs(ours - ref.numpy())[mask.astype(bool)].max())
  print(f"export: discriminator hidden states, ours vs transformers: max|diff|={diff:.2e}")
  assert diff <= 1e-5
  # The exported embedding is E_G + E_delta of the checkpoint (GDES).
  ckpt_config, ckpt_params = hf.load_pretrained(paths["generator"])
  assert ckpt_config.position_table
  assert not np.array_equal(ckpt_params["embeddings"]["word_embeddings"],
                            params["embeddings"]["word_embeddings"])


def _tree_snapshot(root):
  """Every path under root with its size and modification time."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      stat = os.stat(path)
      out[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
  return out


def test_readers_leave_a_training_workdir_untouched(resumed_run, tmp_path):
  """export, analyze (and so finetune and the study, which load through it) read a workdir whose
  trainer is mid-save: its temporary step directory (what orbax writes before the commit rename)
  and everything else stay as they were, and the trainer's save then completes."""
  import shutil  # pylint: disable=g-import-not-at-top
  from deberta_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "live")
  shutil.copytree(resumed_run[1], workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  # A save of step 40 in flight: the newest step's files in a temporary directory, no commit yet.
  in_flight = os.path.join(checkpoints, "40.orbax-checkpoint-tmp-1700000000000000")
  shutil.copytree(os.path.join(checkpoints, "30"), in_flight)
  for dirpath, _, filenames in os.walk(in_flight):
    for name in filenames:
      if name == "commit_success.txt":
        os.remove(os.path.join(dirpath, name))
  before = _tree_snapshot(workdir)
  assert checkpointing.committed_steps(checkpoints) == [20, 30]  # ckpt.keep = 2

  export_lib.export(workdir, str(tmp_path / "hf"))
  _, _, params, step = workdir_lib.load(workdir)
  step_20, params_20 = checkpointing.load_params(workdir, 20)
  assert step == 30 and step_20 == 20
  assert not np.array_equal(params["generator"]["embeddings"]["word_embeddings"],
                            params_20["generator"]["embeddings"]["word_embeddings"])
  assert _tree_snapshot(workdir) == before
  # The trainer finishes its save: orbax writes the commit file and renames the directory.
  with open(os.path.join(in_flight, "commit_success.txt"), "w") as f:
    f.write("done")
  os.rename(in_flight, os.path.join(checkpoints, "40"))
  assert checkpointing.committed_steps(checkpoints) == [20, 30, 40]
  _, params_40 = checkpointing.load_params(workdir)
  chex.assert_trees_all_equal(params_40, params)  # step 40 holds step 30's arrays here


def test_load_params_refuses_missing_and_damaged_checkpoints(resumed_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from deberta_jax.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint found"):
    checkpointing.load_params(str(tmp_path / "nothing"))
  assert not (tmp_path / "nothing").exists()
  workdir = str(tmp_path / "damaged")
  shutil.copytree(resumed_run[1], workdir)
  state = os.path.join(workdir, "checkpoints", "30", "state")
  os.remove(os.path.join(state, "manifest.ocdbt"))
  with pytest.raises(checkpointing.CheckpointError, match="step 30"):
    checkpointing.load_params(workdir, 30)
  step, _ = checkpointing.load_params(workdir)  # the newest readable one
  assert step == 20


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(cache_dir, tmp_path,
                                                                       monkeypatch):
  monkeypatch.setattr(ts, "make_train_step", poison_from(13))
  workdir = str(tmp_path / "nan")
  with pytest.raises(errors.NonFiniteError, match="at step 13"):
    train.run(_short(cache_dir), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]


def _cli(*args, cwd=REPO, **env_extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env_extra}
  return subprocess.run([sys.executable, "-m", "deberta_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--config=configs/tiny.py", "--config.optim.lr_peak=1e-4"], "lr_peak"),
    (["--config=configs/nonexistent.py"], "configs/nonexistent.py"),
    (["--config=configs/tiny.py", "--config.model.num_heads=3"], "config.model.num_heads"),
])
def test_bad_command_lines_fail_by_name(args, needle, tmp_path):
  workdir = tmp_path / "untouched"
  result = _cli(*args, f"--workdir={workdir}")
  assert result.returncode != 0
  assert needle in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()


def test_workdir_of_another_model_is_refused(cache_dir, resumed_run):
  _, workdir = resumed_run
  before = sorted(os.listdir(workdir))
  with pytest.raises(errors.WorkdirError, match="different model"):
    train.run(_short(cache_dir, **{"model.hidden_size": 32}), workdir)
  assert sorted(os.listdir(workdir)) == before
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["fingerprint"]["discriminator"]["hidden_size"] == 64


def test_a_restarted_run_loads_the_compiled_step_from_the_cache(cache_dir, tmp_path):
  xla_cache = tmp_path / "xla"
  args = ["--config=configs/tiny.py", f"--config.data.cache_dir={cache_dir}",
          "--config.num_train_steps=2", "--config.optim.warmup_steps=1",
          "--config.log.every_steps=1", f"--config.compilation_cache_dir={xla_cache}",
          "--config.eval.every_steps=0"]  # the step's cache is the point, not the evaluation
  dry = _cli(*args, f"--workdir={tmp_path / 'dry'}", "--config.dry_run=True")
  assert dry.returncode == 0, dry.stderr[-2000:]
  assert not xla_cache.exists()  # a dry run writes nothing
  first = _cli(*args, f"--workdir={tmp_path / 'first'}")
  assert first.returncode == 0, first.stderr[-2000:]
  assert any(xla_cache.iterdir())
  # The same program again (a restart): the step executable comes from the cache.
  second = _cli(*args, f"--workdir={tmp_path / 'second'}", JAX_LOG_COMPILES="1")
  assert second.returncode == 0, second.stderr[-2000:]
  hits = [line for line in second.stderr.splitlines() if "Persistent compilation cache hit" in line]
  assert any("two_stage_step" in line for line in hits), second.stderr[-3000:]


def test_fused_attention_trains_like_skew(cache_dir, tmp_path):
  """The RTD training step with model.attention_impl='flash' (the Pallas kernels, interpreted on
  CPU) gives the skew path's losses and gradient norms, with every dropout on: both forms draw
  the same hash mask for the attention probabilities (hash_dropout.drop_probabilities). The
  first 3 steps of the resume tests' run: in one test process the skew step comes from the
  compilation cache."""
  runs = {}
  for impl in ("skew", "flash"):
    workdir = str(tmp_path / impl)
    train.run(_short(cache_dir, stop_after_steps=3, **{"log.every_steps": 1,
                                                       "model.attention_impl": impl}), workdir)
    runs[impl] = {r["step"]: r for r in metrics.read_metrics(workdir)}
  for step in (1, 2, 3):
    for key in ("mlm_loss", "rtd_loss", "generator_grad_norm", "discriminator_grad_norm"):
      np.testing.assert_allclose(runs["flash"][step][key], runs["skew"][step][key], rtol=1e-4,
                                 err_msg=f"{key} step {step}")
  print("flash vs skew mlm_loss:", [(runs["flash"][s]["mlm_loss"], runs["skew"][s]["mlm_loss"])
                                    for s in (1, 2, 3)])

"""Fault injection on configs/tiny.py: a run killed or preempted anywhere continues the same
trajectory, a failed checkpoint write keeps the previous one, non-finite steps are stopped or
skipped, and bad input is refused by name with exit code 2 before anything is written.

docs/reliability.md lists every case here with what the user sees.
"""

import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import chex
import jax
from flax.linen import meta as flax_meta
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from deberta_jax import errors
from deberta_jax.runtime import checkpointing
from deberta_jax.runtime import metrics
from deberta_jax.pretraining import train
from deberta_jax.pretraining import train_step as ts
from deberta_jax.models.rtd import RTDModel
from tests.faults import poison_from
from tests.overrides import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
# Short run, a checkpoint every 5 steps, metrics every step (the kill points are read from them),
# held-out evaluation at steps 0, 10, 20 and 30 (an interrupted run must evaluate alike too).
CHAIN_FLAGS = {"num_train_steps": STEPS, "optim.warmup_steps": 5, "ckpt.every_steps": 5,
               "log.every_steps": 1, "mesh.num_devices": 1, "eval.every_steps": 10,
               "eval.num_batches": 2}
COMPARED = ("mlm_loss", "rtd_loss", "generator_grad_norm", "discriminator_grad_norm")
EVAL_COMPARED = ("eval_mlm_loss", "eval_mlm_accuracy", "eval_rtd_loss", "eval_rtd_accuracy",
                 "eval_rtd_auc")


def tiny_config(cache_dir, **overrides):
  """The chain's settings in-process, without the evaluation (these tests look at steps)."""
  c = tiny.get_config()
  c.data.cache_dir = cache_dir
  return apply_overrides(c, {**CHAIN_FLAGS, "eval.every_steps": 0, **overrides})


def _env(devices: int = 1) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _command(workdir, cache_dir, *extra):
  flags = [f"--config.{k}={v}" for k, v in CHAIN_FLAGS.items()]
  return [sys.executable, "-m", "deberta_jax.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", f"--config.data.cache_dir={cache_dir}", *flags, *extra]


def _by_step(workdir) -> dict:
  """The last record logged for each step (a resumed run logs some steps twice)."""
  return {r["step"]: r for r in metrics.read_metrics(workdir)}


def _last_logged_step(workdir) -> int:
  """The step of the newest complete metrics line (0 when none yet)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError):
      continue  # a line being written
  return 0


def _run_until(command, workdir, kill_after: int, sig: int, timeout=240):
  """Starts `command`, sends `sig` once `kill_after` steps are logged; returns (rc, stderr)."""
  proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + timeout
  while _last_logged_step(workdir) < kill_after and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  if proc.poll() is None:
    proc.send_signal(sig)
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
  """The reference trajectory, run by the same command in the same environment as the
  interrupted runs: a process with other XLA flags (this one fakes 8 devices) may round
  differently, and over 30 steps a last-bit difference can flip one sampled replacement token."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
  done = subprocess.run(_command(workdir, cache_dir), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return _by_step(workdir)


def test_killed_and_preempted_runs_continue_the_same_trajectory(uninterrupted, cache_dir,
                                                                 tmp_path):
  """One run interrupted three times at random steps (seeds 0, 1, 2): SIGKILL, SIGTERM, SIGKILL,
  each followed by the same command. SIGTERM must leave a checkpoint of the step it stopped at
  and exit with code 4; every logged step must equal the uninterrupted run."""
  workdir = str(tmp_path / "run")
  command = _command(workdir, cache_dir)
  kill_points = sorted({random.Random(seed).randint(3, STEPS - 3) for seed in (0, 1, 2)})
  signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL][:len(kill_points)]
  print(f"kill points: {list(zip(kill_points, [s.name for s in signals]))}")
  for kill_after, sig in zip(kill_points, signals):
    rc, err = _run_until(command, workdir, kill_after, sig)
    steps_logged = _last_logged_step(workdir)
    if sig == signal.SIGKILL:
      assert rc == -signal.SIGKILL, err[-2000:]
    else:
      assert rc == 4, err[-2000:]
      assert f"stopped by SIGTERM after step {steps_logged}" in err
      saved = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=5,
                                         keep=3)
      assert saved.latest_step() == steps_logged, saved.all_steps()
      saved.close()
  final = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
  assert final.returncode == 0, final.stderr[-2000:]
  resumed = _by_step(workdir)
  assert set(resumed) == set(uninterrupted) == set(range(0, STEPS + 1))
  for step in range(1, STEPS + 1):
    for key in COMPARED:
      np.testing.assert_allclose(resumed[step][key], uninterrupted[step][key], rtol=1e-6,
                                 err_msg=f"{key} at step {step}")
  for step in range(0, STEPS + 1, 10):
    for key in EVAL_COMPARED:
      np.testing.assert_allclose(resumed[step][key], uninterrupted[step][key], rtol=1e-6,
                                 err_msg=f"{key} at step {step}")
  print("eval at step 30 (uninterrupted / killed 3 times): " + ", ".join(
      f"{k}={uninterrupted[STEPS][k]:.6f}/{resumed[STEPS][k]:.6f}" for k in EVAL_COMPARED))
  # Temporary (preemption) checkpoints do not outlive a newer one: only permanent ones remain.
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert all(s % 5 == 0 for s in kept), kept


def test_failed_checkpoint_write_keeps_the_previous_one(cache_dir, tmp_path, monkeypatch):
  """Disk full while writing step 10: a clear error (exit code 5 from the CLI), step 5 intact,
  and rerunning resumes from step 5 on the same trajectory."""
  original = ocp.CheckpointManager.save
  calls = {"n": 0}

  def disk_full_on_second_save(self, step, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_on_second_save)
  workdir = str(tmp_path / "run")
  config = tiny_config(cache_dir, **{"ckpt.async_save": False, "num_train_steps": 12})
  with pytest.raises(errors.CheckpointWriteError,
                     match=r"writing step 10 .*No space left on device.*newest complete "
                           r"checkpoint is step 5"):
    train.run(config, workdir)
  monkeypatch.setattr(ocp.CheckpointManager, "save", original)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["5"]
  before = _by_step(workdir)
  assert max(before) == 10
  train.run(config, workdir)
  resumed = _by_step(workdir)
  assert max(resumed) == 12
  for step in range(6, 11):
    np.testing.assert_allclose(resumed[step]["mlm_loss"], before[step]["mlm_loss"], rtol=1e-6)


def test_preservation_keeps_newest_and_permanent_checkpoints():
  policy = checkpointing.KeepPermanentAndNewest(keep=2, is_permanent=lambda s: s % 10 == 0)

  class Info:
    def __init__(self, step):
      self.step = step

  steps = [10, 13, 20, 27, 30, 34]
  kept = policy.should_preserve([Info(s) for s in steps])
  assert [s for s, k in zip(steps, kept) if k] == [20, 30, 34]


# ------------------------------------------------------------------------------ numerics

def _state_and_batch(config):
  model = RTDModel.from_config(config)
  optimizers = ts.make_optimizers(config)
  state = jax.jit(lambda k: flax_meta.unbox(ts.init_state(model, optimizers, config, k)))(
      jax.random.key(0))
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 1000, size=(4, config.seq_len)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 1, 2
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)}
  tokens = ts.SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=2000)
  return model, optimizers, state, batch, tokens


def test_skip_mode_drops_a_non_finite_update_and_applies_a_finite_one():
  config = apply_overrides(tiny.get_config(), {"nonfinite": "skip", "seq_len": 32,
                                               "global_batch_size": 4,
                                               "optim.warmup_steps": 0})
  model, optimizers, state, batch, tokens = _state_and_batch(config)
  step = jax.jit(ts.make_train_step(model, optimizers, config, tokens, num_micro=1))

  clean_next, clean_metrics = step(state, batch)
  assert float(clean_metrics["skipped"]) == 0.0
  assert float(clean_metrics["first_nonfinite_step"]) == np.inf
  assert not np.array_equal(clean_next.params["generator"]["lm_head"]["bias"],
                            state.params["generator"]["lm_head"]["bias"])

  poisoned = state.replace(params={
      **state.params,
      "generator": jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim else x,
                                state.params["generator"])})
  next_state, m = step(poisoned, batch)
  assert float(m["skipped"]) == 1.0
  assert float(m["first_nonfinite_step"]) == 1.0
  assert int(next_state.step) == 1
  chex.assert_trees_all_equal(next_state.params, poisoned.params)  # NaN == NaN here
  chex.assert_trees_all_equal(next_state.opt_state, poisoned.opt_state)


def test_skip_mode_counts_skipped_steps_and_goes_on(cache_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(ts, "make_train_step", poison_from(8, skip=True))
  workdir = str(tmp_path / "skip")
  # Also: a wall-clock checkpoint is due at every log step (every_minutes tiny); those are
  # temporary, so only permanent steps (multiples of 5, and the last) may remain.
  config = tiny_config(cache_dir, **{"nonfinite": "skip", "nonfinite_max_skips": 100,
                                     "num_train_steps": 12, "log.every_steps": 4,
                                     "ckpt.every_minutes": 1e-9, "ckpt.async_save": False})
  saved = []
  original_save = checkpointing.Checkpointer.save

  def recording_save(self, step, *args, **kwargs):
    started = original_save(self, step, *args, **kwargs)
    if started:
      saved.append(step)
    return started

  monkeypatch.setattr(checkpointing.Checkpointer, "save", recording_save)
  train.run(config, workdir)
  records = _by_step(workdir)
  assert records[12]["skipped_steps"] == 5.0           # steps 8..12
  assert np.isfinite(records[8]["mlm_loss"])           # averages leave skipped steps out
  assert saved == [4, 5, 8, 10, 12], saved             # timed at log steps 4, 8; periodic 5, 10
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")))
  assert kept == [10, 12], kept                         # keep=2 permanent; 4 and 8 were temporary


def test_skip_mode_stops_after_too_many_skips():
  config = apply_overrides(tiny.get_config(), {"nonfinite": "skip", "nonfinite_max_skips": 2})
  health = train.StepHealth(config, start_step=0)
  bad = {"mlm_loss": 0.0, "skipped": 2.0, "first_nonfinite_step": 3.0}
  health.add(bad, step=4)
  with pytest.raises(errors.NonFiniteError, match="more than config.nonfinite_max_skips=2"):
    health.add({**bad, "skipped": 1.0, "first_nonfinite_step": 6.0}, step=6)


# ------------------------------------------------------------------------------ bad input

def _write(path, data: bytes) -> str:
  with open(path, "wb") as f:
    f.write(data)
  return str(path)


def _bad_inputs(tmp_path, cache_dir):
  """(name, extra args, devices, text the one-line error must contain)."""
  empty = _write(tmp_path / "empty.txt", b"")
  binary = _write(tmp_path / "binary.txt", bytes(range(128, 256)) * 64)
  not_spm = _write(tmp_path / "not_spm.model", b"this is not a sentencepiece model")
  spm_models = glob.glob(os.path.join(cache_dir, "**", "*.model"), recursive=True)
  return [
      ("unknown config field", ["--config.optim.learnin_rate=1"], 1, "learnin_rate"),
      ("unparsable value", ["--config.num_train_steps=many"], 1, "num_train_steps"),
      ("missing config file", ["--config=configs/nope.py"], 1, "configs/nope.py"),
      ("heads do not divide hidden", ["--config.model.num_heads=3"], 1,
       "config.model.num_heads"),
      ("unknown sharing mode", ["--config.model.embedding_sharing=shared"], 1,
       "config.model.embedding_sharing"),
      ("seq_len over positions", ["--config.seq_len=1024"], 1, "config.seq_len"),
      ("float16 without loss scaling", ["--config.model.dtype=float16"], 1,
       "config.model.dtype"),
      ("corpus glob with the embedded source", ["--config.data.text_files=/data/*.txt"], 1,
       "config.data.source='embedded'"),
      ("tfds name with the text_files source", ["--config.data.source=text_files",
                                                "--config.data.text_files=/data/*.txt",
                                                "--config.data.tfds_name=wikipedia"], 1,
       "config.data.tfds_name"),
      ("mesh does not divide devices", ["--config.mesh.num_devices=0", "--config.mesh.data=3"],
       4, "config.mesh"),
      ("more devices than present", ["--config.mesh.num_devices=16"], 4,
       "config.mesh.num_devices"),
      ("batch not divisible by mesh", ["--config.mesh.num_devices=0",
                                       "--config.global_batch_size=6"], 4,
       "config.global_batch_size"),
      ("micro-batch does not divide", ["--config.mesh.per_device_microbatch=3"], 1,
       "config.mesh.per_device_microbatch"),
      ("missing corpus", ["--config.data.source=text_files",
                          f"--config.data.text_files={tmp_path}/nothing/*.txt"], 1,
       "matches no file"),
      ("empty corpus", ["--config.data.source=text_files", f"--config.data.text_files={empty}"],
       1, "empty"),
      ("undecodable corpus", ["--config.data.source=text_files",
                              f"--config.data.text_files={binary}"], 1, "not valid UTF-8"),
      ("missing spm model", [f"--config.data.spm_model={tmp_path}/none.model"], 1,
       "config.data.spm_model"),
      ("corrupt spm model", [f"--config.data.spm_model={not_spm}"], 1, "not_spm.model"),
      ("vocabulary too small for the spm model",
       [f"--config.data.spm_model={spm_models[0]}", "--config.model.vocab_size=1000"], 1,
       "vocab"),
  ]


def test_bad_inputs_fail_by_name_with_exit_code_2_and_write_nothing(uninterrupted, cache_dir,
                                                                     tmp_path):
  cases = _bad_inputs(tmp_path, cache_dir)
  assert len(cases) >= 12
  procs = []
  for i, (name, extra, devices, _) in enumerate(cases):
    workdir = tmp_path / f"workdir_{i}"
    cache = tmp_path / f"cache_{i}"  # a data failure must not need the shared cache either
    cmd = _command(workdir, cache, *extra)
    procs.append((workdir, subprocess.Popen(cmd, cwd=REPO, env=_env(devices), text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    if len(procs) - sum(p.poll() is not None for _, p in procs) >= 3:
      time.sleep(1.0)  # keep a few running at once on a 2-core machine
  failures = []
  for (name, _, _, needle), (workdir, proc) in zip(cases, procs):
    _, err = proc.communicate(timeout=300)
    last = err.strip().splitlines()[-1] if err.strip() else ""
    print(f"{name}: exit {proc.returncode}: {last}")
    if proc.returncode != 2 or needle not in last or not last.startswith("error:"):
      failures.append(f"{name}: exit {proc.returncode}, last line {last!r}")
    if workdir.exists():
      failures.append(f"{name}: {workdir} was created")
  assert not failures, "\n".join(failures)


def test_workdir_problems_are_refused_without_touching_it(cache_dir, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  other = tmp_path / "other_model"
  other.mkdir()
  (other / "run.json").write_text(json.dumps({"fingerprint": {"discriminator": {"x": 1}}}))
  garbled = tmp_path / "garbled"
  garbled.mkdir()
  (garbled / "run.json").write_text("{not json")
  for workdir, needle in ((a_file, "not a directory"), (other, "different model"),
                          (garbled, "unreadable")):
    before = _snapshot(workdir)
    with pytest.raises(errors.WorkdirError, match=needle):
      train.run(tiny_config(cache_dir), str(workdir))
    assert _snapshot(workdir) == before


def _snapshot(path) -> dict:
  """Every file under `path` (or `path` itself) with its size, mtime and bytes."""
  paths = [path] if os.path.isfile(path) else glob.glob(f"{path}/**", recursive=True)
  return {p: (os.path.getsize(p), os.path.getmtime(p),
              open(p, "rb").read() if os.path.isfile(p) else None) for p in paths}

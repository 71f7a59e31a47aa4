"""The Table 1 embedding analysis: the all-pairs mean against brute force and known geometries,
E_G / E_D / E_delta for every sharing mode from hand-built trees, and the CLI on a workdir; the
held-out evaluation of a trained run's checkpoint."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from configs import tiny
from deberta_jax import workdir as workdir_lib
from deberta_jax import analyze
from deberta_jax import errors
from deberta_jax.runtime import checkpointing
from deberta_jax import config as config_lib
from deberta_jax.runtime import sharding
from deberta_jax.pretraining import train
from deberta_jax.pretraining import train_step as ts
from deberta_jax.models.rtd import DELTA, RTDModel
from deberta_jax.runtime import metrics
from tests.overrides import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force(table):
  x = np.asarray(table, np.float64)
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  n = len(u)
  return np.mean([u[i] @ u[j] for i in range(n) for j in range(n) if i != j])


def test_average_cosine_similarity_known_geometries():
  v = np.arange(1.0, 9.0)
  assert analyze.average_cosine_similarity(np.tile(v, (10, 1))) == (pytest.approx(1.0), 10)
  assert analyze.average_cosine_similarity(np.eye(8) * 3.0) == (pytest.approx(0.0, abs=1e-12), 8)
  assert analyze.average_cosine_similarity(np.stack([v, -v]))[0] == pytest.approx(-1.0)
  # Scale does not matter; zero rows are left out (a piece E_delta never moved).
  scaled = np.eye(4) * np.array([[1.0], [10.0], [0.1], [5.0]])
  with_zero = np.concatenate([scaled, np.zeros((3, 4))])
  assert analyze.average_cosine_similarity(with_zero) == (pytest.approx(0.0, abs=1e-12), 4)
  rng = np.random.default_rng(0)
  for shape in [(5, 3), (40, 16)]:
    x = rng.normal(size=shape) + 0.5
    chex.assert_trees_all_close(analyze.average_cosine_similarity(x)[0], brute_force(x),
                                rtol=1e-10)


def test_sample_rows():
  rows = analyze.sample_rows(1004, 0.1, seed=0)
  assert len(rows) == 100 and rows.min() >= 4 and rows.max() < 1004
  assert len(np.unique(rows)) == 100
  np.testing.assert_array_equal(rows, analyze.sample_rows(1004, 0.1, seed=0))
  assert not np.array_equal(rows, analyze.sample_rows(1004, 0.1, seed=1))
  with pytest.raises(ValueError):
    analyze.sample_rows(100, 0.0, 0)


def _tree(e_g, e_d=None, delta=None):
  disc = {"embeddings": {"LayerNorm": {}}}
  if e_d is not None:
    disc["embeddings"]["word_embeddings"] = e_d
  if delta is not None:
    disc[DELTA] = {"word_embeddings": delta, "position_embeddings": np.zeros((4, e_g.shape[1]))}
  return {"generator": {"embeddings": {"word_embeddings": e_g}}, "discriminator": disc}


def test_tables_of_each_sharing_mode_built_by_hand():
  vocab, hidden = 40, 36
  v = np.linspace(1.0, 2.0, hidden)
  e_g = np.tile(v, (vocab, 1))                       # every piece the same direction: 1.0
  delta = np.eye(vocab, hidden) * 5.0                 # orthogonal residuals: 0.0
  rows = analyze.sample_rows(vocab, 1.0, 0)
  gdes = analyze.embedding_similarities(_tree(e_g, delta=delta), "gdes", vocab, 1.0)
  assert gdes["E_G"] == pytest.approx(1.0)
  assert gdes["E_delta"] == pytest.approx(0.0, abs=1e-12)
  chex.assert_trees_all_close(gdes["E_D"], brute_force((e_g + delta)[rows]), rtol=1e-6)
  assert 0.0 < gdes["E_D"] < 1.0                      # between its two parts, as in Table 1
  # Rows 36..39 of the 40 x 36 identity are zero: no direction, left out of E_delta only.
  assert gdes["sample_size"] == vocab - 4 and gdes["rows_used"]["E_delta"] == 36 - 4
  assert gdes["rows_used"]["E_D"] == vocab - 4
  es = analyze.embedding_similarities(_tree(e_g), "es", vocab, 1.0)
  assert es["E_G"] == es["E_D"] == pytest.approx(1.0) and "E_delta" not in es
  own = np.eye(vocab, hidden)
  nes = analyze.embedding_similarities(_tree(e_g, e_d=own), "nes", vocab, 1.0)
  assert nes["E_G"] == pytest.approx(1.0) and nes["E_D"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------- real workdirs

def tiny_run_config(sharing="gdes"):
  c = tiny.get_config()
  c.model.embedding_sharing = sharing
  c.model.vocab_size = 128
  c.model.hidden_size, c.model.num_heads, c.model.intermediate_size = 32, 2, 64
  c.seq_len, c.global_batch_size, c.num_train_steps, c.optim.warmup_steps = 32, 8, 10, 1
  c.mesh.num_devices = 1
  config_lib.validate(c)
  return c


def make_workdir(path, sharing="gdes", edit=None, step=7):
  """A pre-training workdir without training: config.json plus one checkpoint of a freshly
  initialised state whose parameters `edit(params) -> params` may set to known values."""
  c = tiny_run_config(sharing)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, workdir_lib.CONFIG_FILE), "w") as f:
    f.write(config_lib.to_json(c))
  mesh = sharding.make_mesh(c)
  model = RTDModel.from_config(c)
  state, shardings = train.create_state(model, ts.make_optimizers(c), c, mesh)
  if edit is not None:
    params = edit(jax.tree.map(np.array, jax.device_get(state.params)))
    state = state.replace(params=jax.device_put(params, shardings.params))
  ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), every_steps=1, keep=2,
                                    async_save=False)
  ckpt.save(step, state, {"step": step}, force=True)
  ckpt.close()
  return path


def _known_gdes(params):
  """E_G: one direction for every row; E_delta: orthogonal one-hot rows (cycling the width)."""
  e_g = params["generator"]["embeddings"]["word_embeddings"]
  e_g[:] = np.linspace(-1.0, 1.0, e_g.shape[1]) + 0.25
  delta = params["discriminator"][DELTA]["word_embeddings"]
  delta[:] = 0.0
  delta[np.arange(delta.shape[0]), np.arange(delta.shape[0]) % delta.shape[1]] = 2.0
  return params


@pytest.fixture(scope="module")
def gdes_workdir(tmp_path_factory):
  return make_workdir(str(tmp_path_factory.mktemp("wd") / "gdes"), edit=_known_gdes)


def test_analyze_embeddings_on_a_workdir(gdes_workdir):
  result = analyze.analyze_embeddings(gdes_workdir, fraction=0.1, seed=3)
  assert result["step"] == 7 and result["embedding_sharing"] == "gdes"
  # No spm.model in this workdir: the sample is drawn from vocab_size - 1 = 127 pieces.
  rows = analyze.sample_rows(127, 0.1, 3)
  assert result["sample_size"] == len(rows) == 12
  _, _, params, _ = workdir_lib.load(gdes_workdir)
  e_g = params["generator"]["embeddings"]["word_embeddings"]
  delta = params["discriminator"][DELTA]["word_embeddings"]
  assert result["E_G"] == pytest.approx(1.0)
  chex.assert_trees_all_close(result["E_D"], brute_force((e_g + delta)[rows]), rtol=1e-6)
  chex.assert_trees_all_close(result["E_delta"], brute_force(delta[rows]), rtol=1e-6, atol=1e-9)


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-m", "deberta_jax.analyze", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_prints_a_table_and_a_json_line(gdes_workdir, tmp_path):
  proc = _cli("embeddings", f"--workdir={gdes_workdir}", "--sample_fraction=0.2", "--seed=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  print("\n".join(lines))
  assert any(line.startswith("| gdes |") for line in lines)
  result = json.loads(lines[-1])
  assert result["sample_size"] == 25 and result["E_G"] == pytest.approx(1.0)
  assert set(result) >= {"E_G", "E_D", "E_delta", "step", "workdir", "rows_used"}
  bad = _cli("embeddings", f"--workdir={tmp_path}")
  assert bad.returncode == 2 and "not a pre-training workdir" in bad.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- held-out evaluation

def _trained_run(cache_dir, path, every_steps=1):
  """One real training step of the tiny config on the embedded corpus, evaluated on 2 batches."""
  config = apply_overrides(tiny.get_config(), {
      "data.cache_dir": cache_dir, "mesh.num_devices": 1, "num_train_steps": 1,
      "optim.warmup_steps": 10, "eval.every_steps": every_steps, "eval.num_batches": 2,
      "ckpt.async_save": False, "log.every_steps": 1})
  train.run(config, path)
  return path


@pytest.fixture(scope="module")
def trained_workdir(cache_dir, tmp_path_factory):
  return _trained_run(cache_dir, str(tmp_path_factory.mktemp("heldout") / "run"))


def test_heldout_repeats_the_logged_evaluation_and_reads_more(trained_workdir):
  logged = [r for r in metrics.read_metrics(trained_workdir) if "eval_rtd_auc" in r][-1]
  again = analyze.heldout_report(trained_workdir, num_batches=2)
  assert again["step"] == logged["step"] == 1 and again["rows"] == 2 * 32
  evals = sorted(k for k in logged if k.startswith("eval_"))
  assert "eval_disc_effective_rank" in evals
  chex.assert_trees_all_close({k: again[k] for k in evals}, {k: logged[k] for k in evals},
                              rtol=1e-6)

  every = analyze.heldout_report(trained_workdir)  # 0: every whole held-out batch
  assert every["num_batches"] == every["holdout_rows"] // 32 > 2
  assert every["rows"] == 32 * every["num_batches"]
  assert every["eval_disc_effective_rank"] != again["eval_disc_effective_rank"]
  assert 1.0 <= every["eval_disc_effective_rank"] <= tiny.get_config().model.hidden_size


def test_heldout_cli_and_its_refusals(trained_workdir, cache_dir, tmp_path):
  proc = _cli("heldout", f"--workdir={trained_workdir}", "--num_batches=1")
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["rows"] == 32 and "eval_disc_effective_rank" in result
  assert proc.stdout.startswith("step 1, 32 of ")

  negative = _cli("heldout", f"--workdir={trained_workdir}", "--num_batches=-1")
  assert negative.returncode == 2 and "num_batches=-1" in negative.stderr.strip().splitlines()[-1]
  no_holdout = _trained_run(cache_dir, str(tmp_path / "no_eval"), every_steps=0)
  with pytest.raises(errors.BadInput, match="eval.every_steps=0"):
    analyze.heldout_report(no_holdout)
  with pytest.raises(errors.BadInput, match="eval.every_steps=0"):
    analyze.layers_report(no_holdout)
  with pytest.raises(errors.BadInput, match="num_batches=-2"):
    analyze.layers_report(trained_workdir, num_batches=-2)


# ------------------------------------------------------------------ the features layer by layer

def test_spread_and_top_components_of_known_geometries():
  rng = np.random.default_rng(0)
  verdict = rng.normal(size=4000)
  # Variance 9 along e0 (the verdict itself), 1 along e1 (unrelated), nothing elsewhere: shares
  # 0.9 and 0.1, effective rank exp(-(0.9 ln 0.9 + 0.1 ln 0.1)).
  x = np.zeros((4000, 8))
  x[:, 0] = 3.0 * (verdict - verdict.mean()) / verdict.std()
  other = rng.normal(size=4000)
  other -= other.mean() + np.polyfit(verdict, other, 1)[0] * (verdict - verdict.mean())
  x[:, 1] = other / other.std()
  x += 5.0  # an offset common to every row moves the cosine, not the spectrum
  got = analyze.spread(x)
  assert got["effective_rank"] == pytest.approx(np.exp(-(0.9 * np.log(0.9) + 0.1 * np.log(0.1))),
                                                rel=1e-6)
  assert got["top_share"] == pytest.approx(0.9, rel=1e-6)
  assert got["mean_cosine"] > 0.9
  first, second = analyze.top_components(x, -verdict, count=2)
  assert first["share"] == pytest.approx(0.9, rel=1e-6)
  assert first["abs_corr_with_mean_logit"] == pytest.approx(1.0, abs=1e-9)
  assert second["abs_corr_with_mean_logit"] < 1e-6
  isotropic = analyze.spread(rng.normal(size=(20000, 8)))
  assert isotropic["effective_rank"] > 7.9 and isotropic["top_share"] < 0.14
  assert abs(isotropic["mean_cosine"]) < 0.01


def test_layers_end_at_the_logged_features_and_the_cli_prints_them(trained_workdir):
  """The last stage is the evaluation's feature health over the same rows; the CLI prints a table
  of every stage and a JSON line."""
  logged = [r for r in metrics.read_metrics(trained_workdir) if "eval_rtd_auc" in r][-1]
  proc = _cli("layers", f"--workdir={trained_workdir}", "--num_batches=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  print("\n".join(lines))
  result = json.loads(lines[-1])
  layers = tiny.get_config().model.num_layers
  assert [s["stage"] for s in result["stages"]] == ["embeddings"] + [
      f"layer {i}" for i in range(1, layers + 1)]
  assert result["rows"] == 64 and any(line.startswith("| layer 2 |") for line in lines)
  last = result["stages"][-1]
  assert last["effective_rank"] == pytest.approx(logged["eval_disc_effective_rank"], rel=1e-5)
  assert last["mean_cosine"] == pytest.approx(logged["eval_disc_mean_cosine"], rel=1e-5)
  shares = [c["share"] for c in result["last_layer_components"]]
  assert shares[0] == pytest.approx(last["top_share"], rel=1e-6)
  assert shares == sorted(shares, reverse=True) and sum(shares) <= 1.0 + 1e-9
  assert all(0.0 <= c["abs_corr_with_mean_logit"] <= 1.0
             for c in result["last_layer_components"])

"""The tools that read a pre-training workdir (export, analyze, finetune) read it from gs://, and
the ones that write (export's HF directories, finetune's metrics, results and best model) write to
gs://, against the GCS API server on 127.0.0.1 (tests/gcs_server.py). One tiny pre-training run
into gs:// is shared by every test of the file."""

import json
import os
import subprocess
import sys

import chex
import fsspec
import numpy as np
import pytest

from configs import tiny
from deberta_jax import analyze
from deberta_jax import errors
from deberta_jax import export
from deberta_jax import hf
from deberta_jax import workdir as workdir_lib
from deberta_jax.data import storage
from deberta_jax.finetune import train as finetune
from deberta_jax.pretraining import train
from deberta_jax.runtime import checkpointing
from tests.gcs_server import gcs_bucket, gcs_dir, gcs_server  # noqa: F401  pylint: disable=unused-import
from tests.overrides import apply_overrides
from tests.test_finetune import ft_config, write_sst2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gcs_run(cache_dir, gcs_bucket):  # pylint: disable=redefined-outer-name
  """gs://BUCKET/tools-run: the tiny model trained 2 steps into gs:// (checkpoint at step 2)."""
  workdir = f"{gcs_bucket}/tools-run"
  config = tiny.get_config()
  config.data.cache_dir = cache_dir
  config = apply_overrides(config, {
      "mesh.num_devices": 1, "num_train_steps": 2, "global_batch_size": 8, "eval.every_steps": 0,
      "ckpt.every_steps": 2, "ckpt.async_save": False, "log.every_steps": 1})
  train.run(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def local_copy(gcs_run, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """The same workdir downloaded: what the tools give for it is the reference."""
  local = str(tmp_path_factory.mktemp("downloaded") / "run")
  fsspec.filesystem("gs").get(gcs_run, local, recursive=True)
  return local


@pytest.fixture(scope="module")
def exported(gcs_run, gcs_bucket, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """(gs:// output, the export command's result, its working directory): `python -m
  deberta_jax.export` from the gs:// workdir to gs://, in a fresh interpreter."""
  out = f"{gcs_bucket}/tools-export"
  cwd = tmp_path_factory.mktemp("export_cwd")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-m", "deberta_jax.export", f"--workdir={gcs_run}",
                         f"--out={out}"], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  return out, proc, cwd


def test_workdir_readers_take_gcs(gcs_run, local_copy, gcs_dir):  # pylint: disable=redefined-outer-name
  assert workdir_lib.is_pretraining_workdir(gcs_run)
  assert workdir_lib.spm_model(gcs_run) == f"{gcs_run}/spm.model"
  config, _, params, step = workdir_lib.load(gcs_run)
  local_config, _, local_params, local_step = workdir_lib.load(local_copy)
  assert step == local_step == 2 and config.to_dict() == local_config.to_dict()
  chex.assert_trees_all_equal(params, local_params)
  assert checkpointing.committed_steps(f"{gcs_run}/checkpoints") == [2]
  assert not workdir_lib.is_pretraining_workdir(f"{gcs_dir}/nothing")
  with pytest.raises(errors.WorkdirError, match="is not a pre-training workdir"):
    workdir_lib.load(f"{gcs_dir}/nothing")


def test_export_cli_reads_and_writes_gcs(exported, gcs_run, local_copy, tmp_path):  # pylint: disable=redefined-outer-name
  out, proc, cwd = exported
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"generator: {out}/generator" in proc.stdout
  assert not os.path.exists(cwd / "gs:"), "wrote a local directory named gs:"
  reference = export.export(local_copy, str(tmp_path / "reference"))
  for name in ("generator", "discriminator"):
    names = sorted(os.path.basename(p) for p in storage.listdir(f"{out}/{name}"))
    assert names == sorted(os.listdir(reference[name])), name
    config, params = hf.load_pretrained(f"{out}/{name}")
    ref_config, ref_params = hf.load_pretrained(reference[name])
    assert config == ref_config
    chex.assert_trees_all_equal(params, ref_params)
    assert storage.read_bytes(f"{out}/{name}/spm.model") == storage.read_bytes(
        f"{gcs_run}/spm.model")


def test_analyze_reads_gcs(gcs_run, local_copy):  # pylint: disable=redefined-outer-name
  remote = analyze.analyze_embeddings(gcs_run, fraction=0.5)
  local = analyze.analyze_embeddings(local_copy, fraction=0.5)
  assert remote["step"] == 2 and remote["workdir"] == gcs_run
  for key in ("E_G", "E_D", "E_delta", "sample_size", "rows_used"):
    assert remote[key] == local[key], key


def test_writers_write_to_gcs_not_to_a_local_gs_directory(local_copy, gcs_dir, tmp_path,  # pylint: disable=redefined-outer-name
                                                          monkeypatch):
  """Each writer on its own, from a local workdir: export's HF directories, and fine-tuning's
  metrics.jsonl, results.json and best model."""
  monkeypatch.chdir(tmp_path)   # a local directory named gs: would appear here
  paths = export.export(local_copy, f"{gcs_dir}/hf")
  assert paths["generator"] == f"{gcs_dir}/hf/generator"
  assert hf.load_pretrained(paths["generator"])[0].num_layers == 1
  log = finetune.MetricsLog(f"{gcs_dir}/ft/metrics.jsonl")
  log.write({"step": 1, "loss": 0.5})
  log.write({"step": 2, "loss": 0.25})
  log.close()
  assert storage.read_bytes(f"{gcs_dir}/ft/metrics.jsonl").decode().splitlines() == [
      '{"step": 1, "loss": 0.5}', '{"step": 2, "loss": 0.25}']
  finetune._write_json(f"{gcs_dir}/ft/results.json", {"best": 1})  # pylint: disable=protected-access
  assert json.loads(storage.read_bytes(f"{gcs_dir}/ft/results.json")) == {"best": 1}
  init = finetune.load_init(local_copy)
  hidden = init.model_config.hidden_size
  rng = np.random.default_rng(0)
  params = {**init.params,
            "pooler": {"dense": {"kernel": rng.normal(size=(hidden, hidden)).astype(np.float32),
                                 "bias": np.zeros(hidden, np.float32)}},
            "classifier": {"kernel": rng.normal(size=(hidden, 3)).astype(np.float32),
                           "bias": np.arange(3, dtype=np.float32)}}
  hf.save_sequence_classifier(f"{gcs_dir}/ft/best_model", init.model_config, params, 3,
                              spm_model=init.spm_model)
  state = hf.read_state(f"{gcs_dir}/ft/best_model")
  np.testing.assert_array_equal(state["classifier.weight"], params["classifier"]["kernel"].T)
  assert json.loads(storage.read_bytes(f"{gcs_dir}/ft/best_model/config.json"))[
      "num_labels"] == 3
  assert not os.path.exists(tmp_path / "gs:"), "wrote a local directory named gs:"


# ------------------------------------------------------------------------------------- finetune

@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  """A small SST-2-format task: label 1 iff the sentence holds 'good'/'great'."""
  return write_sst2(tmp_path_factory.mktemp("glue"), 64, 32)


def test_finetune_from_a_gcs_workdir_into_gcs(gcs_run, glue_dir, gcs_dir, tmp_path,  # pylint: disable=redefined-outer-name
                                              monkeypatch):
  monkeypatch.chdir(tmp_path)   # a local directory named gs: would appear here
  out = f"{gcs_dir}/ft"
  config = ft_config(**{"task": "sst2", "init": gcs_run, "glue_dir": glue_dir, "num_epochs": 2,
                        "batch_size": 16, "learning_rate": 1e-3, "log_every_steps": 2,
                        "max_seq_length": 32, "export_best": True})
  results = finetune.run(config, out)
  assert not os.path.exists(tmp_path / "gs:")
  assert results["init"] == {"path": gcs_run, "kind": "pretraining_workdir", "step": 2,
                             "embedding_sharing": "gdes"}
  on_disk = json.loads(storage.read_bytes(f"{out}/results.json"))
  assert on_disk["best"] == results["best"] and len(on_disk["epochs"]) == 2
  records = [json.loads(l) for l in storage.read_bytes(f"{out}/metrics.jsonl").splitlines()]
  assert [r["epoch"] for r in records if "dev/accuracy" in r] == [1, 2]
  assert any("loss" in r for r in records)
  best = f"{out}/best_model"
  cfg, params = hf.load_pretrained(best)
  assert cfg.num_layers == 2 and cfg.hidden_size == 64
  state = hf.read_state(best)
  assert state["classifier.weight"].shape == (2, 64)
  assert json.loads(storage.read_bytes(f"{best}/config.json"))["architectures"] == [
      "DebertaV2ForSequenceClassification"]
  assert storage.isfile(f"{best}/spm.model")
  assert set(params) == {"embeddings", "encoder"}


def test_finetune_init_from_gcs_hf_directory_equals_the_workdir(exported, gcs_run):  # pylint: disable=redefined-outer-name
  """An HF directory on gs:// (the run's exported discriminator) gives the backbone of the gs://
  workdir it came from."""
  out, proc, _ = exported
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert finetune.init_kind(f"{out}/discriminator") == "hf"
  from_hf = finetune.load_init(f"{out}/discriminator")
  from_workdir = finetune.load_init(gcs_run)
  assert from_workdir.kind == "pretraining_workdir"
  assert from_hf.spm_model == f"{out}/discriminator/spm.model"
  backbone = {k: from_workdir.params[k] for k in ("embeddings", "encoder")}
  chex.assert_trees_all_close({k: from_hf.params[k] for k in backbone}, backbone, atol=1e-6)

"""The training step on meshes of 8 fake CPU devices gives the single-device numbers, and a
checkpoint written on one mesh resumes on another."""

import os

import jax
import numpy as np
import pytest

from deberta_jax.runtime import metrics
from deberta_jax.runtime import sharding
from deberta_jax.pretraining import train
from tests.test_train import tiny_config

MESHES = {
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "d2f2t2": dict(data=2, fsdp=2, tensor=2),
}
KEYS = ("mlm_loss", "rtd_loss", "generator_grad_norm", "discriminator_grad_norm")
# Float noise between meshes (reduction order, ~1e-7) is amplified only where a number depends on
# the sampled replacements: a draw whose uniform falls within that noise of a CDF boundary
# (roughly vocabulary x 1e-7: ~2e-4 of draws at tiny's 2,048) picks the neighbouring token, and the
# discriminator then sees one different input token (seen: 1.2e-5 in rtd_loss and 9e-5 in its
# gradient norm at step 8, every other number within 4e-7). The generator's numbers do not
# depend on the draws and keep the tight bound.
RTOL = {"mlm_loss": 1e-5, "generator_grad_norm": 1e-5, "rtd_loss": 1e-3,
        "discriminator_grad_norm": 1e-3}


def _config(cache_dir, num_devices, mesh, **extra):
  overrides = {"num_train_steps": 5, "optim.warmup_steps": 2, "log.every_steps": 1, "ckpt.every_steps": 5,
               "global_batch_size": 16,
               "ckpt.async_save": False, "mesh.num_devices": num_devices,
               **{f"mesh.{k}": v for k, v in mesh.items()}, **extra}
  return tiny_config(cache_dir, **overrides)


def _losses(workdir):
  return {r["step"]: r for r in metrics.read_metrics(workdir)}


@pytest.fixture(scope="module")
def single_device(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one"))
  train.run(_config(cache_dir, 1, dict(data=1, fsdp=1, tensor=1)), workdir)
  return _losses(workdir)


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_matches_single_device(name, cache_dir, single_device, tmp_path):
  workdir = str(tmp_path / name)
  train.run(_config(cache_dir, 8, MESHES[name]), workdir)
  sharded = _losses(workdir)
  rows = []
  for step in range(1, 6):
    for key in KEYS:
      np.testing.assert_allclose(sharded[step][key], single_device[step][key], rtol=RTOL[key],
                                 err_msg=f"{name} {key} step {step}")
    rows.append(f"{step}: {single_device[step]['mlm_loss']:.6f}/{sharded[step]['mlm_loss']:.6f}")
  print(f"mesh {name} mlm_loss (1 device / mesh):", ", ".join(rows))


def test_parameters_are_sharded_by_the_rules(cache_dir):
  config = _config(cache_dir, 8, MESHES["d2f2t2"])
  from deberta_jax.pretraining import train_step as ts  # pylint: disable=g-import-not-at-top
  from deberta_jax.models.rtd import RTDModel  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config)
  model = RTDModel.from_config(config)
  shardings = train.state_shardings(model, ts.make_optimizers(config), config, mesh)
  gen = shardings.params["generator"]
  spec = lambda s: tuple(s.spec)
  assert spec(gen["embeddings"]["word_embeddings"]) == ("tensor", "fsdp")
  assert spec(gen["encoder"]["layer_0"]["intermediate"]["kernel"]) == ("fsdp", "tensor")
  assert spec(gen["encoder"]["layer_0"]["output_LayerNorm"]["scale"]) in ((), (None,))
  mu = shardings.opt_state["generator"][1][0].mu  # clip, then adamw's ScaleByAdamState
  assert spec(mu["embeddings"]["word_embeddings"]) == ("tensor", "fsdp")


def test_checkpoint_restores_onto_another_mesh(cache_dir, single_device, tmp_path):
  """Saved after step 3 on 8 devices with fsdp=8, resumed on 2 devices with data=2: steps 4 and
  5 are the single-device run's. (The first leg is test_mesh_matches_single_device[fsdp8]'s
  program, so in one test process it comes from the compilation cache.)"""
  workdir = str(tmp_path / "cross")
  train.run(_config(cache_dir, 8, MESHES["fsdp8"], stop_after_steps=3,
                    **{"ckpt.every_steps": 3}), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  train.run(_config(cache_dir, 2, dict(data=2, fsdp=1, tensor=1)), workdir)
  resumed = _losses(workdir)
  for step in (4, 5):
    for key in KEYS:
      np.testing.assert_allclose(resumed[step][key], single_device[step][key], rtol=RTOL[key],
                                 err_msg=f"{key}@{step}")


def test_dry_run_picks_the_largest_micro_batch_that_fits(cache_dir, tmp_path):
  """fsdp=8 over 8 devices, 2 sequences per device: a budget that the 2-sequence step exceeds
  but the 1-sequence step meets makes the plan 2 micro-batches of 1; nothing is written."""
  config = _config(cache_dir, 8, dict(data=1, fsdp=8, tensor=1), dry_run=True)
  workdir = tmp_path / "never"
  roomy = train.run(config, str(workdir))  # no budget on CPU: the whole share in one pass
  assert not workdir.exists()
  assert roomy["num_micro"] == 1 and roomy["per_device_microbatch"] == 2 and roomy["fits"]
  for key in ("params_bytes", "optimizer_bytes", "temporaries_bytes", "xla_flops_per_device"):
    assert roomy[key] > 0, key
  # AdamW: mu and nu per parameter, plus a few step counters.
  assert 0 <= roomy["optimizer_bytes"] - 2 * roomy["params_bytes"] < 1024
  budget_gb = (roomy["total_bytes"] - 1) / 2**30
  tight = train.dry_run(_config(cache_dir, 8, dict(data=1, fsdp=8, tensor=1), dry_run=True,
                                **{"mesh.device_memory_gb": budget_gb}))
  assert tight["num_micro"] == 2 and tight["per_device_microbatch"] == 1 and tight["fits"]
  assert tight["total_bytes"] < roomy["total_bytes"]

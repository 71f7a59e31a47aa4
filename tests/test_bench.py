"""The analytic FLOP count, the peak table and the benchmark CLI (tiny, CPU, a few steps).

The two CLI runs are started together in subprocesses (one device, no faked device count) and
share the 2 CPU cores while the fast tests run; one of them must work with torch unimportable.
"""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from configs import base, large, small, tiny
from benchmarks import step_bench as bench
from deberta_jax.pretraining import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = ["-m", "benchmarks.bench", "--config=configs/tiny.py", "--steps", "2", "--warmup", "1",
       "--batch", "4", "--seq_len", "64"]
KEYS = ("tokens_per_second", "step_seconds", "mfu", "peak_memory_bytes", "device", "config",
        "seq_len", "batch")
REFERENCE_KEYS = ("reference_tokens_per_second", "speedup")


# --------------------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("module, expected", [(base, 1.131e9), (large, 3.472e9)])
def test_flops_reproduce_spec_worked_numbers(module, expected):
  """Spec 2.3: L=512, R=512, EMD=2 -> base 1.131, large 3.472 GFLOP/token."""
  config = module.get_config()
  chex.assert_equal(flops.relative_slots(config.model.position_buckets, 512), 512)
  assert flops.flops_per_token(config, 512) == pytest.approx(expected, rel=5e-3)


def test_flops_spec_breakdown_and_emd_free_row():
  config = base.get_config()
  b = flops.breakdown(config, 512)
  # Spec table: QK+PV and C2P+P2C are equal at L = R = 512 (0.094), the MLM head 0.089.
  assert b.scores == pytest.approx(0.094e9, rel=5e-3)
  assert b.relative == pytest.approx(0.094e9, rel=5e-3)
  assert b.mlm_head == pytest.approx(0.089e9, rel=5e-3)
  assert flops.flops_per_token(config, 512, emd_passes=0) == pytest.approx(1.027e9, rel=5e-3)


def test_flops_tiny_by_hand():
  """configs/tiny.py at L=128: H=64, I=256, N_d=2, N_g=1, E=2, V=2048, R=min(512, 255)=255."""
  config = tiny.get_config()
  h, i, length, r, vocab, p = 64, 256, 128, 255, 2048, 0.15
  layer = 8 * h * h + 4 * h * i + 4 * length * h + 4 * r * h          # 196352
  head = 2 * h * h + 2 * h                                              # 8320
  mlm = p * (2 * h * h + 2 * h * vocab)                                 # 40550.4
  spec = 3 * (5 * layer + head + mlm)
  executed = 3 * (4 * layer + head + mlm)
  chex.assert_trees_all_close(
      (flops.flops_per_token(config, length),
       flops.flops_per_token(config, length, count="executed")),
      (spec, executed), rtol=1e-12)
  chex.assert_trees_all_close((spec, executed), (3091891.2, 2502835.2), rtol=1e-12)
  assert flops.breakdown(config, length).layer_passes == 5


def test_flops_generator_depth_and_short_sequences():
  config = small.get_config()
  assert flops.generator_layers(config.model) == 3
  config.model.generator_num_layers = 2
  assert flops.breakdown(config, 512).layer_passes == 6 + 2 + 2
  # R is capped by the distances a short sequence has: 2L - 1.
  assert flops.relative_slots(256, 64) == 127
  with pytest.raises(ValueError):
    flops.breakdown(config, count="other")


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA H100 PCIe", 756e12),
    ("cpu", None), ("", None)])
def test_peak_table(kind, peak):
  assert flops.peak_flops(kind) == peak


def test_mfu():
  # Spec 2.3: base at 40% MFU on an H100 is about 350k tokens/s.
  tps = 0.4 * 989e12 / 1.131e9
  assert tps == pytest.approx(350e3, rel=0.01)
  assert flops.mfu(1.131e9, tps, "NVIDIA H100 80GB HBM3") == pytest.approx(0.4)
  assert flops.mfu(1.131e9, tps, "NVIDIA H100 80GB HBM3", num_devices=2) == pytest.approx(0.2)
  assert flops.mfu(1.131e9, tps, "cpu") is None


# ----------------------------------------------------------------------------------- synthetic data

def test_synthetic_batches_structure():
  (b,) = bench.synthetic_batches(3, 16, 2048, 1, seed=0)
  ids, mask = b["input_ids"], b["attention_mask"]
  chex.assert_shape((ids, mask), (3, 16))
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  pad, cls, sep, unk, mask_id = bench.special_ids(2048)
  np.testing.assert_array_equal(ids[:, 0], cls)
  np.testing.assert_array_equal(ids[:, -1], sep)
  body = ids[:, 1:-1]
  assert body.min() > unk and body.max() < mask_id and pad not in body
  np.testing.assert_array_equal(mask, 1)


# ------------------------------------------------------------------------------------ profiling

def test_profile_categories_and_self_times():
  assert bench.categorise(
      "jit(two_stage_step)/transpose(jvp(Generator))/layer_0/attention/pad") == (
          "generator/attention/bwd")
  assert bench.categorise(
      "jit(two_stage_step)/jvp(Discriminator)/encoder/layer_1/attention_output/dot_general") == (
          "discriminator/attention_output/fwd")
  assert bench.categorise("jit(two_stage_step)/jvp(vmap())/reduce").startswith("step")
  assert bench.categorise("") == "unattributed"
  # A parent event (0..10) containing two children (1..3, 4..8): parent self time 4.
  got = dict(bench._self_times([(0, 10, "while"), (1, 3, "a"), (4, 8, "b"), (12, 13, "c")]))
  assert got == {"while": 4, "a": 2, "b": 4, "c": 1}
  hlo = '  %fusion.3 = f32[2]{0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/mul"}\n'
  assert bench._op_names(hlo) == {"fusion.3": "jit(f)/mul"}


# ------------------------------------------------------------------------------------------ CLI

def _env(hide_torch_dir=None):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  # One CPU device (conftest fakes 8 for the in-process tests; a batch of 4 needs 1).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith("--xla_force_host_platform_device_count"))
  path = [ROOT] + ([hide_torch_dir] if hide_torch_dir else [])
  env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
  """Starts both CLI runs with the module's first test; yields get(name) -> (code, out, err)."""
  hidden = tmp_path_factory.mktemp("no_torch")
  (hidden / "torch").mkdir()
  (hidden / "torch" / "__init__.py").write_text(
      "raise ImportError('torch is hidden: bench must not import it without --reference')\n")
  procs = {
      "reference": subprocess.Popen([sys.executable, *CLI, "--reference=torch",
                                     "--torch_threads=1"], cwd=ROOT,
                                    env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True),
      "no_torch": subprocess.Popen([sys.executable, *CLI], cwd=ROOT, env=_env(str(hidden)),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
  }
  results = {}

  def get(name):
    if name not in results:
      out, err = procs[name].communicate(timeout=240)
      results[name] = (procs[name].returncode, out, err)
    return results[name]

  yield get
  for p in procs.values():
    if p.poll() is None:
      p.kill()


def _last_json(result):
  code, out, err = result
  assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
  lines = [l for l in out.strip().splitlines() if l.strip()]
  return json.loads(lines[-1])


def _check_record(record):
  for key in KEYS:
    assert key in record, key
  assert record["tokens_per_second"] > 0 and record["step_seconds"] > 0
  assert record["tokens_per_second"] == pytest.approx(4 * 64 / record["step_seconds"])
  assert record["mfu"] is None  # no peak is known for a CPU
  assert record["device"] == "cpu" and record["platform"] == "cpu"
  assert record["peak_memory_bytes"] > 0 and record["peak_memory_source"] == "process_max_rss"
  assert (record["config"], record["seq_len"], record["batch"]) == ("configs/tiny.py", 64, 4)
  config = tiny.get_config()
  assert record["flops_per_token"] == pytest.approx(flops.flops_per_token(config, 64))
  assert np.isfinite(record["final_metrics"]["mlm_loss"])


def test_cli_without_reference_and_without_torch(cli_runs):
  record = _last_json(cli_runs("no_torch"))
  _check_record(record)
  for key in REFERENCE_KEYS:
    assert key not in record


def test_cli_with_torch_reference(cli_runs):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  record = _last_json(cli_runs("reference"))
  _check_record(record)
  assert record["reference"] == "torch" and record["reference_device"] == "cpu"
  assert record["reference_tokens_per_second"] > 0
  assert record["speedup"] == pytest.approx(
      record["tokens_per_second"] / record["reference_tokens_per_second"])
  assert np.isfinite(record["reference_final_metrics"]["mlm_loss"])

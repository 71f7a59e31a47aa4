"""Fine-tuning with the parameters sharded over the devices of two JAX processes (mesh.fsdp = 4
spans both, 2 CPU devices each, jax.distributed on 127.0.0.1): the best model is gathered from
both processes and written by process 0 only.

The run trains at a learning rate of 1e-12, so the exported model must equal, to rounding, the
weights it started from (the HF backbone, the classifier's seeded initialisation): any shard
missing or misplaced by the gather shows as a difference."""

import json
import os
import socket
import subprocess
import sys

import chex
from flax.linen import meta
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from deberta_jax import hf
from deberta_jax.models import classifier as classifier_lib
from tests.test_finetune import write_sst2, hf_dir, spm_model  # noqa: F401  pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  """A small SST-2-format task (the fixtures imported above build the tokenizer from it)."""
  return write_sst2(tmp_path_factory.mktemp("glue_hosts"), 64, 32)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _finetune(init, glue, workdir, process):
  """The fine-tuning entry point as one process, 2 CPU devices, of a jax.distributed cluster;
  `process` = (id, count, coordinator port)."""
  pid, count, port = process
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
             JAX_PROCESS_ID=str(pid))
  command = [sys.executable, "-m", "deberta_jax.finetune", "--config=configs/finetune.py",
             "--config.task=sst2", f"--config.init={init}", f"--config.glue_dir={glue}",
             f"--workdir={workdir}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
             "--config.num_epochs=2", "--config.batch_size=16", "--config.eval_batch_size=16",
             "--config.learning_rate=1e-12", "--config.max_seq_length=32",
             "--config.cls_dropout=0.0", "--config.export_best=True"]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=400):
  outputs = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=timeout)
      outputs.append(out)
  finally:
    for proc in procs:  # a hung process must not outlive the test
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-4000:]
  return outputs


@pytest.mark.slow
def test_best_model_of_parameters_sharded_over_two_processes(hf_dir, glue_dir, tmp_path):  # pylint: disable=redefined-outer-name
  port = _free_port()
  # Each process is given its own output directory, so what each one wrote can be told apart.
  outs = [str(tmp_path / f"process{pid}") for pid in (0, 1)]
  logs = _wait([_finetune(hf_dir, glue_dir, outs[pid], (pid, 2, port)) for pid in (0, 1)])
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in logs[0], logs[0][-3000:]
  assert not os.path.exists(os.path.join(outs[1], "best_model")), "process 1 wrote a model"
  assert not os.path.exists(os.path.join(outs[1], "results.json"))
  results = json.load(open(os.path.join(outs[0], "results.json")))
  assert results["devices"].startswith("4 x") and len(results["epochs"]) == 2

  exported = load_file(os.path.join(outs[0], "best_model", "model.safetensors"))
  started = load_file(os.path.join(hf_dir, "model.safetensors"))
  chex.assert_trees_all_close({k: exported[k] for k in started}, started, atol=1e-6)
  # The head: the classifier's initialisation from the run's seed (config.seed = 0).
  cfg, _ = hf.load_pretrained(hf_dir)
  ids = np.ones((1, 32), np.int32)
  fresh = meta.unbox(classifier_lib.SequenceClassifier(cfg, 2).init(
      jax.random.key(0), ids, np.ones_like(ids), True)["params"])
  head = {"pooler.dense.weight": fresh["pooler"]["dense"]["kernel"].T,
          "pooler.dense.bias": fresh["pooler"]["dense"]["bias"],
          "classifier.weight": fresh["classifier"]["kernel"].T,
          "classifier.bias": fresh["classifier"]["bias"]}
  chex.assert_trees_all_close({k: exported[k] for k in head},
                              jax.tree.map(np.asarray, head), atol=1e-6)

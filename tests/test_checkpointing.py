"""Checkpointer: round trip, save policy, cross-mesh restore, damaged and uncommitted steps.

Runs on the 8 fake CPU devices set up by conftest.py.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deberta_jax.pretraining import optim
from deberta_jax.runtime import checkpointing
from deberta_jax.runtime.checkpointing import CheckpointError, Checkpointer

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _mesh(n: int, axis: str) -> Mesh:
  return Mesh(np.array(jax.devices()[:n]), (axis,))


@flax.struct.dataclass
class _Extra:
  """A flax struct node, like the trainer's TrainState: restored as the same class."""
  counter: jax.Array
  rng: jax.Array  # raw uint32 key data


def _make_state(seed: int = 0, mesh: Mesh | None = None):
  """A small train-state-like pytree: params, an optax state, an int32 step and typed keys.

  With `mesh`, the kernel and the per-device keys are sharded over its only axis, everything else
  replicated on it.
  """
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((16, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal((4,)), jnp.float32)}}
  state = {
      "params": params,
      "opt_state": optax.adam(1e-3).init(params),
      "step": jnp.asarray(seed + 7, jnp.int32),
      "rng": jax.random.key(seed),
      "device_rngs": jax.random.split(jax.random.key(seed + 1), 8),
      "extra": _Extra(counter=jnp.arange(3, dtype=jnp.int32) + seed,
                      rng=jax.random.key_data(jax.random.key(seed + 2))),
  }
  if mesh is not None:
    axis = mesh.axis_names[0]
    sharded = {"kernel", "device_rngs"}
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, NamedSharding(
            mesh, P(axis) if any(getattr(k, "key", None) in sharded for k in path) else P())),
        state)
  return state


def _abstract(state, sharding_fn):
  """ShapeDtypeStructs of `state` with the sharding `sharding_fn(path, leaf)`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(path, x)), state)


def _same_shardings(state):
  return _abstract(state, lambda path, x: x.sharding)


def _assert_states_equal(actual, expected):
  chex.assert_trees_all_equal_structs(actual, expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    if checkpointing.is_typed_key(e):
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _save_steps(directory, steps):
  """Saves `_make_state(step)` at each step (synchronously) and returns the states."""
  states = {}
  with Checkpointer(str(directory), every_steps=1, keep=10, async_save=False) as ckpt:
    for step in steps:
      states[step] = _make_state(step)
      assert ckpt.save(step, states[step], {"step": step, "examples_seen": 16 * step})
  return states


# --- round trip and save policy ------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip(tmp_path, async_save):
  state = _make_state(3)
  abstract = _same_shardings(state)
  meta = {"examples_seen": 1234, "epoch": 1, "config_fingerprint": "abc123", "nested": {"a": [1]}}
  with Checkpointer(str(tmp_path / "ckpt"), every_steps=5, keep=3,
                    async_save=async_save) as ckpt:
    assert ckpt.save(10, state, meta)
    # The train step donates the state right after saving: once `save` returns, the arrays must
    # already be copied off the devices, even while the async write is still running.
    saved = state
    state = jax.tree.map(lambda x: x.copy(), state)
    for x in jax.tree.leaves(saved):
      x.delete()
    ckpt.wait()
    assert ckpt.all_steps() == [10]
    assert ckpt.latest_step() == 10
    step, restored, restored_meta = ckpt.restore(abstract)
  assert step == 10
  assert restored_meta == meta
  _assert_states_equal(restored, state)
  assert isinstance(restored["extra"], _Extra)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
  # The restored key is usable and produces the same stream as the original.
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (3,)),
                                jax.random.uniform(state["rng"], (3,)))
  # Committed step on disk: final directory with both items and the commit marker, no tmp dirs.
  step_dir = tmp_path / "ckpt" / "10"
  assert (step_dir / "commit_success.txt").exists()
  assert (step_dir / "state").is_dir() and (step_dir / "meta").is_dir()
  assert not [p for p in (tmp_path / "ckpt").iterdir() if TMP_SUFFIX in p.name]


def test_a_run_resumes_under_another_gradient_clip(tmp_path):
  """`--config.optim.clip_norm` may change between a run and its resume (0 = no clip): the
  optimizer state saved under one setting restores into the other's, unchanged."""
  params = _make_state(0)["params"]
  hparams = lambda clip: ml_collections.ConfigDict(
      {"b1": 0.9, "b2": 0.98, "eps": 1e-6, "weight_decay": 0.01, "clip_norm": clip})
  clipped, _ = optim.make_optimizer(hparams(1.0), 1e-3, 1, 10)
  unclipped, _ = optim.make_optimizer(hparams(0.0), 1e-3, 1, 10)
  large = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  _, opt_state = clipped.update(large, clipped.init(params), params)
  # The clip acted: the first moment holds the clipped gradient, not the raw one.
  assert float(optax.tree.norm(opt_state[1][0].mu)) < 0.11  # (1 - b1) x norm 1
  with Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=1, async_save=False) as ckpt:
    assert ckpt.save(1, {"opt_state": opt_state}, {"step": 1})
    target = _same_shardings({"opt_state": unclipped.init(params)})
    step, restored, _ = ckpt.restore(target)
  assert step == 1
  _assert_states_equal(restored, {"opt_state": opt_state})
  updates, _ = unclipped.update(large, restored["opt_state"], params)
  chex.assert_tree_all_finite(updates)


def test_raw_key_data_and_explicit_step(tmp_path):
  """Raw uint32 key data (what TrainState.rng holds) round-trips as is; `step=` picks a step."""
  states = _save_steps(tmp_path, [1, 2])
  with Checkpointer(str(tmp_path), every_steps=1, keep=10) as ckpt:
    state = checkpointing.keys_to_data(states[1])
    assert state["rng"].dtype == jnp.uint32
    step, restored, meta = ckpt.restore(_same_shardings(state), step=1)
  assert (step, meta) == (1, {"step": 1, "examples_seen": 16})
  _assert_states_equal(restored, state)


def test_every_steps_keep_and_force(tmp_path):
  state = _make_state()
  with Checkpointer(str(tmp_path), every_steps=2, keep=2, async_save=True) as ckpt:
    saved = [step for step in range(1, 8) if ckpt.save(step, state, {"step": step})]
    assert saved == [2, 4, 6]
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]  # keep=2: only the newest two survive
    assert ckpt.save(7, state, {"step": 7}, force=True)  # off-interval, forced
    assert not ckpt.save(7, state, {"step": 7}, force=True)  # already saved: no-op, no error
    assert not ckpt.save(6, state, {"step": 6})  # not newer than the latest
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert ckpt.save(8, state, {"step": 8})
    ckpt.wait()
    assert ckpt.all_steps() == [7, 8]
    assert ckpt.latest_step() == 8
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [7, 8]


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError):
    Checkpointer(str(tmp_path / "a"), every_steps=0, keep=1)
  with pytest.raises(ValueError):
    Checkpointer(str(tmp_path / "b"), every_steps=1, keep=0)
  state = _make_state()
  with Checkpointer(str(tmp_path / "c"), every_steps=1, keep=1, async_save=False) as ckpt:
    with pytest.raises(TypeError, match="JSON"):
      ckpt.save(1, state, {"bad": np.float32(1.0)})
    assert ckpt.all_steps() == []
    with pytest.raises(CheckpointError, match="no checkpoint found"):
      ckpt.restore(_same_shardings(state))
    assert ckpt.save(1, state, {})
    no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    with pytest.raises(ValueError, match="sharding"):
      ckpt.restore(no_sharding)


# --- cross-mesh restore ---------------------------------------------------------------------------

def test_restore_onto_smaller_meshes(tmp_path):
  mesh8 = _mesh(8, "fsdp")
  state = _make_state(5, mesh8)
  kernel = state["params"]["dense"]["kernel"]
  assert kernel.sharding.spec == P("fsdp") and len(kernel.sharding.device_set) == 8
  assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (2, 4)
  with Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=True) as ckpt:
    assert ckpt.save(1, state, {"mesh": "fsdp=8"})

  mesh2 = _mesh(2, "data")
  targets = {
      # 2 devices, the big leaves sharded on the new axis, the rest replicated.
      "2dev_sharded": lambda path, x: NamedSharding(
          mesh2, P("data") if x.ndim >= 1 and x.shape[0] % 2 == 0 and x.ndim <= 2 else P()),
      "2dev_replicated": lambda path, x: NamedSharding(mesh2, P()),
      "1dev": lambda path, x: NamedSharding(_mesh(1, "data"), P()),
  }
  expected = jax.device_get(checkpointing.keys_to_data(state))
  for name, sharding_fn in targets.items():
    abstract = _abstract(state, sharding_fn)
    with Checkpointer(str(tmp_path), every_steps=1, keep=1) as ckpt:
      step, restored, meta = ckpt.restore(abstract)
    assert (step, meta) == (1, {"mesh": "fsdp=8"}), name
    chex.assert_trees_all_equal_structs(restored, abstract)
    for r, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
      assert r.dtype == a.dtype and r.shape == a.shape, name
      if checkpointing.is_typed_key(a):
        # JAX itself labels replicated key arrays P(None,) instead of P(); same placement.
        assert r.sharding.is_equivalent_to(a.sharding, r.ndim), (name, r.sharding, a.sharding)
      else:
        assert r.sharding == a.sharding, (name, r.sharding, a.sharding)
    chex.assert_trees_all_equal(jax.device_get(checkpointing.keys_to_data(restored)), expected)
  restored_kernel = restored["params"]["dense"]["kernel"]
  assert restored_kernel.sharding.device_set == {jax.devices()[0]}


# --- damaged and uncommitted checkpoints ------------------------------------------------------------

def _largest_data_file(step_dir):
  """The biggest array-data file of the state item (an out-of-line OCDBT chunk)."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncate_array_data": lambda step_dir: _truncate(_largest_data_file(step_dir)),
    "delete_array_data": lambda step_dir: _largest_data_file(step_dir).unlink(),
    "delete_state_manifest": lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(),
    "truncate_meta": lambda step_dir: _truncate(step_dir / "meta" / "metadata"),
}


def _big_state(seed):
  """Large enough (256 KiB of incompressible floats) that array data lives in its own files."""
  return {"w": jax.random.normal(jax.random.key(seed), (256, 256), jnp.float32),
          "step": jnp.asarray(seed, jnp.int32), "rng": jax.random.key(seed)}


# When one shard read fails, orbax abandons the other pending reads; their coroutines report the
# same tensorstore error again when garbage-collected. Harmless noise of the failure being tested.
_ABANDONED_READS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ABANDONED_READS
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back(tmp_path, caplog, damage):
  with Checkpointer(str(tmp_path), every_steps=1, keep=5, async_save=False) as ckpt:
    for step in (1, 2):
      assert ckpt.save(step, _big_state(step), {"step": step})
  DAMAGE[damage](tmp_path / "2")

  abstract = _same_shardings(_big_state(0))
  with Checkpointer(str(tmp_path), every_steps=1, keep=5) as ckpt:
    assert ckpt.latest_step() == 2  # still listed: it is committed, just damaged
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
      step, restored, meta = ckpt.restore(abstract)
    assert (step, meta) == (1, {"step": 1})
    _assert_states_equal(restored, _big_state(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name == checkpointing.__name__]
    assert len(warnings) == 1, warnings
    assert "step 2" in warnings[0] and str(tmp_path / "2") in warnings[0]
    # Asking for the damaged step explicitly is an error naming it; no silent fallback.
    with pytest.raises(CheckpointError, match=f"step 2 at {tmp_path / '2'}"):
      ckpt.restore(abstract, step=2)
  gc.collect()  # report the abandoned reads here, where they are filtered


@_ABANDONED_READS
def test_all_checkpoints_damaged_raises(tmp_path, caplog):
  with Checkpointer(str(tmp_path), every_steps=1, keep=5, async_save=False) as ckpt:
    for step in (1, 2):
      assert ckpt.save(step, _big_state(step), {"step": step})
  DAMAGE["truncate_array_data"](tmp_path / "2")
  DAMAGE["delete_array_data"](tmp_path / "1")
  with Checkpointer(str(tmp_path), every_steps=1, keep=5) as ckpt:
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
      with pytest.raises(CheckpointError, match=str(tmp_path)):
        ckpt.restore(_same_shardings(_big_state(0)))
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "step 2" in messages and "step 1" in messages
  gc.collect()  # report the abandoned reads here, where they are filtered


def test_uncommitted_tmp_checkpoint_is_not_latest(tmp_path):
  """A step whose save crashed before its commit (tmp dir, no rename) is neither listed nor used."""
  states = _save_steps(tmp_path, [1, 2])
  # A fully written but never committed step 3, as a crash just before the rename leaves it.
  tmp_step = tmp_path / f"3{TMP_SUFFIX}-1700000000"
  shutil.copytree(tmp_path / "2", tmp_step)
  (tmp_step / "commit_success.txt").unlink()
  # And a half-written one.
  half = tmp_path / f"4{TMP_SUFFIX}-1700000001"
  shutil.copytree(tmp_path / "2", half)
  shutil.rmtree(half / "meta")
  with Checkpointer(str(tmp_path), every_steps=1, keep=10) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.latest_step() == 2
    step, restored, _ = ckpt.restore(_same_shardings(states[2]))
    assert step == 2
    _assert_states_equal(restored, states[2])
    # The next save is not confused by the leftovers, and they are cleaned up.
    assert ckpt.save(3, states[2], {"step": 3})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]
  assert not [p for p in tmp_path.iterdir() if TMP_SUFFIX in p.name]


def test_crash_before_commit_leaves_no_complete_looking_step(tmp_path, monkeypatch):
  """Make orbax's commit (rename) fail after all data is written: the step must not appear."""
  states = _save_steps(tmp_path, [1])

  async def crash(self):
    raise OSError("simulated crash before commit")

  monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", crash)
  with Checkpointer(str(tmp_path), every_steps=1, keep=10, async_save=True) as ckpt:
    assert ckpt.save(2, _make_state(2), {"step": 2})
    with pytest.raises(Exception, match="simulated crash"):
      ckpt.wait()
  monkeypatch.undo()
  leftovers = [p for p in tmp_path.iterdir() if TMP_SUFFIX in p.name]
  assert leftovers and not (tmp_path / "2").exists()
  with Checkpointer(str(tmp_path), every_steps=1, keep=10) as ckpt:
    assert ckpt.all_steps() == [1]
    step, restored, _ = ckpt.restore(_same_shardings(states[1]))
  assert step == 1
  _assert_states_equal(restored, states[1])


def test_commit_file_protocol_as_on_gcs(tmp_path, monkeypatch):
  """On gs:// orbax writes steps in place and commits with commit_success.txt (no atomic rename
  there). Force that protocol on a local directory: a step directory without the marker -- what a
  crash mid-save leaves on GCS -- is neither listed nor restored."""
  commit_file = ocp.path.atomicity.CommitFileTemporaryPath
  for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
    monkeypatch.setattr(ocp.path.atomicity_defaults, name, lambda *a, **k: commit_file)
  states = _save_steps(tmp_path, [1, 2])
  assert (tmp_path / "2" / "commit_success.txt").exists()
  assert not [p for p in tmp_path.iterdir() if TMP_SUFFIX in p.name]  # written in place
  shutil.copytree(tmp_path / "2", tmp_path / "3")
  (tmp_path / "3" / "commit_success.txt").unlink()
  with Checkpointer(str(tmp_path), every_steps=1, keep=10) as ckpt:
    assert ckpt.all_steps() == [1, 2]
    step, restored, _ = ckpt.restore(_same_shardings(states[2]))
    assert step == 2
    _assert_states_equal(restored, states[2])
    # The uncommitted directory is cleaned up, so step 3 can be saved for real.
    assert ckpt.save(3, states[1], {"step": 3})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2, 3]
    step, restored, meta = ckpt.restore(_same_shardings(states[1]))
  assert (step, meta) == (3, {"step": 3})
  _assert_states_equal(restored, states[1])


# --- several hosts --------------------------------------------------------------------------------

_TWO_HOST_WORKER = r'''
import json, logging, sys
pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from deberta_jax.runtime.checkpointing import Checkpointer

warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("deberta_jax.runtime.checkpointing").addHandler(handler)

mesh = Mesh(np.array(jax.devices()), ("fsdp",))  # 2 processes x 4 devices
sharded, replicated = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())

def values(step):
  return np.random.default_rng(step).standard_normal((1024, 128)).astype(np.float32)

def state(step):
  v = values(step)
  return {"w": jax.make_array_from_callback(v.shape, sharded, lambda index: v[index]),
          "rng": jax.jit(lambda: jax.random.key(step), out_shardings=replicated)()}

with Checkpointer(directory, every_steps=1, keep=5, async_save=False) as ckpt:
  for step in (1, 2):
    assert ckpt.save(step, state(step), {"step": step})
multihost_utils.sync_global_devices("saved")
if pid == 1:  # damage a shard that only process 1 reads
  import pathlib
  files = sorted(pathlib.Path(directory, "2", "state", "ocdbt.process_1", "d").iterdir(),
                 key=lambda p: p.stat().st_size)
  files[-1].write_bytes(files[-1].read_bytes()[:100])
multihost_utils.sync_global_devices("damaged")

abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state(0))
with Checkpointer(directory, every_steps=1, keep=5) as ckpt:
  step, restored, meta = ckpt.restore(abstract)
expected = values(step)
ok = all(np.array_equal(np.asarray(s.data), expected[s.index])
         for s in restored["w"].addressable_shards)
print("RESULT " + json.dumps({"pid": pid, "step": step, "meta": meta, "values_ok": ok,
                              "warnings": warnings}), flush=True)
'''


@pytest.mark.slow
def test_two_hosts_fall_back_together(tmp_path):
  """A shard damaged on one host only: both hosts skip that step and resume from the same one
  (orbax's own restore would leave the healthy host waiting at its final barrier)."""
  worker = tmp_path / "worker.py"
  worker.write_text(_TWO_HOST_WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, str(worker), str(pid), str(port),
                             str(tmp_path / "ckpt")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in (0, 1)]
  results = {}
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=180)
      assert proc.returncode == 0, out[-3000:]
      line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
      result = json.loads(line[len("RESULT "):])
      results[result["pid"]] = result
  finally:
    for proc in procs:  # a hung host must not outlive the test
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for pid in (0, 1):
    assert results[pid]["step"] == 1 and results[pid]["meta"] == {"step": 1}, results[pid]
    assert results[pid]["values_ok"], results[pid]
    assert len(results[pid]["warnings"]) == 1 and "step 2" in results[pid]["warnings"][0]
  assert "another host" in results[0]["warnings"][0]

"""Checkpoints of the training state: a thin wrapper around `orbax.checkpoint.CheckpointManager`.

Layout (one directory per step, local or `gs://`)::

    {directory}/{step}/state/   the pytree of jax.Arrays (params, opt state, step, RNG key data);
                                saved with StandardSave, so every host writes only its own shards
                                (OCDBT, one `ocdbt.process_<i>` sub-store per host) and nothing is
                                ever gathered to host 0.
    {directory}/{step}/meta/    a small JSON dict (data-pipeline position, config fingerprint,
                                git SHA, timing counters), written by the primary host.

Why a wrapper at all: the training loop needs four things orbax leaves to the caller, and we want
them written once, tested, and identical in every trainer:
  1. restore *onto the current run's shardings* (a checkpoint written on 8 devices restores onto
     2 or 1) -- the caller passes an abstract state of `jax.ShapeDtypeStruct`s with shardings, and
     a leaf without a sharding is rejected up front instead of failing obscurely inside orbax;
  2. fall back to the previous checkpoint when the newest one cannot be read, consistently on
     all hosts (see "Damage");
  3. typed PRNG keys (see "Random keys");
  4. a fixed, non-deprecated orbax configuration: a `handler_registry` (not the deprecated
     `item_names`), `save_decision_policy` / `preservation_policy` (not the deprecated
     `max_to_keep`), async saves.

Atomicity (verified against orbax-checkpoint 0.12.8, `_src/path/atomicity.py`): a save first
writes everything into a temporary location and only then marks the step as complete, so a crash
mid-save never leaves a step that looks finished:
  * local / POSIX paths (orbax's AUTO mode -> `AtomicRenameTemporaryPath`): the step is written to
    `{directory}/{step}.orbax-checkpoint-tmp-<n>/`; when every host has finished, the primary host
    writes `commit_success.txt` into it and renames it to `{directory}/{step}/` (an atomic rename).
    A directory whose name contains `.orbax-checkpoint-tmp` is never listed as a step.
  * `gs://` (AUTO -> `CommitFileTemporaryPath`, because GCS has no atomic directory rename): the
    step is written in place to `{directory}/{step}/` and `commit_success.txt` is written last; a
    step directory without that file is never listed as a step.
Leftover temporary directories from a crashed run are deleted when the next `Checkpointer` is
created (`cleanup_tmp_directories=True`). tests/test_checkpointing.py checks that a leftover
temporary step is neither listed nor restored.

Damage (verified with orbax-checkpoint 0.12.8 by truncating, deleting and bit-flipping every file
of a saved step in turn, then restoring it onto explicit shardings):
  * orbax/tensorstore raise by themselves when a referenced array-data file (OCDBT `d/<hash>`,
    in `state/` or `state/ocdbt.process_<i>/`) is truncated or deleted; when the root
    `state/manifest.ocdbt` is truncated, deleted or garbled; when a b-tree node file is garbled
    (OCDBT nodes and manifests carry checksums: DATA_LOSS); and when `meta/metadata` is damaged in
    any way or `state/_METADATA` / `state/array_metadatas/*` are truncated or garbled.
  * damage that does not matter is ignored and the values restore exactly: `_sharding`,
    `_CHECKPOINT_METADATA`, the `commit_success.txt` files, the per-host manifests already merged
    into the root store, and a deleted `_METADATA` / `array_metadatas` (the target gives shapes,
    dtypes and shardings).
  * NOT detected: a bit flip inside a large out-of-line chunk (zstd frames without a checksum):
    the restore "succeeds" with wrong numbers. Catching that would need checksums of the array
    contents, which this module does not add.
What this module adds: any error raised while restoring a step (orbax's, or a `meta` that is not
a JSON object) marks that step as unusable; `restore(step=None)` logs a warning naming the step
and its path and tries the next older one, and raises `CheckpointError` when none is left. With
several hosts, each host reads only its own shards, so a damaged shard may fail on some hosts
only. `CheckpointManager.restore` would then leave the healthy hosts waiting at its closing
barrier, which the failed host never reaches; we therefore read through the item handlers (no
barrier) and follow every attempt with one agreement collective that all hosts reach, and accept
a step only if it was read everywhere, so hosts never hang and never resume from different steps
(tested with two processes in tests/test_checkpointing.py).

Random keys: typed key arrays (`jax.random.key`) are stored as their raw key data
(`jax.random.key_data`, uint32 with a trailing key dimension) and wrapped back with the key dtype
of the abstract target (`jax.random.wrap_key_data(..., dtype=...)`). This keeps the on-disk format
a plain integer array that any orbax version, and tools that read checkpoints without jax's key
types, can read, instead of depending on the PRNG-key support that only recent orbax versions
have. A state that already holds raw key data (uint32, e.g. `TrainState.rng`) needs nothing.

Readers: tools that only read a run (export, analysis, fine-tuning from a pre-training workdir)
use `committed_steps` and `load_params`, never `Checkpointer`. Creating the orbax manager creates
the directory and deletes temporary step directories, which in a workdir that is still training
are the trainer's save in progress; the readers list and read the step directories and nothing
else.

Nothing happens at import time; the orbax manager is created in `Checkpointer.__init__`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any, Callable

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from deberta_jax import errors

logger = logging.getLogger(__name__)

STATE = "state"
META = "meta"


class CheckpointError(errors.BadInput):
  """No restorable checkpoint: none saved, the requested step is unreadable, or all are."""




@dataclasses.dataclass
class KeepPermanentAndNewest:
  """Orbax preservation policy: the newest checkpoint, whatever it is, plus the newest `keep`
  permanent ones. Checkpoints that are not permanent (time-based, or written on preemption)
  live only until a newer checkpoint is committed."""

  keep: int
  is_permanent: Callable[[int], bool]

  def should_preserve(self, checkpoints, *, context=None) -> list[bool]:  # pylint: disable=unused-argument
    steps = [int(c.step) for c in checkpoints]
    permanent = [s for s in steps if self.is_permanent(s)]
    kept = set(sorted(permanent)[-self.keep:])
    if steps:
      kept.add(max(steps))
    return [s in kept for s in steps]


def is_typed_key(x: Any) -> bool:
  """True for a typed PRNG key array or an abstract one (`dtype` is a `key<impl>` dtype)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
  """Replaces every typed PRNG key array in `tree` by its raw key data (uint32)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_typed_key(x) else x, tree)


def _key_data_target(leaf: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  """The abstract key data of an abstract typed key, on the key's sharding.

  Key data has the key's shape plus one trailing, never-sharded dimension, so the key's sharding
  (a NamedSharding whose spec does not name that trailing dimension) is valid for it as is.
  """
  data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
  return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)


def data_to_keys(tree: Any, abstract_tree: Any) -> Any:
  """Wraps key data in `tree` back into typed keys wherever `abstract_tree` has a typed key.

  The keys stay where the data was restored (the target sharding). JAX spells the sharding of a
  replicated key array of rank >= 1 as `P(None,)` rather than `P()` (it does so for
  `jax.device_put` of keys too); the two are equivalent (`Sharding.is_equivalent_to`).
  """
  return jax.tree.map(
      lambda x, a: jax.random.wrap_key_data(x, dtype=a.dtype) if is_typed_key(a) else x,
      tree, abstract_tree)


def _to_restore_target(abstract_state: Any) -> Any:
  """Checks that every leaf carries a sharding and turns typed keys into abstract key data.

  Restoring without target shardings makes orbax fall back to the shardings stored in the
  checkpoint, i.e. to the *saving* run's devices, which fails or misplaces arrays as soon as the
  mesh changed (orbax#648, #986). We refuse that up front, naming the offending leaf.
  """
  def convert(path, leaf):
    sharding = getattr(leaf, "sharding", None)
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype") or sharding is None:
      raise ValueError(
          f"abstract_state{jax.tree_util.keystr(path)} must be a jax.ShapeDtypeStruct (or "
          f"jax.Array) with a sharding on the current mesh; got {leaf!r}")
    leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return _key_data_target(leaf) if is_typed_key(leaf) else leaf

  return jax.tree_util.tree_map_with_path(convert, abstract_state)


def _all_processes_agree(ok: bool) -> bool:
  """True iff `ok` on every process (one small collective; a no-op on a single process).

  Each host reads only its own shards, so a damaged shard may fail on some hosts only; all hosts
  must then reject the step together, or they would resume from different steps.
  """
  if jax.process_count() == 1:
    return ok
  with jax.transfer_guard("allow"):
    flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))
  return bool(np.all(np.asarray(flags)))


def _describe(error: BaseException, max_chars: int = 300) -> str:
  """First line of an error and of its causes, e.g. orbax's wrapper plus tensorstore's reason."""
  parts, seen = [], set()
  while error is not None and id(error) not in seen and len(parts) < 3:
    seen.add(id(error))
    first_line = (str(error).splitlines() or [""])[0][:max_chars]
    parts.append(f"{type(error).__name__}: {first_line}")
    error = error.__cause__ or error.__context__
  return " <- ".join(parts)


class Checkpointer:
  """Periodic, async, sharded checkpoints of (state, meta) with fallback on damaged steps.

  Args:
    directory: root directory, local or `gs://...`; created if missing (primary host).
    every_steps: `save(step)` writes when `step % every_steps == 0` (or when forced, or when JAX's
      preemption notice reached this step -- see `reached_preemption`).
    keep: how many of the newest checkpoints to keep; older ones are deleted after each save.
      With `is_permanent`, only permanent steps count towards `keep`, and any other step is kept
      only while it is the newest (time-based and preemption checkpoints).
    async_save: write in a background thread after the device->host copy (`save` returns once
      the arrays are copied off the devices); `wait()` blocks until the write is committed.

  Must be created and called on every host (orbax synchronises hosts internally). Not
  thread-safe, like the orbax manager it wraps. Use as a context manager or call `close()`.
  """

  def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True,
               is_permanent: Callable[[int], bool] | None = None):
    if every_steps < 1:
      raise ValueError(f"every_steps must be >= 1, got {every_steps}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = epath.Path(directory)
    self.every_steps = int(every_steps)
    self.keep = int(keep)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, handler, save_args, restore_args in (
        (STATE, ocp.StandardCheckpointHandler, ocp.args.StandardSave, ocp.args.StandardRestore),
        (META, ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore)):
      registry.add(item, save_args, handler)
      registry.add(item, restore_args, handler)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Exactly "every N steps" (without orbax's default InitialSavePolicy, which would also
        # save whatever step comes first), plus orbax's preemption policy so that a preempted
        # job saves the step at which all hosts agreed to stop.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(self.every_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=(policies.LatestN(self.keep) if is_permanent is None else
                             KeepPermanentAndNewest(self.keep, is_permanent)),
        enable_async_checkpointing=async_save,
        create=True,
        # Delete temporary step directories left behind by a run that crashed mid-save.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    # Restores go through the item handlers directly, not `CheckpointManager.restore`: orbax's
    # restore ends in a global barrier that a host whose read failed never reaches, so on several
    # hosts one damaged shard would hang the others there. The handlers have no barrier; we
    # follow each read with one agreement collective that every host always reaches.
    self._state_reader = ocp.StandardCheckpointHandler()
    self._meta_reader = ocp.JsonCheckpointHandler()

  # --- saving -----------------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Saves (state, meta) as checkpoint `step` if it is due; returns whether a save started.

    Due means `step % every_steps == 0` and `step` is newer than the latest checkpoint, or
    `force=True` (any step not yet saved; forcing a step that already exists, e.g. the final step
    that was also a periodic one, returns False instead of raising). Call it on every host every
    step; the decision is cheap and identical on all hosts. With `async_save` the write continues
    in the background; the previous write is awaited before a new one starts.
    """
    step = int(step)
    if not isinstance(meta, dict):
      raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    try:  # Fail here, in the caller's thread, not later in the background writer.
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      raise TypeError(f"meta must be JSON-serialisable: {e}") from e
    # Decide before touching `state` (converting keys dispatches device work); orbax's own
    # re-check of the same decision is then skipped with force=True.
    if not force and not self._manager.should_save(step):
      return False
    if step in self.all_steps():
      logger.info("Checkpoint for step %d already exists in %s; not saving it again.", step,
                  self.directory)
      return False
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(keys_to_data(state)),
                                 META: ocp.args.JsonSave(meta)})
    with self._writing(step):
      return bool(self._manager.save(step, args=args, force=True))

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turns any failure of a write (this one, or an async one surfacing now) into a
    errors.CheckpointWriteError that says which checkpoint is still good. Orbax writes into a temporary
    directory and commits last, so a failed write never looks complete."""
    try:
      yield
    except errors.CheckpointWriteError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      try:
        good = self.all_steps()
      except Exception:  # pylint: disable=broad-except
        good = []
      kept = (f"the newest complete checkpoint is step {good[-1]}, and a restart resumes from it"
              if good else "no complete checkpoint exists yet")
      what = f"step {step}" if step is not None else "a checkpoint"
      raise errors.CheckpointWriteError(
          f"writing {what} to {self.directory} failed ({_describe(e)}); {kept}") from e

  def reached_preemption(self, step: int) -> bool:
    """True on every host once JAX's preemption notice has reached `step`.

    `save` already writes that step; the training loop should then `wait()` and exit cleanly so
    the launcher restarts it.
    """
    return bool(self._manager.reached_preemption(step))

  def wait(self) -> None:
    """Blocks until the in-flight async save (if any) is committed; a failed write raises
    errors.CheckpointWriteError."""
    with self._writing(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases orbax's threads (also when the
    pending write failed; its errors.CheckpointWriteError is raised after the release)."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except  # the write error above is the news
        logger.warning("closing the checkpoint manager after a failed write also failed")
      self._state_reader.close()
      self._meta_reader.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --- listing ----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (temporary / uncommitted step directories are never listed)."""
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest committed step, or None. It may still be damaged; `restore` then falls back."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> epath.Path:
    """Directory of checkpoint `step` (orbax's default step naming: the bare step number)."""
    return self.directory / str(int(step))

  # --- restoring --------------------------------------------------------------------------------

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """Restores (step, state, meta), placing every array on the sharding in `abstract_state`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (or arrays) with the *target* shardings,
        e.g. NamedShardings on the current mesh; typed-key leaves get typed keys back.
      step: the step to restore; None means the newest restorable one: a damaged newest step is
        skipped with a warning naming it and its path, and the previous one is tried.

    Raises:
      CheckpointError: no checkpoint in the directory, the given `step` cannot be restored, or
        (step=None) no step can be restored; the message names the directory and the last error
        is chained.
      ValueError: `abstract_state` has a leaf without a sharding.
    """
    target = _to_restore_target(abstract_state)
    self._manager.wait_until_finished()  # never read a step that is still being written
    if step is not None:
      step = int(step)
      state, meta, error = self._try_restore(step, target)
      if error is not None:
        raise CheckpointError(f"cannot restore checkpoint step {step} at {self.step_path(step)} "
                              f"(directory {self.directory}): {_describe(error)}") from error
      return step, data_to_keys(state, abstract_state), meta

    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    error = None
    for i, candidate in enumerate(reversed(steps)):
      state, meta, error = self._try_restore(candidate, target)
      if error is None:
        return candidate, data_to_keys(state, abstract_state), meta
      logger.warning(
          "Checkpoint step %d at %s could not be restored; treating it as incomplete or "
          "damaged and %s: %s", candidate, self.step_path(candidate),
          "falling back to the previous checkpoint" if i + 1 < len(steps) else
          "no older checkpoint is left", _describe(error))
    raise CheckpointError(
        f"no restorable checkpoint in {self.directory}: steps {steps} all failed to restore "
        f"(incomplete or damaged, or not matching abstract_state); last error: "
        f"{_describe(error)}") from error

  def _try_restore(self, step: int, target: Any) -> tuple[Any, Any, Exception | None]:
    """Reads one step on this host; (state, meta, None) only if every host read it."""
    def read(path):
      state = self._state_reader.restore(path / STATE, args=ocp.args.StandardRestore(target))
      meta = self._meta_reader.restore(path / META, args=ocp.args.JsonRestore())
      if not isinstance(meta, dict):
        raise ValueError(f"meta of step {step} is {type(meta).__name__}, not a JSON object")
      return state, meta
    result, error = _read_everywhere(self.directory, step, self.all_steps(), read)
    return (None, None, error) if error is not None else (*result, None)


# --- reading without a manager ------------------------------------------------------------------

def committed_steps(directory: str | epath.Path) -> list[int]:
  """Steps with a complete checkpoint in `directory`, ascending; only lists the directory (a
  missing one has none), so it is safe on a workdir that is still training."""
  return sorted(int(s) for s in ocp.path.step.checkpoint_steps(epath.Path(directory)))


def _read_everywhere(directory: epath.Path, step: int, steps: list[int],
                     read: Callable[[epath.Path], Any]) -> tuple[Any, Exception | None]:
  """read(step directory) on this host; (value, None) only if every host read its part."""
  path = epath.Path(directory) / str(int(step))
  try:
    if step not in steps:
      raise FileNotFoundError(f"no committed checkpoint for step {step} at {path}")
    value = read(path)
  except Exception as e:  # pylint: disable=broad-except
    _all_processes_agree(False)
    return None, e
  if not _all_processes_agree(True):
    return None, RuntimeError(f"step {step} could not be read on another host")
  return value, None


def load_params(workdir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, parameters as numpy arrays) of the checkpoint `step` of a training workdir (local or
  gs://), or of its newest readable one (a damaged newest step is skipped with a warning, as
  `restore` does).

  Read-only: it lists `workdir/checkpoints` and reads one step's parameters, and never creates,
  renames or deletes anything there, so it may run beside the trainer. The parameters' shapes come
  from the checkpoint itself, so neither the model nor the optimizer needs to be rebuilt, and only
  the `params` subtree is read (not the optimizer moments, twice its size); the mesh that wrote
  them does not matter. Every array is restored whole onto one local CPU device, so nothing is
  gathered from other hosts' devices: a run sharded over many hosts is read by one process.

  Raises:
    CheckpointError: no complete checkpoint, or `step` (or, with step=None, every step) cannot
      be read; the message names the directory.
  """
  directory = epath.Path(workdir) / "checkpoints"
  steps = committed_steps(directory)
  if not steps:
    raise CheckpointError(f"no checkpoint found in {directory}")
  host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

  def read(path):
    handler = ocp.PyTreeCheckpointHandler()
    try:
      stored = handler.metadata(path / STATE).tree
      if not isinstance(stored, dict) or "params" not in stored:
        raise ValueError(f"{path / STATE} holds no 'params' (not a training state)")
      target = {"params": jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), stored["params"])}
      restore_args = jax.tree.map(
          lambda s: ocp.ArrayRestoreArgs(sharding=host, global_shape=s.shape, dtype=s.dtype),
          target)
      restored = handler.restore(path / STATE, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
    finally:
      handler.close()
    return jax.tree.map(np.asarray, restored["params"])

  candidates = [int(step)] if step is not None else list(reversed(steps))
  error = None
  for i, candidate in enumerate(candidates):
    params, error = _read_everywhere(directory, candidate, steps, read)
    if error is None:
      return candidate, params
    if step is None:
      logger.warning("Checkpoint step %d in %s could not be read (%s); %s", candidate, directory,
                     _describe(error), "trying the previous one" if i + 1 < len(candidates)
                     else "no older checkpoint is left")
  if step is not None:
    raise CheckpointError(f"cannot read checkpoint step {step} in {directory}: "
                          f"{_describe(error)}") from error
  raise CheckpointError(f"no readable checkpoint in {directory}: steps {steps} all failed "
                        f"(incomplete or damaged); last error: {_describe(error)}") from error

"""The pre-training work directory: its layout, the trainer's checks and writes, and the one
read-only way every tool (export, analyze, finetune, the study) loads a run from it.

  WORKDIR/config.json    the run's full config (provenance; readers rebuild the model from it)
  WORKDIR/run.json       the model fingerprint: a workdir holding another model shape is refused
  WORKDIR/spm.model      the SentencePiece model the run used
  WORKDIR/checkpoints/   orbax checkpoints (runtime/checkpointing.py)

Local paths and object stores (gs://) alike.
"""

from __future__ import annotations

import json
import os

from etils import epath
import ml_collections

from deberta_jax import config as config_lib
from deberta_jax import errors
from deberta_jax.data import storage
from deberta_jax.models.rtd import RTDModel
from deberta_jax.runtime import checkpointing
from deberta_jax.paths import is_remote

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
SPM_FILE = "spm.model"
CHECKPOINTS = "checkpoints"


def check(config, workdir: str) -> None:
  """Refuses a workdir that cannot be used, without creating or changing anything in it.

  A workdir holding a run of a different model shape is refused (never overwritten); so is a
  path that is a file, or one that cannot be written (checked on the nearest existing parent
  when it does not exist yet). The directory is created only once the data checks have passed.
  """
  if not is_remote(workdir):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise errors.WorkdirError(f"--workdir {workdir} exists and is not a directory")
    existing = workdir
    while not os.path.exists(existing):
      existing = os.path.dirname(os.path.abspath(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
      raise errors.WorkdirError(
          f"--workdir {workdir} is not writable ({existing} does not allow writes)")
  path = epath.Path(workdir) / RUN_FILE
  if path.exists():
    try:
      previous = json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError) as e:
      raise errors.WorkdirError(
          f"{path} is unreadable or not a JSON object ({e}); it does not look like a "
          "deberta_jax run. Use another --workdir.") from e
    fingerprint = config_lib.model_fingerprint(config)
    if previous != fingerprint:
      raise errors.WorkdirError(
          f"{workdir} holds a run with a different model ({previous}); this config has "
          f"{fingerprint}. Use another --workdir.")


def write_run_files(config, workdir: str, tokenizer) -> None:
  """config.json (provenance), run.json (model fingerprint) and the spm model used."""
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_FILE).write_text(config_lib.to_json(config))
  run_path = root / RUN_FILE
  if not run_path.exists():
    run_path.write_text(json.dumps({"fingerprint": config_lib.model_fingerprint(config)},
                                   indent=2))
  spm_path = root / SPM_FILE
  same = (not is_remote(workdir) and
          os.path.abspath(tokenizer.model_path or "") == os.path.abspath(str(spm_path)))
  if tokenizer.model_path and not same:
    spm_path.write_bytes(epath.Path(tokenizer.model_path).read_bytes())


def is_pretraining_workdir(path: str) -> bool:
  """config.json with a 'model' section, and a checkpoints/ directory (local or gs://)."""
  config_path = storage.join(path, CONFIG_FILE)
  try:
    if not (storage.isfile(config_path) and storage.isdir(storage.join(path, CHECKPOINTS))):
      return False
    return "model" in json.loads(storage.read_bytes(config_path))
  except (OSError, ValueError, TypeError):
    return False


def spm_model(workdir: str) -> str | None:
  """The run's SentencePiece model (a path or gs:// URL), if it has one."""
  path = storage.join(workdir, SPM_FILE)
  return path if storage.isfile(path) else None


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a pre-training workdir's run was started with (its config.json)."""
  return ml_collections.ConfigDict(json.loads(storage.read_bytes(storage.join(workdir,
                                                                             CONFIG_FILE))))


def load(workdir: str, step: int | None = None):
  """(run config, RTDModel, params as numpy, restored step) of a pre-training workdir.

  Read-only (checkpointing.load_params): the run may still be training. Restores on this
  machine whatever mesh trained the run.
  """
  if not is_pretraining_workdir(workdir):
    raise errors.WorkdirError(f"{workdir} is not a pre-training workdir (needs config.json with "
                              f"a 'model' section and checkpoints/)")
  config = read_config(workdir)
  try:
    restored_step, params = checkpointing.load_params(workdir, step)
  except checkpointing.CheckpointError as e:
    raise errors.WorkdirError(str(e)) from e
  return config, RTDModel.from_config(config), params, int(restored_step)

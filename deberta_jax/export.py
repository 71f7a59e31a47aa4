"""Export a pre-training workdir as Hugging Face DebertaV2 directories.

  python -m deberta_jax.export --workdir=DIR --out=HF_DIR [--step=N]

writes HF_DIR/discriminator (word embedding E_D = E_G + E_delta under GDES, computed fresh from
the checkpoint, RTD head under `mask_predictions.*`) and HF_DIR/generator (DebertaV2ForMaskedLM
layout; the EMD's absolute position table is kept under the key transformers ignores), each with
the run's spm.model. Restores on one device of this machine whatever mesh trained the run.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Pre-training workdir to export.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the HF model directories.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, step: int | None = None) -> dict[str, str]:
  """Writes out/{generator,discriminator}; returns their paths."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from deberta_jax import checkpointing, hf, train  # pylint: disable=import-outside-toplevel
  from deberta_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from deberta_jax.rtd import RTDModel  # pylint: disable=import-outside-toplevel

  config_path = os.path.join(workdir, train.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise hf.CheckpointError(f"{config_path} not found: {workdir} is not a pre-training workdir")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = RTDModel(config)
  _, params = checkpointing.load_params(workdir, step)  # read-only: the run may still be training
  spm = os.path.join(workdir, train.SPM_FILE)
  spm = spm if os.path.isfile(spm) else None
  mask_id = Tokenizer(spm).mask_id if spm else None
  paths = {"generator": os.path.join(out, "generator"),
           "discriminator": os.path.join(out, "discriminator")}
  hf.save_pretrained(paths["generator"], model.generator_config, params["generator"], spm, mask_id)
  hf.save_pretrained(paths["discriminator"], model.discriminator_config,
                     jax.device_get(model.export_discriminator_params(params)), spm, mask_id)
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from deberta_jax import checkpointing, hf  # pylint: disable=import-outside-toplevel
  try:
    paths = export(_WORKDIR.value, _OUT.value, _STEP.value)
  except (hf.CheckpointError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for name, path in paths.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)

"""Export a pre-training workdir as Hugging Face DebertaV2 directories.

  python -m deberta_jax.export --workdir=DIR --out=HF_DIR [--step=N]

writes HF_DIR/discriminator (word embedding E_D = E_G + E_delta under GDES, computed fresh from
the checkpoint, RTD head under `mask_predictions.*`) and HF_DIR/generator (DebertaV2ForMaskedLM
layout; the EMD's absolute position table is kept under the key transformers ignores), each with
the run's spm.model. Restores on one device of this machine whatever mesh trained the run (the
checkpoint's parameters are read whole, never gathered from devices, so a run sharded over many
hosts exports from one). DIR and HF_DIR may be local or gs:// (a pod trains into gs://); a gs://
HF_DIR is written locally first, then uploaded file by file.
"""

from __future__ import annotations

from absl import flags
import jax

from deberta_jax import cli
from deberta_jax import hf
from deberta_jax import workdir as workdir_lib
from deberta_jax.data import storage
from deberta_jax.data.spm import Tokenizer

_WORKDIR = flags.DEFINE_string("workdir", None, "Pre-training workdir to export.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the HF model directories.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, step: int | None = None) -> dict[str, str]:
  """Writes out/{generator,discriminator}; returns their paths."""

  _, model, params, _ = workdir_lib.load(workdir, step)  # read-only: it may still be training
  spm = workdir_lib.spm_model(workdir)
  mask_id = Tokenizer(spm).mask_id if spm else None
  paths = {"generator": storage.join(out, "generator"),
           "discriminator": storage.join(out, "discriminator")}
  hf.save_pretrained(paths["generator"], model.generator_config, params["generator"], spm, mask_id)
  hf.save_pretrained(paths["discriminator"], model.discriminator_config,
                     jax.device_get(model.export_discriminator_params(params)), spm, mask_id)
  return paths


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name, path in export(_WORKDIR.value, _OUT.value, _STEP.value).items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  cli.run(main)

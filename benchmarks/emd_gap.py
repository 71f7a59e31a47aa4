"""How far transformers' DebertaV2ForMaskedLM is from the trained generator (README).

  python benchmarks/emd_gap.py --workdir=/tmp/deberta_tiny

transformers has no Enhanced Mask Decoder: its MLM head reads the last encoder layer directly,
while the generator re-runs its last layer with absolute positions added (EMD). This exports the
workdir's generator, masks the first held-out batches exactly as the run's evaluation does, and
prints the MLM loss and accuracy of both on the same masked pieces, and the largest logit gap.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers

from deberta_jax import export
from deberta_jax import workdir as workdir_lib
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.pretraining import evaluation
from deberta_jax.pretraining import train_step as ts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--batches", type=int, default=4)
  args = parser.parse_args()
  config, model, params, step = workdir_lib.load(args.workdir)
  config = ml_collections.ConfigDict(config)
  pipeline = pipeline_lib.make_pipeline(config)
  tok = pipeline.tokenizer
  tokens = ts.SpecialTokens.of(tok)
  with tempfile.TemporaryDirectory() as out:
    hf_dir = export.export(args.workdir, out)["generator"]
    torch_model = transformers.DebertaV2ForMaskedLM.from_pretrained(hf_dir).eval()
    sums = {"ours_loss": 0.0, "ours_correct": 0.0, "hf_loss": 0.0, "hf_correct": 0.0,
            "count": 0.0, "max_logit_gap": 0.0}
    size = pipeline_lib.eval_batch_size(config)
    for i in range(args.batches):
      batch = evaluation.held_out_batch(pipeline, i, size)
      masked, logits, _, _ = evaluation.corrupt(model, config, tokens, params, batch,
                                                evaluation.eval_key(config.seed))
      ours = np.asarray(logits).reshape(logits.shape[0], logits.shape[1], -1)[..., :tok.mask_id]
      with torch.no_grad():
        full = torch_model(torch.tensor(np.asarray(masked.input_ids)),
                           attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
      positions = np.asarray(masked.positions)
      theirs = np.take_along_axis(full, positions[..., None], axis=1)[..., :tok.mask_id]
      labels, weights = np.asarray(masked.labels), np.asarray(masked.weights)
      for name, value in (("ours", ours), ("hf", theirs)):
        log_probs = jax.nn.log_softmax(jnp.asarray(value, jnp.float32), axis=-1)
        nll = -np.take_along_axis(np.asarray(log_probs), labels[..., None], axis=-1)[..., 0]
        sums[f"{name}_loss"] += float((nll * weights).sum())
        sums[f"{name}_correct"] += float(((value.argmax(-1) == labels) * weights).sum())
      gap = np.abs(ours - theirs).max(axis=-1)
      sums["max_logit_gap"] = max(sums["max_logit_gap"], float((gap * weights).max()))
      sums["count"] += float(weights.sum())
  n = sums["count"]
  print(json.dumps({
      "workdir": os.path.abspath(args.workdir), "step": step, "masked_pieces": int(n),
      "generator_mlm_loss": round(sums["ours_loss"] / n, 4),
      "transformers_mlm_loss": round(sums["hf_loss"] / n, 4),
      "generator_mlm_accuracy": round(sums["ours_correct"] / n, 4),
      "transformers_mlm_accuracy": round(sums["hf_correct"] / n, 4),
      "max_logit_gap": round(sums["max_logit_gap"], 3)}))


if __name__ == "__main__":
  main()

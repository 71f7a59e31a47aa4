"""Analyses of a pre-training workdir.

  python -m deberta_jax.analyze embeddings --workdir=DIR [--step=N] [--sample_fraction=0.1]
      [--seed=0]

  python -m deberta_jax.analyze heldout --workdir=DIR [--step=N] [--num_batches=0]

DIR may be local or gs:// (workdir.load reads both).

`embeddings` computes the paper's Table 1 metric: the average cosine similarity over every pair of
a random sample (10%) of the vocabulary's word pieces, for

  E_G      the generator's word embedding;
  E_D      the discriminator's effective table: E_G itself under ES, its own table under NES,
           stop_gradient(E_G) + E_delta under GDES (what fine-tuning starts from);
  E_delta  GDES only: the discriminator's residual.

The sample is drawn from the spm pieces other than [PAD] [CLS] [SEP] [UNK] ([MASK] and the spare
rows that pad the table are never part of it); the same rows are used for every table. Rows of
zero norm (e.g. E_delta of a piece that never occurred in training) have no direction and are
left out of that table's average; how many rows were used is reported. The all-pairs mean is
exact and costs O(nH): with unit rows u_i, the mean of the off-diagonal entries of the Gram matrix
is (||sum_i u_i||^2 - n) / (n (n - 1)).

`heldout` runs the run's held-out evaluation (pretraining/evaluation.py: losses, AUC and the
discriminator's feature health) on a checkpoint, over `num_batches` held-out batches; 0, the
default, reads every whole batch the held-out shards hold. The evaluation during training reads
`config.eval.num_batches` (8 in configs/tiny.py: 256 rows), which keeps it cheap but measures the
effective rank from a sample covariance of 256 rows in H dimensions: a few rows per dimension
spread the sample spectrum, which lowers its entropy. Reading the whole held-out set gives the
number with less of that bias; with the run's own `num_batches` it repeats the logged
evaluation exactly (each row is masked and sampled with a key of its own number).

The last line printed is one JSON object with every number, for scripts.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from absl import flags
import numpy as np

from deberta_jax import cli
from deberta_jax import errors
from deberta_jax import workdir as workdir_lib
from deberta_jax.data.spm import Tokenizer
from deberta_jax.models.rtd import DELTA

_FLAGS = {}


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module claims no flag names."""
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None,
                                          "Pre-training workdir (config.json, checkpoints/).")
  _FLAGS["step"] = flags.DEFINE_integer("step", None,
                                        "Checkpoint step (default: the newest good one).")
  _FLAGS["sample_fraction"] = flags.DEFINE_float("sample_fraction", 0.1,
                                                 "Fraction of the vocabulary sampled.")
  _FLAGS["seed"] = flags.DEFINE_integer("seed", 0, "Seed of the vocabulary sample.")
  _FLAGS["num_batches"] = flags.DEFINE_integer(
      "num_batches", 0, "heldout: held-out batches to evaluate (0: every whole batch held out).")

NUM_SPECIAL = 4   # [PAD] [CLS] [SEP] [UNK] are ids 0..3


# ------------------------------------------------------------------------------------- the metric

def average_cosine_similarity(table) -> tuple[float, int]:
  """(mean cosine similarity over all pairs i != j of the rows, rows used); zero rows left out."""
  x = np.asarray(table, np.float64)
  norms = np.linalg.norm(x, axis=1)
  keep = norms > 1e-12 * max(1.0, float(norms.max(initial=0.0)))
  u = x[keep] / norms[keep, None]
  n = u.shape[0]
  if n < 2:
    return float("nan"), n
  total = u.sum(axis=0)
  return float((np.dot(total, total) - n) / (n * (n - 1))), n


def sample_rows(num_pieces: int, fraction: float, seed: int) -> np.ndarray:
  """Sorted ids of a uniform sample (without replacement) of the non-special word pieces."""
  if not 0 < fraction <= 1:
    raise errors.BadInput(f"sample_fraction={fraction} must be in (0, 1]")
  candidates = np.arange(NUM_SPECIAL, num_pieces)
  if candidates.size < 2:
    raise errors.BadInput(f"a vocabulary of {num_pieces} pieces has fewer than 2 word pieces")
  size = max(2, int(round(fraction * candidates.size)))
  return np.sort(np.random.default_rng(seed).choice(candidates, size, replace=False))


def embedding_tables(params: Mapping[str, Any], sharing: str) -> dict[str, np.ndarray]:
  """{'E_G', 'E_D'[, 'E_delta']} of a pre-training tree {'generator': ..., 'discriminator': ...}."""
  e_g = np.asarray(params["generator"]["embeddings"]["word_embeddings"], np.float32)
  disc = params["discriminator"]
  if sharing == "es":
    return {"E_G": e_g, "E_D": e_g}
  if sharing == "nes":
    return {"E_G": e_g, "E_D": np.asarray(disc["embeddings"]["word_embeddings"], np.float32)}
  if sharing == "gdes":
    delta = np.asarray(disc[DELTA]["word_embeddings"], np.float32)
    return {"E_G": e_g, "E_D": e_g + delta, "E_delta": delta}
  raise ValueError(f"unknown embedding_sharing {sharing!r}")


def embedding_similarities(params: Mapping[str, Any], sharing: str, num_pieces: int,
                           fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
  """Table 1's numbers for one parameter tree: {'E_G', 'E_D'[, 'E_delta'], 'sample_size',
  'rows_used'}."""
  rows = sample_rows(num_pieces, fraction, seed)
  out: dict[str, Any] = {"sample_size": int(rows.size), "rows_used": {}}
  for name, table in embedding_tables(params, sharing).items():
    value, used = average_cosine_similarity(table[rows])
    out[name] = value
    out["rows_used"][name] = used
  return out


# ----------------------------------------------------------------------------- reading a workdir



def num_pieces_of(workdir: str, config) -> int:
  """Word pieces of the run's spm model; without one, the embedding rows minus one ([MASK])."""
  spm = workdir_lib.spm_model(workdir)
  if spm:
    return Tokenizer(spm).num_pieces
  return int(config.model.vocab_size) - 1


def analyze_embeddings(workdir: str, step: int | None = None, fraction: float = 0.1,
                       seed: int = 0) -> dict[str, Any]:
  """Table 1's numbers for the checkpoint `step` (default: the newest) of a pre-training workdir."""
  config, _, params, restored = workdir_lib.load(workdir, step)
  return embeddings_report(workdir, config, params, restored, fraction, seed)


def embeddings_report(workdir: str, config, params, restored: int, fraction: float = 0.1,
                      seed: int = 0) -> dict[str, Any]:
  """`analyze_embeddings` of an already restored workdir (`workdir.load`'s values)."""
  sharing = config.model.embedding_sharing
  result = embedding_similarities(params, sharing, num_pieces_of(workdir, config), fraction, seed)
  return {"workdir": workdir, "step": restored, "embedding_sharing": sharing,
          "sample_fraction": fraction, "seed": seed, **result}


def format_table(result: Mapping[str, Any]) -> str:
  names = [n for n in ("E_G", "E_D", "E_delta") if n in result]
  lines = [f"average cosine similarity, {result['sample_size']} sampled word pieces "
           f"({100 * result['sample_fraction']:g}% of the vocabulary, seed {result['seed']}), "
           f"step {result['step']}",
           "| sharing | " + " | ".join(names) + " |",
           "| --- | " + " | ".join("---" for _ in names) + " |",
           f"| {result['embedding_sharing']} | " +
           " | ".join(f"{result[n]:.4f}" for n in names) + " |"]
  return "\n".join(lines)


def heldout_report(workdir: str, step: int | None = None, num_batches: int = 0) -> dict:
  """The held-out evaluation of checkpoint `step` (default: the newest) of a pre-training
  workdir over `num_batches` batches of the run's evaluation batch size (0: all whole batches).

  Reads the run's own data (its config.json names the corpus and cache) and runs on this
  machine's devices with the run's mesh settings; the numbers do not depend on the mesh.
  """
  # Imported here: the embedding analysis needs none of the training stack.
  import jax  # pylint: disable=import-outside-toplevel
  from deberta_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from deberta_jax.data import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import train  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import train_step as ts  # pylint: disable=import-outside-toplevel
  from deberta_jax.runtime import sharding  # pylint: disable=import-outside-toplevel

  if num_batches < 0:
    raise errors.BadInput(f"num_batches={num_batches} must be >= 0 (0: every held-out batch)")
  config, model, params, restored = workdir_lib.load(workdir, step)
  if not int(config.eval.every_steps):
    raise errors.BadInput(f"{workdir} was trained with config.eval.every_steps=0: it holds no "
                          "rows out, so there is no held-out set to evaluate on")
  pipeline = pipeline_lib.make_pipeline(config)
  batch_size = pipeline_lib.eval_batch_size(config)
  whole = pipeline.holdout_rows // batch_size
  if not whole:
    raise errors.BadInput(f"the {pipeline.holdout_rows} held-out rows of {workdir} make no "
                          f"whole evaluation batch of {batch_size}")
  config.eval.num_batches = num_batches or whole
  mesh = sharding.make_mesh(config)
  config_lib.check_eval_batch(config, sharding.data_parallel_size(mesh), 1)
  shardings = train.state_shardings(model, ts.make_optimizers(config), config, mesh)
  evaluate = train.make_evaluator(model, config, ts.SpecialTokens.of(pipeline.tokenizer),
                                  pipeline, shardings, sharding.batch_sharding(mesh), 0)
  metrics = evaluate(jax.device_put(params, shardings.params))
  return {"workdir": workdir, "step": restored, "num_batches": int(config.eval.num_batches),
          "rows": int(config.eval.num_batches) * batch_size,
          "holdout_rows": int(pipeline.holdout_rows), **metrics}


def main(argv):
  command = argv[1] if len(argv) == 2 else ""
  if command not in ("embeddings", "heldout"):
    raise cli.app.UsageError(
        "usage: python -m deberta_jax.analyze embeddings --workdir=DIR [--step=N] "
        "[--sample_fraction=0.1] [--seed=0]\n"
        "       python -m deberta_jax.analyze heldout --workdir=DIR [--step=N] [--num_batches=0]")
  if not _FLAGS["workdir"].value:
    raise cli.app.UsageError("--workdir is required")
  if command == "heldout":
    result = heldout_report(_FLAGS["workdir"].value, _FLAGS["step"].value,
                            _FLAGS["num_batches"].value)
    print(f"step {result['step']}, {result['rows']} of {result['holdout_rows']} held-out rows: " +
          " ".join(f"{k}={v:.4g}" for k, v in result.items() if k.startswith("eval_")))
  else:
    result = analyze_embeddings(_FLAGS["workdir"].value, _FLAGS["step"].value,
                                _FLAGS["sample_fraction"].value, _FLAGS["seed"].value)
    print(format_table(result))
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

"""Analyses of a pre-training workdir.

  python -m deberta_jax.analyze embeddings --workdir=DIR [--step=N] [--sample_fraction=0.1]
      [--seed=0]

  python -m deberta_jax.analyze heldout --workdir=DIR [--step=N] [--num_batches=0]

  python -m deberta_jax.analyze layers --workdir=DIR [--step=N] [--num_batches=0]

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

`layers` says where a low `eval_disc_effective_rank` comes from. On the same held-out rows (clean
text, as fine-tuning sees it) it measures the mean-pooled features after the embedding layer and
after every layer of the discriminator: effective rank, the top principal component's share of
the variance and the mean cosine between rows, the last stage being exactly what the evaluation
logs. For the last layer's top components it also gives the correlation, over the rows, of each
row's score on the component with the discriminator's mean logit on that row (its own verdict of
how much of the row was replaced), as |r|. A component with |r| near 1 is the RTD signal itself: the
features spend that variance on the pre-training task rather than collapsing onto an
uninformative direction. A rank that is already low after the embedding layer comes from the word
embedding (under ES and GDES shared with the generator), not from the layers.

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
      "num_batches", 0, "heldout, layers: held-out batches to read (0: every whole batch held "
      "out).")

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


def spread(pooled: np.ndarray) -> dict[str, float]:
  """Effective rank (as the evaluation logs it), top component's share of the variance and mean
  cosine between rows, of features [N, H]."""
  from deberta_jax.pretraining import evaluation  # pylint: disable=import-outside-toplevel
  x = np.asarray(pooled, np.float64)
  centred = x - x.mean(axis=0)
  covariance = centred.T @ centred / len(x)
  eig = np.clip(np.linalg.eigvalsh(covariance), 0.0, None)
  cosine, _ = average_cosine_similarity(x)
  return {"effective_rank": evaluation.effective_rank(covariance),
          "top_share": float(eig.max() / eig.sum()) if eig.sum() > 0 else float("nan"),
          "mean_cosine": cosine}


def top_components(pooled: np.ndarray, row_logits: np.ndarray, count: int = 3) -> list[dict]:
  """The `count` largest principal components of features [N, H]: share of the variance and the
  absolute correlation over rows of each row's score with `row_logits` [N] (a component's sign is
  arbitrary, so is that of the correlation)."""
  x = np.asarray(pooled, np.float64)
  centred = x - x.mean(axis=0)
  _, singular, directions = np.linalg.svd(centred, full_matrices=False)
  shares = singular ** 2 / (singular ** 2).sum()
  logits = np.asarray(row_logits, np.float64)
  out = []
  for k in range(min(count, len(singular))):
    scores = centred @ directions[k]
    out.append({"share": float(shares[k]),
                "abs_corr_with_mean_logit": abs(float(np.corrcoef(scores, logits)[0, 1]))})
  return out


def layers_report(workdir: str, step: int | None = None, num_batches: int = 0) -> dict:
  """`layers` (module docstring) for checkpoint `step` (default: the newest) over `num_batches`
  held-out batches of the run's evaluation batch size (0: every whole batch). Runs on the first
  local device, one held-out batch at a time."""
  import jax  # pylint: disable=import-outside-toplevel
  from deberta_jax.models import Discriminator  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining.evaluation import mean_pool  # pylint: disable=import-outside-toplevel

  config, model, params, restored = workdir_lib.load(workdir, step)
  pipeline, batch_size, num_batches = _held_out(workdir, config, num_batches)

  def forward(params, input_ids, attention_mask):
    logits, states = model.discriminator.apply(
        {"params": params["discriminator"]}, input_ids, attention_mask,
        model.discriminator_table(params), method=Discriminator.hidden_states)
    return ([mean_pool(s, attention_mask) for s in states],
            mean_pool(logits, attention_mask))

  forward = jax.jit(forward)
  params = jax.device_put(params)
  pooled, row_logits = [], []
  for index in range(num_batches):
    batch = pipeline.holdout_batch(index, batch_size)
    features, logits = jax.device_get(forward(params, batch["input_ids"],
                                              batch["attention_mask"]))
    pooled.append(features)
    row_logits.append(logits)
  stages = [np.concatenate([p[i] for p in pooled]) for i in range(len(pooled[0]))]
  names = ["embeddings"] + [f"layer {i}" for i in range(1, len(stages))]
  return {"workdir": workdir, "step": restored, "num_batches": num_batches,
          "rows": num_batches * batch_size, "holdout_rows": int(pipeline.holdout_rows),
          "stages": [{"stage": n, **spread(s)} for n, s in zip(names, stages)],
          "last_layer_components": top_components(stages[-1], np.concatenate(row_logits))}


def format_layers(result: Mapping[str, Any]) -> str:
  lines = [f"discriminator features of {result['rows']} held-out rows (clean text, mean-pooled), "
           f"step {result['step']}",
           "| after | effective rank | top component | mean cosine |",
           "| --- | --- | --- | --- |"]
  lines += [f"| {s['stage']} | {s['effective_rank']:.2f} | {100 * s['top_share']:.1f}% | "
            f"{s['mean_cosine']:.3f} |" for s in result["stages"]]
  lines.append("last layer's top components: share of the variance, |correlation| of the rows' "
               "scores with the discriminator's mean logit on the row")
  lines += [f"  PC{k + 1}: {100 * c['share']:.1f}%, |r| = {c['abs_corr_with_mean_logit']:.2f}"
            for k, c in enumerate(result["last_layer_components"])]
  return "\n".join(lines)


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


def _held_out(workdir: str, config, num_batches: int):
  """(pipeline, evaluation batch size, batches to read) of a run's held-out rows; refuses a run
  that held none out and a negative count."""
  from deberta_jax.data import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  if num_batches < 0:
    raise errors.BadInput(f"num_batches={num_batches} must be >= 0 (0: every held-out batch)")
  if not int(config.eval.every_steps):
    raise errors.BadInput(f"{workdir} was trained with config.eval.every_steps=0: it holds no "
                          "rows out, so there is no held-out set to evaluate on")
  pipeline = pipeline_lib.make_pipeline(config)
  batch_size = pipeline_lib.eval_batch_size(config)
  whole = pipeline.holdout_rows // batch_size
  if not whole:
    raise errors.BadInput(f"the {pipeline.holdout_rows} held-out rows of {workdir} make no "
                          f"whole evaluation batch of {batch_size}")
  return pipeline, batch_size, num_batches or whole


def heldout_report(workdir: str, step: int | None = None, num_batches: int = 0) -> dict:
  """The held-out evaluation of checkpoint `step` (default: the newest) of a pre-training
  workdir over `num_batches` batches of the run's evaluation batch size (0: all whole batches).

  Reads the run's own data (its config.json names the corpus and cache) and runs on this
  machine's devices with the run's mesh settings; the numbers do not depend on the mesh.
  """
  # Imported here: the embedding analysis needs none of the training stack.
  import jax  # pylint: disable=import-outside-toplevel
  from deberta_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import train  # pylint: disable=import-outside-toplevel
  from deberta_jax.pretraining import train_step as ts  # pylint: disable=import-outside-toplevel
  from deberta_jax.runtime import sharding  # pylint: disable=import-outside-toplevel

  config, model, params, restored = workdir_lib.load(workdir, step)
  pipeline, batch_size, config.eval.num_batches = _held_out(workdir, config, num_batches)
  mesh = sharding.make_mesh(config)
  config_lib.check_eval_batch(config, sharding.data_parallel_size(mesh), 1)
  shardings = train.state_shardings(model, ts.make_optimizers(config), config, mesh)
  evaluate = train.make_evaluator(model, config, ts.SpecialTokens.of(pipeline.tokenizer),
                                  pipeline, shardings, sharding.batch_sharding(mesh), 0)
  metrics = evaluate(jax.device_put(params, shardings.params), restored)
  return {"workdir": workdir, "step": restored, "num_batches": int(config.eval.num_batches),
          "rows": int(config.eval.num_batches) * batch_size,
          "holdout_rows": int(pipeline.holdout_rows), **metrics}


def main(argv):
  command = argv[1] if len(argv) == 2 else ""
  if command not in ("embeddings", "heldout", "layers"):
    raise cli.app.UsageError(
        "usage: python -m deberta_jax.analyze embeddings --workdir=DIR [--step=N] "
        "[--sample_fraction=0.1] [--seed=0]\n"
        "       python -m deberta_jax.analyze heldout --workdir=DIR [--step=N] [--num_batches=0]\n"
        "       python -m deberta_jax.analyze layers --workdir=DIR [--step=N] [--num_batches=0]")
  if not _FLAGS["workdir"].value:
    raise cli.app.UsageError("--workdir is required")
  if command == "heldout":
    result = heldout_report(_FLAGS["workdir"].value, _FLAGS["step"].value,
                            _FLAGS["num_batches"].value)
    print(f"step {result['step']}, {result['rows']} of {result['holdout_rows']} held-out rows: " +
          " ".join(f"{k}={v:.4g}" for k, v in result.items() if k.startswith("eval_")))
  elif command == "layers":
    result = layers_report(_FLAGS["workdir"].value, _FLAGS["step"].value,
                           _FLAGS["num_batches"].value)
    print(format_layers(result))
  else:
    result = analyze_embeddings(_FLAGS["workdir"].value, _FLAGS["step"].value,
                                _FLAGS["sample_fraction"].value, _FLAGS["seed"].value)
    print(format_table(result))
  print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

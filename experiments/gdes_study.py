"""The GDES study at small scale: DeBERTaV3's Figure 2, Table 1 and Table 2 with one command.

  python experiments/gdes_study.py --workdir=/tmp/gdes_study --glue_dir=../shared/data/glue \
      [--steps=2000 --hidden=256 --layers=4 ...] [--out=docs/gdes_study.md]

For every embedding-sharing mode (es, nes, gdes) and seed it pre-trains the same model on the same
corpus for the same number of steps (`deberta_jax.pretraining.train.run`; ES with the joint loss, NES/GDES
with the two-stage update, as the paper's Figure 1), then

  * reads the generator's MLM loss curve from the run's metrics.jsonl (Figure 2: mean over seeds
    with a min/max band, as a PNG when matplotlib is importable, and always as a table);
  * runs the embedding analysis (`deberta_jax.analyze`: Table 1's average cosine similarity of a
    10% sample of the vocabulary for E_G, E_D and E_delta);
  * fine-tunes the discriminator on each GLUE task of --tasks from --glue_dir
    (`deberta_jax.finetune`: Table 2's analogue, best dev epoch);

and writes --out (markdown: setup, commands, hardware, wall time, the three tables, the orderings
as measured next to the paper's), the plot next to it (<out stem>_mlm_loss.png) and every number
as JSON (<out stem>.json). `--render_only` rewrites the markdown from that JSON.

Runs are resumable: rerunning the same command continues unfinished pre-training runs from their
checkpoints and skips finished ones and fine-tunings whose results.json is complete. Compiled
programs are cached on disk (<workdir>/jax_cache), so only the first of the nine identical
pre-training programs pays for compilation. Sizes and steps are flags: the defaults are a GPU-sized
study (minutes on one H100); see docs/gdes_study.md for the CPU command.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from absl import app
from absl import flags
from absl import logging
from flax.linen import meta
import jax
import numpy as np

from configs import finetune as finetune_configs
from configs import tiny
from deberta_jax import analyze
from deberta_jax import cli
from deberta_jax import workdir as workdir_lib
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.finetune import train as finetune
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import train
from deberta_jax.runtime import checkpointing
from deberta_jax.runtime import metrics

_OUT = flags.DEFINE_string("out", os.path.join(REPO, "docs", "gdes_study.md"),
                           "Markdown report; the PNG and JSON are written next to it.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/gdes_study", "Root of every run of the study.")
_GLUE_DIR = flags.DEFINE_string(
    "glue_dir", os.path.join(os.path.dirname(REPO), "shared", "data", "glue"),
    "Directory of GLUE TSV files (<dir>/SST-2/train.tsv ...); '' or missing: no Table 2.")
_MODES = flags.DEFINE_list("modes", ["es", "nes", "gdes"], "Embedding-sharing modes.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Pre-training seeds (one run per mode).")
_TASKS = flags.DEFINE_list("tasks", ["sst2", "cola", "rte"], "GLUE tasks to fine-tune on.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Only rewrite --out from its JSON.")

# Pre-training.
_STEPS = flags.DEFINE_integer("steps", 2000, "Pre-training steps of every run.")
_BATCH = flags.DEFINE_integer("batch", 64, "Pre-training global batch (sequences).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Pre-training sequence length.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Hidden size (generator and discriminator).")
_LAYERS = flags.DEFINE_integer("layers", 4, "Discriminator layers (the generator has half).")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_FFN = flags.DEFINE_integer("intermediate", 0, "FFN size (0 = 4 x hidden).")
_SPM_VOCAB = flags.DEFINE_integer("spm_vocab", 4000, "SentencePiece pieces trained on the corpus.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak pre-training learning rate.")
_WARMUP = flags.DEFINE_float("warmup", 0.1, "Warmup as a fraction of --steps.")
_LAMBDA = flags.DEFINE_float("rtd_lambda", 50.0, "RTD loss weight (paper 50).")
_DROPOUT = flags.DEFINE_float("dropout", 0.1, "Hidden and attention dropout in pre-training "
                               "(0 helps very short CPU runs).")
_DTYPE = flags.DEFINE_string("dtype", "",
                             "Compute dtype; '' = bfloat16 on GPU/TPU, float32 on CPU.")
_CORPUS = flags.DEFINE_string("corpus", "embedded",
                              "'embedded' (stdlib docstrings, no download) or a text-file glob.")
_SPLIT_BLANK = flags.DEFINE_bool("split_on_blank_lines", False, "With a text-file --corpus: one "
                                 "document per blank-line-separated block instead of per file.")
_EMBEDDED_BYTES = flags.DEFINE_integer("embedded_max_bytes", 8_000_000,
                                       "Size cap of the embedded corpus.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 0, "Metric interval in steps (0 = steps/50).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Corpus/spm/token cache ('' = <workdir>/cache).")

# Analysis and fine-tuning.
_FRACTION = flags.DEFINE_float("sample_fraction", 0.1, "Vocabulary fraction sampled for Table 1.")
_FT_EPOCHS = flags.DEFINE_integer("ft_epochs", 3, "Fine-tuning epochs (best dev epoch kept).")
_FT_BATCH = flags.DEFINE_integer("ft_batch", 32, "Fine-tuning batch size.")
_FT_LR = flags.DEFINE_float("ft_lr", 1e-4, "Fine-tuning peak learning rate.")
_FT_SEQ = flags.DEFINE_integer("ft_seq_len", 128, "Fine-tuning max_seq_length.")
_FT_MAX_TRAIN = flags.DEFINE_integer("ft_max_train", 20000,
                                     "Training examples per task (0 = all; SST-2 has 60k).")
_FT_MAX_EVAL = flags.DEFINE_integer("ft_max_eval", 0, "Dev examples per task (0 = all).")

PAPER = {
    "table1": {"es": {"E_G": 0.02, "E_D": 0.02}, "nes": {"E_G": 0.45, "E_D": 0.02},
               "gdes": {"E_G": 0.45, "E_D": 0.29, "E_delta": 0.02}},
    "table2": {"es": "88.8/88.4, 86.3/83.5", "nes": "88.3/87.9, 85.3/82.7",
               "gdes": "89.3/89.0, 87.2/84.5"},
}
TASK_METRIC = {"sst2": "accuracy", "cola": "Matthews corr.", "rte": "accuracy", "mrpc": "F1/acc",
               "qqp": "F1/acc", "stsb": "Pearson/Spearman", "mnli": "accuracy (matched)",
               "qnli": "accuracy", "wnli": "accuracy"}


# ------------------------------------------------------------------------------------- configs

def _dtype() -> str:
  if _DTYPE.value:
    return _DTYPE.value
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def pretrain_config(mode: str, seed: int):
  c = tiny.get_config()
  c.seed = seed
  c.num_train_steps = _STEPS.value
  c.global_batch_size = _BATCH.value
  c.seq_len = _SEQ_LEN.value
  c.model.embedding_sharing = mode
  c.model.hidden_size = _HIDDEN.value
  c.model.num_layers = _LAYERS.value
  c.model.num_heads = _HEADS.value
  c.model.intermediate_size = _FFN.value or 4 * _HIDDEN.value
  c.model.vocab_size = tokenizer_lib.recommended_vocab_size(_SPM_VOCAB.value)
  c.model.dtype = _dtype()
  c.model.hidden_dropout = c.model.attention_dropout = _DROPOUT.value
  c.data.spm_vocab_size = _SPM_VOCAB.value
  if _CORPUS.value == "embedded":
    c.data.source = "embedded"
    c.data.embedded_max_bytes = _EMBEDDED_BYTES.value
  else:
    c.data.source = "text_files"
    c.data.text_files = _CORPUS.value
    c.data.split_on_blank_lines = _SPLIT_BLANK.value
  c.data.cache_dir = _CACHE_DIR.value or os.path.join(_WORKDIR.value, "cache")
  c.optim.learning_rate = _LR.value
  c.optim.warmup_steps = int(round(_WARMUP.value * _STEPS.value))
  c.rtd.rtd_lambda = _LAMBDA.value
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1   # small model: pure data parallelism
  c.ckpt.every_steps = _STEPS.value                    # one checkpoint, at the end
  c.ckpt.keep = 1
  c.ckpt.async_save = False
  c.log.every_steps = _LOG_EVERY.value or max(1, _STEPS.value // 50)
  return c


def finetune_config(task: str, init: str, seed: int):
  c = finetune_configs.get_config()
  c.task = task
  c.init = init
  c.glue_dir = _GLUE_DIR.value
  c.seed = seed
  c.num_epochs = _FT_EPOCHS.value
  c.batch_size = _FT_BATCH.value
  c.learning_rate = _FT_LR.value
  c.max_seq_length = _FT_SEQ.value
  c.max_train_examples = _FT_MAX_TRAIN.value
  c.max_eval_examples = _FT_MAX_EVAL.value
  c.model_dtype = _dtype()
  c.log_every_steps = 100
  return c


# ----------------------------------------------------------------------------------------- runs

def _pretrain(mode: str, seed: int, workdir: str) -> dict:
  config = pretrain_config(mode, seed)
  done = config.num_train_steps in checkpointing.committed_steps(
      os.path.join(workdir, "checkpoints"))
  start = time.time()
  if not done:
    logging.info("pre-training %s seed %d -> %s", mode, seed, workdir)
    train.run(config, workdir)
  records = metrics.read_metrics(workdir)
  curve = {key: [[r["step"], r[key]] for r in records if key in r]
           for key in ("mlm_loss", "rtd_loss", "mlm_accuracy", "rtd_accuracy")}
  speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
  return {"workdir": workdir, "wall_time_s": None if done else time.time() - start,
          "curve": curve, "tokens_per_second": float(sorted(speeds)[len(speeds) // 2])
          if speeds else None}


def _finetune(task: str, init, seed: int, out: str) -> dict:
  config = finetune_config(task, init.path, seed)
  path = os.path.join(out, finetune.RESULTS_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get("config") == config.to_dict() and len(previous["epochs"]) == config.num_epochs:
      return previous
  return finetune.run(config, out, init)


def _model_sizes(config) -> dict:
  model = RTDModel.from_config(config)
  shapes = meta.unbox(jax.eval_shape(lambda k: model.init(k, 8), jax.random.key(0)))
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  return {"generator_params": count(shapes["generator"]),
          "discriminator_params": count(shapes["discriminator"]),
          "generator_layers": model.generator_config.num_layers}


def _corpus_info(config) -> dict:
  pipe = pipeline_lib.make_pipeline(config, 0, 1)
  return {"name": pipe.corpus_name, "pieces": int(pipe.num_chunks * pipe.seq_len),
          "rows": int(pipe.num_chunks)}


def _hardware() -> dict:
  devices = jax.devices()
  return {"backend": jax.default_backend(), "devices": len(devices),
          "device_kind": devices[0].device_kind, "cpu_count": os.cpu_count(),
          "host": platform.platform(), "jax": jax.__version__}


def run_study() -> dict:
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  seeds = [int(s) for s in _SEEDS.value]
  glue_dir = _GLUE_DIR.value if _GLUE_DIR.value and os.path.isdir(_GLUE_DIR.value) else ""
  if not glue_dir:
    logging.warning("--glue_dir=%r is not a directory: no fine-tuning (Table 2)", _GLUE_DIR.value)
  started = time.time()
  first = pretrain_config(_MODES.value[0], seeds[0])
  study = {
      "command": "python experiments/gdes_study.py " + " ".join(shlex.quote(a)
                                                                for a in sys.argv[1:]),
      "flags": {h.name: h.value for h in globals().values() if isinstance(h, flags.FlagHolder)},
      "hardware": _hardware(),
      "pretrain_config": json.loads(first.to_json()),
      "model": _model_sizes(first),
      "modes": list(_MODES.value), "seeds": seeds, "tasks": list(_TASKS.value) if glue_dir else [],
      "glue_dir": glue_dir, "runs": {}, "phase_time_s": {"pretrain": 0.0, "analysis": 0.0,
                                                         "finetune": 0.0},
  }
  for mode in _MODES.value:
    for seed in seeds:
      name = f"{mode}_s{seed}"
      workdir = os.path.join(root, name)
      t0 = time.time()
      run = _pretrain(mode, seed, workdir)
      t1 = time.time()
      run_config, model, params, step = workdir_lib.load(workdir)   # restored once
      run["analysis"] = analyze.embeddings_report(workdir, run_config, params, step,
                                                  _FRACTION.value, 0)
      init = finetune.init_from_workdir(workdir, run_config, model, params, step)
      del params
      t2 = time.time()
      run["finetune"] = {}
      for task in study["tasks"]:
        result = _finetune(task, init, seed, os.path.join(workdir, f"ft_{task}"))
        run["finetune"][task] = {"best": result["best"], "epochs": result["epochs"],
                                 "wall_time_s": result.get("wall_time_s"),
                                 "train_examples": result["train_examples"],
                                 "eval_examples": result["eval_examples"]}
      t3 = time.time()
      study["phase_time_s"]["pretrain"] += t1 - t0
      study["phase_time_s"]["analysis"] += t2 - t1
      study["phase_time_s"]["finetune"] += t3 - t2
      study["runs"][name] = {"mode": mode, "seed": seed, **run}
      logging.info("%s done: pre-train %.0fs, analysis %s, fine-tune %.0fs", name, t1 - t0,
                   {k: round(run["analysis"][k], 4) for k in ("E_G", "E_D", "E_delta")
                    if k in run["analysis"]}, t3 - t2)
      if name == f"{_MODES.value[0]}_s{seeds[0]}":
        study["corpus"] = _corpus_info(first)
  study["wall_time_s"] = time.time() - started
  return study


# ----------------------------------------------------------------------------------- the report

def _stats(values):
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return None
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _fmt(s, digits=3, scale=1.0):
  if s is None:
    return "-"
  text = f"{scale * s['mean']:.{digits}f}"
  if s["n"] > 1:
    text += (f" ± {scale * s['std']:.{digits}f} "
             f"[{scale * s['min']:.{digits}f}, {scale * s['max']:.{digits}f}]")
  return text


def _by_mode(study):
  out = {}
  for run in study["runs"].values():
    out.setdefault(run["mode"], []).append(run)
  return {m: out[m] for m in study["modes"] if m in out}


def _curves(study):
  """{mode: (steps, per-seed values [seeds, steps])} of the MLM loss at the common logged steps."""
  out = {}
  for mode, runs in _by_mode(study).items():
    series = [dict((int(s), v) for s, v in run["curve"]["mlm_loss"]) for run in runs]
    steps = sorted(set.intersection(*(set(s) for s in series)))
    out[mode] = (steps, np.asarray([[s[k] for k in steps] for s in series]))
  return out


def summarize(study) -> dict:
  """Per-mode statistics over seeds of every number the report shows."""
  by_mode = _by_mode(study)
  curves = _curves(study)
  summary = {"convergence": {}, "final_mlm": {}, "table1": {}, "table2": {}}
  for mode, (steps, values) in curves.items():
    if steps:
      summary["convergence"][mode] = _stats(values.mean(axis=1))   # each seed's mean over the run
      summary["final_mlm"][mode] = _stats(values[:, -1])
  for mode, runs in by_mode.items():
    for key in ("E_G", "E_D", "E_delta"):
      s = _stats([r["analysis"].get(key) for r in runs])
      if s:
        summary["table1"].setdefault(key, {})[mode] = s
    if study["tasks"]:
      per_seed = []
      for task in study["tasks"]:
        scores = []
        for r in runs:
          best = r["finetune"][task]["best"]
          split = next(k for k in best if isinstance(best[k], dict))   # dev / dev_matched
          scores.append(best[split]["score"])
        summary["table2"].setdefault(task, {})[mode] = _stats(scores)
        per_seed.append(scores)
      summary["table2"].setdefault("mean", {})[mode] = _stats(np.mean(per_seed, axis=0))
  return summary


def _order(stats: dict, higher_first=True, digits=3, scale=1.0) -> str:
  """'GDES 0.29 > NES 0.02 = ES 0.02' from {mode: stats}; '=' where the shown values are equal."""
  items = sorted(((s["mean"], k) for k, s in stats.items() if s), reverse=higher_first)
  text = ""
  for i, (value, mode) in enumerate(items):
    shown = f"{scale * value:.{digits}f}"
    if i:
      previous = f"{scale * items[i - 1][0]:.{digits}f}"
      text += " = " if shown == previous else (" > " if higher_first else " < ")
    text += f"{mode.upper()} {shown}"
  return text


def _claim(claim, a, b, label_a, label_b, a_greater: bool, digits=3, scale=1.0):
  """(claim, measured, verdict): does a > b (or a < b) hold, and by more than the seed spread?"""
  if not a or not b:
    return None
  holds = a["mean"] > b["mean"] if a_greater else a["mean"] < b["mean"]
  measured = (f"{label_a} {_fmt(a, digits, scale).split(' [')[0]} vs {label_b} "
              f"{_fmt(b, digits, scale).split(' [')[0]}")
  verdict = "yes" if holds else "no"
  if a["n"] > 1 and b["n"] > 1 and abs(a["mean"] - b["mean"]) <= a["std"] + b["std"]:
    # A difference inside the spread over seeds reproduces nothing, in either direction.
    verdict = ("not resolved: within the seed spread (the means lean the paper's way)" if holds
               else "not resolved: within the seed spread (the means lean against the paper)")
  return claim, measured, verdict


def paper_checks(summary) -> list:
  conv, t1, t2 = summary["convergence"], summary["table1"], summary["table2"]
  e_g, e_d, delta = t1.get("E_G", {}), t1.get("E_D", {}), t1.get("E_delta", {})
  mean = t2.get("mean", {})
  rows = [
      _claim("NES converges faster than ES (Fig. 2: lower MLM loss)", conv.get("nes"),
             conv.get("es"), "NES", "ES", False),
      _claim("GDES converges faster than ES (Fig. 2)", conv.get("gdes"), conv.get("es"), "GDES",
             "ES", False),
      _claim("E_G is more self-similar under NES than under ES (Table 1: 0.45 vs 0.02)",
             e_g.get("nes"), e_g.get("es"), "NES", "ES", True),
      _claim("NES: E_G more self-similar than E_D (0.45 vs 0.02)", e_g.get("nes"), e_d.get("nes"),
             "E_G", "E_D", True),
      _claim("GDES: E_D less self-similar than E_G (0.29 vs 0.45)", e_d.get("gdes"),
             e_g.get("gdes"), "E_D", "E_G", False),
      _claim("GDES keeps more similarity in E_D than NES (0.29 vs 0.02)", e_d.get("gdes"),
             e_d.get("nes"), "GDES", "NES", True),
      _claim("GDES: E_delta less self-similar than E_D (0.02 vs 0.29)", delta.get("gdes"),
             e_d.get("gdes"), "E_delta", "E_D", False),
      _claim("GDES fine-tunes better than ES (Table 2, mean over the tasks)", mean.get("gdes"),
             mean.get("es"), "GDES", "ES", True, 1, 100.0),
      _claim("GDES fine-tunes better than NES (Table 2, mean over the tasks)", mean.get("gdes"),
             mean.get("nes"), "GDES", "NES", True, 1, 100.0),
      _claim("ES fine-tunes better than NES (Table 2, mean over the tasks)", mean.get("es"),
             mean.get("nes"), "ES", "NES", True, 1, 100.0),
  ]
  return [r for r in rows if r]


def plot(study, path) -> str | None:
  try:  # late: matplotlib is optional (no plot without it) and needs its backend set first
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  colors = {"es": "tab:red", "nes": "tab:blue", "gdes": "tab:green"}
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for mode, (steps, values) in _curves(study).items():
    ax.plot(steps, values.mean(0), color=colors.get(mode),
            label=f"{mode.upper()} (mean of {values.shape[0]} seeds)")
    if values.shape[0] > 1:
      ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=colors.get(mode))
  ax.set_xlabel("step")
  ax.set_ylabel("generator MLM loss")
  ax.set_title("Generator MLM loss by embedding sharing (band: min-max over seeds)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _tokens(n: float) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _display_path(path: str) -> str:
  rel = os.path.relpath(path, REPO)
  return path if rel.startswith("..") else rel


def render(study, out_path: str, png: str | None) -> str:
  """The study's markdown page: setup, the Figure 2, Table 1 and Table 2 analogues, the
  orderings against the paper's, and how to reproduce it."""
  summary, curves = summarize(study), _curves(study)
  lines = []
  lines += _setup_section(study, out_path)
  lines += _figure2_section(summary, curves, png)
  lines += _table1_section(study, summary)
  lines += _table2_section(study, summary)
  lines += _orderings_section(summary, list(curves))
  lines += _reproduce_section(study, out_path)
  return "\n".join(lines)


def _setup_section(study, out_path: str) -> list[str]:
  cfg = study["pretrain_config"]
  m = cfg["model"]
  hw = study["hardware"]
  ft = study["flags"]
  tokens = cfg["num_train_steps"] * cfg["global_batch_size"] * cfg["seq_len"]
  corpus = study.get("corpus", {})
  phase = study["phase_time_s"]
  lines = []
  lines += ["# GDES study: ES vs NES vs GDES at small scale", "",
           "DeBERTaV3's embedding-sharing experiment (paper section 3: Figure 2, Tables 1 and 2) "
           "rerun at a size this project can afford, with `experiments/gdes_study.py`. Everything "
           "on this page was written by that script from the runs it made; every number is also "
           f"in `{os.path.basename(os.path.splitext(out_path)[0])}.json`.", "",
           "## Setup", "", "| | |", "| --- | --- |",
           f"| command | `{study['command']}` |",
           f"| hardware | {hw['devices']} x {hw['device_kind']} ({hw['backend']}), "
           f"{hw['cpu_count']} CPU cores, jax {hw['jax']} |",
           f"| wall time | {study['wall_time_s'] / 60:.1f} min in all: pre-training "
           f"{phase['pretrain'] / 60:.1f}, embedding analysis {phase['analysis'] / 60:.1f}, "
           f"fine-tuning {phase['finetune'] / 60:.1f} |",
           f"| model | discriminator {m['num_layers']} layers, hidden {m['hidden_size']}, "
           f"{m['num_heads']} heads, FFN {m['intermediate_size']} "
           f"({study['model']['discriminator_params'] / 1e6:.2f}M parameters); generator "
           f"{study['model']['generator_layers']} layer(s) + EMD "
           f"({study['model']['generator_params'] / 1e6:.2f}M); {m['vocab_size']} embedding rows |",
           f"| corpus | {corpus.get('name', cfg['data']['source'])}: "
           f"{_tokens(corpus.get('pieces', 0))} pieces; SentencePiece with "
           f"{cfg['data']['spm_vocab_size']} pieces trained on it; the same for every run |",
           f"| pre-training | {cfg['num_train_steps']} steps x {cfg['global_batch_size']} "
           f"sequences x {cfg['seq_len']} tokens ({_tokens(tokens)} tokens per run), peak lr "
           f"{cfg['optim']['learning_rate']}, {cfg['optim']['warmup_steps']} warmup steps, "
           f"linear decay, lambda {cfg['rtd']['rtd_lambda']}, dropout {m['hidden_dropout']}, "
           f"{m['dtype']}; ES with the joint "
           f"loss, NES and GDES with two updates per step (paper Fig. 1) |",
           f"| seeds | {', '.join(str(s) for s in study['seeds'])} for each mode (the seed sets "
           f"the initialisation, the data order and the fine-tuning) |"]
  if study["tasks"]:
    lines.append(
        f"| fine-tuning | {', '.join(t.upper() for t in study['tasks'])} from "
        f"`{study['glue_dir']}`: {ft.get('ft_epochs')} epochs, batch {ft.get('ft_batch')}, peak "
        f"lr {ft.get('ft_lr')} (10% warmup, linear decay), max_seq_length "
        f"{ft.get('ft_seq_len')}, at most {ft.get('ft_max_train') or 'all'} training examples, "
        f"{ft.get('ft_max_eval') or 'all'} dev examples; the best dev epoch is reported (the "
        f"paper's model selection) |")
  speeds = {}
  for run in study["runs"].values():
    if run.get("tokens_per_second"):
      speeds.setdefault(run["mode"], run["tokens_per_second"])
  if speeds:
    lines.append("| throughput | " + ", ".join(f"{k.upper()} {v:,.0f}" for k, v in speeds.items())
                 + " tokens/s in pre-training (median logged interval, first seed) |")
  return lines


def _figure2_section(summary, curves, png: str | None) -> list[str]:
  modes = list(curves)
  lines = []
  lines += ["", "## Figure 2 analogue: generator MLM loss", ""]
  if png:
    lines += [f"![generator MLM loss]({os.path.basename(png)})", ""]
  else:
    lines += ["(matplotlib was not importable where this page was written: no PNG; the curve "
              "is tabulated below.)", ""]
  if modes:
    steps = curves[modes[0]][0]
    picks = sorted({steps[int(round(q * (len(steps) - 1)))] for q in (0.1, 0.25, 0.5, 0.75, 1.0)})
    lines += ["Generator MLM loss, mean ± std over seeds [min, max]:", "",
              "| step | " + " | ".join(x.upper() for x in modes) + " |",
              "| --- | " + " | ".join("---" for _ in modes) + " |"]
    for s in picks:
      row = []
      for mode in modes:
        st, values = curves[mode]
        row.append(_fmt(_stats(values[:, st.index(s)]), 3) if s in st else "-")
      lines.append(f"| {s} | " + " | ".join(row) + " |")
    lines += ["", "| over the whole run (lower = faster convergence) | " +
              " | ".join(_fmt(summary["convergence"].get(x), 3) for x in modes) + " |", ""]
    same = ("nes" in curves and "gdes" in curves and
            curves["nes"][1].shape == curves["gdes"][1].shape and
            np.allclose(curves["nes"][1], curves["gdes"][1], rtol=1e-2))
    if same:
      lines += ["NES and GDES have the same generator curve (and the same E_G below), as they "
                "must: with two updates per step the generator is updated on L_MLM alone and "
                "nothing of the discriminator flows back into it (GDES stops the gradient at "
                "E_G), so for one seed both runs train the same generator, identical up to "
                "floating-point nondeterminism. The paper's 'GDES converges like NES' is this "
                "identity.", ""]
  return lines


def _table1_section(study, summary) -> list[str]:
  ft = study["flags"]
  lines = []
  lines += ["## Table 1 analogue: average cosine similarity of word embeddings", "",
            f"All pairs of a {100 * ft.get('sample_fraction', 0.1):g}% sample of the word pieces "
            "(the same rows in every run) at the last step; mean ± std over seeds [min, max]; the "
            "paper's value in brackets. E_D is the discriminator's effective table (E_G under ES, "
            "its own under NES, E_G + E_delta under GDES).", "",
            "| sharing | E_G | E_D | E_delta |", "| --- | --- | --- | --- |"]
  for mode in _by_mode(study):
    cells = []
    for key in ("E_G", "E_D", "E_delta"):
      s = summary["table1"].get(key, {}).get(mode)
      paper = PAPER["table1"].get(mode, {}).get(key)
      cells.append("-" if s is None else _fmt(s, 3) + (f" ({paper})" if paper is not None else ""))
    lines.append(f"| {mode.upper()} | " + " | ".join(cells) + " |")
  lines.append("")
  return lines


def _table2_section(study, summary) -> list[str]:
  lines = []
  if study["tasks"]:
    tasks = study["tasks"]
    lines += ["## Table 2 analogue: the discriminators fine-tuned on GLUE", "",
              "Dev score of the best epoch x 100; mean ± std over seeds [min, max]. The paper's "
              "column is its MNLI-m/mm accuracy and SQuAD v2.0 F1/EM of base models.", "",
              "| sharing | " + " | ".join(f"{t.upper()} ({TASK_METRIC.get(t, 'score')})"
                                          for t in tasks) + " | mean | paper |",
              "| --- | " + " | ".join("---" for _ in tasks) + " | --- | --- |"]
    for mode in _by_mode(study):
      cells = [_fmt(summary["table2"][t].get(mode), 1, 100.0) for t in tasks]
      cells.append(_fmt(summary["table2"]["mean"].get(mode), 1, 100.0).split(" [")[0])
      lines.append(f"| {mode.upper()} | " + " | ".join(cells) +
                   f" | {PAPER['table2'].get(mode, '')} |")
    lines.append("")
  return lines


def _orderings_section(summary, modes) -> list[str]:
  lines = []
  lines += ["## Orderings as measured", ""]
  if modes:
    lines.append("- Convergence, mean generator MLM loss over the run: "
                 f"{_order(summary['convergence'], False)} (paper, Figure 2: NES and GDES "
                 "converge faster than ES).")
  for key, paper in (("E_G", "NES 0.45 = GDES 0.45 > ES 0.02"),
                     ("E_D", "GDES 0.29 > NES 0.02 = ES 0.02"),
                     ("E_delta", "GDES 0.02")):
    if summary["table1"].get(key):
      lines.append(f"- Table 1 {key}: {_order(summary['table1'][key])} (paper: {paper}).")
  for task, stats in summary["table2"].items():
    lines.append(f"- Table 2 {task.upper()}: {_order(stats, True, 1, 100.0)}" +
                 (" (paper, MNLI and SQuAD v2.0: GDES > ES > NES)." if task == "mean" else "."))
  checks = paper_checks(summary)
  if checks:
    lines += ["", "| the paper's claim | measured (mean ± std) | reproduced? |",
              "| --- | --- | --- |"]
    lines += [f"| {c} | {measured} | {verdict} |" for c, measured, verdict in checks]
  return lines


def _reproduce_section(study, out_path: str) -> list[str]:
  lines = []
  lines += ["", "## Reproduce", "", "```", study["command"], "```", "",
            "Each run's directory holds its config.json, metrics.jsonl, last checkpoint and, per "
            "task, ft_<task>/results.json. `python -m deberta_jax.analyze embeddings "
            "--workdir=RUN` recomputes a row of Table 1; `python experiments/gdes_study.py "
            f"--render_only --out={_display_path(out_path)}` rewrites this page from the JSON.", ""]
  return lines


def write_report(study, out_path: str) -> None:
  out_path = os.path.abspath(out_path)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  stem = os.path.splitext(out_path)[0]
  with open(stem + ".json", "w") as f:
    json.dump(study, f, indent=1, sort_keys=True)
  png = plot(study, stem + "_mlm_loss.png") if study["runs"] else None
  if png is None and os.path.exists(stem + "_mlm_loss.png"):
    png = stem + "_mlm_loss.png"   # --render_only where matplotlib is missing: keep the old PNG
  with open(out_path, "w") as f:
    f.write(render(study, out_path, png))
  logging.info("wrote %s%s and %s.json", out_path, f", {png}" if png else "", stem)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging(keep=("deberta_jax", "gdes_study"))
  if _RENDER_ONLY.value:
    with open(os.path.splitext(os.path.abspath(_OUT.value))[0] + ".json") as f:
      study = json.load(f)
  else:
    study = run_study()
  write_report(study, _OUT.value)
  print(os.path.abspath(_OUT.value))


if __name__ == "__main__":
  app.run(main)

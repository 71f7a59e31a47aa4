"""The GDES study's statistics and report: everything after the runs, from the study's JSON alone.

No JAX here: `gdes_study.py --render_only` rewrites the page on any machine, and the tests check
the statistics without training anything.

Comparisons between two rows (two embedding-sharing modes, or a mode and no pre-training) are
paired by seed: seed s of every row shares the fine-tuning seed and, for the pre-trained rows,
the pre-training seed. The interval is Student's t on the per-seed differences,
mean +- t(0.975, n - 1) * sd / sqrt(n). A claim is *reproduced* when every interval it rests on
lies on the paper's side of 0, *contradicted* when one lies on the other side, and *unresolved*
otherwise: with 3 seeds t is 4.30, so only differences several times the seeds' spread count.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
from scipy import stats as scipy_stats

MODE_NAMES = {"es": "ES", "nes": "NES", "gdes": "GDES", "none": "no pre-training"}
COLORS = {"es": "tab:red", "nes": "tab:blue", "gdes": "tab:green", "none": "tab:gray"}
TASK_NAMES = {"sst2": "SST-2", "cola": "CoLA", "rte": "RTE", "mrpc": "MRPC", "qqp": "QQP",
              "stsb": "STS-B", "mnli": "MNLI", "qnli": "QNLI", "wnli": "WNLI"}
TASK_METRIC = {"sst2": "accuracy", "cola": "MCC", "rte": "accuracy", "mrpc": "F1/acc",
               "qqp": "F1/acc", "stsb": "Pearson/Spearman", "mnli": "accuracy (matched)",
               "qnli": "accuracy", "wnli": "accuracy"}
# The held-out evaluation's curves (Figure 2): key, label, and the reference line's key.
EVAL_CURVES = (("eval_mlm_loss", "generator MLM loss (held out)", "eval_unigram_entropy"),
               ("eval_rtd_loss", "discriminator RTD loss (held out)", "eval_rtd_base_loss"),
               ("eval_rtd_auc", "discriminator RTD AUC (held out)", None),
               ("eval_disc_effective_rank", "discriminator effective rank", None))
PAPER_TABLE1 = {"es": {"E_G": 0.02, "E_D": 0.02}, "nes": {"E_G": 0.45, "E_D": 0.02},
                "gdes": {"E_G": 0.45, "E_D": 0.29, "E_delta": 0.02}}
PAPER_TABLE2 = {"es": "88.8/88.4, 86.3/83.5", "nes": "88.3/87.9, 85.3/82.7",
                "gdes": "89.3/89.0, 87.2/84.5"}
CORPUS_NAMES = {"glue": "in-domain: GLUE training sentences", "embedded": "embedded: standard-"
                "library docstrings"}


# ------------------------------------------------------------------------------------ statistics

def describe(values: Sequence[float]) -> dict | None:
  """mean, sample std, min, max and n of the finite values; None when there are none."""
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return None
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def paired_interval(a: dict, b: dict, level: float = 0.95) -> dict | None:
  """Mean of a[s] - b[s] over the seeds s both have, with its two-sided t interval.

  `a` and `b` map seed -> value. Fewer than two common seeds: the difference without an
  interval (lo = hi = None).
  """
  seeds = sorted(set(a) & set(b))
  d = np.asarray([a[s] - b[s] for s in seeds], np.float64)
  if d.size == 0:
    return None
  out = {"mean": float(d.mean()), "n": int(d.size), "seeds": seeds, "lo": None, "hi": None,
         "differences": [float(x) for x in d]}
  if d.size > 1:
    half = float(scipy_stats.t.ppf(0.5 + level / 2, d.size - 1)) * float(
        d.std(ddof=1)) / math.sqrt(d.size)
    out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
  return out


def side(interval: dict | None) -> int:
  """+1 when the interval lies above 0, -1 below, 0 when it holds 0 or is missing."""
  if not interval or interval["lo"] is None:
    return 0
  if interval["lo"] > 0:
    return 1
  if interval["hi"] < 0:
    return -1
  return 0


def verdict(sides: Sequence[int]) -> str:
  """Over the intervals a claim rests on, each given as +1 (the paper's side), -1 (the other
  side) or 0 (holds 0): contradicted if any is against, reproduced if all are for."""
  if any(s < 0 for s in sides):
    return "contradicted"
  if sides and all(s > 0 for s in sides):
    return "reproduced"
  return "unresolved"


# ------------------------------------------------------------------------------ study accessors

def runs_of(corpus: dict, mode: str) -> dict:
  """seed -> run of one mode (or 'none') in one corpus."""
  return {int(r["seed"]): r for r in corpus["runs"].values() if r["mode"] == mode}


def rows(study: dict, corpus: dict) -> list[str]:
  """The table rows present: the modes in the study's order, then no pre-training."""
  present = {r["mode"] for r in corpus["runs"].values()}
  return [m for m in list(study["modes"]) + ["none"] if m in present]


def curve(run: dict, key: str) -> dict:
  """step -> value of one held-out metric of one run."""
  return {int(s): float(v) for s, v in run.get("eval", {}).get(key, [])}


def curve_mean(run: dict, key: str) -> float | None:
  """The metric averaged over the run's evaluations after step 0: the area under its curve,
  which is lower for the faster-converging of two runs of the same length."""
  values = [v for s, v in curve(run, key).items() if s > 0]
  return float(np.mean(values)) if values else None


def finetune_score(run: dict, spec: str) -> float | None:
  result = run.get("finetune", {}).get(spec)
  return None if result is None else result["score"]


def per_seed(corpus: dict, mode: str, value) -> dict:
  """seed -> value(run) for the runs of `mode` where it is not None."""
  out = {}
  for seed, run in runs_of(corpus, mode).items():
    v = value(run)
    if v is not None:
      out[seed] = v
  return out


def spec_label(spec: dict) -> str:
  n = spec["max_train"]
  size = "all" if not n else (f"{n // 1000}k" if n % 1000 == 0 else str(n))
  return f"{TASK_NAMES.get(spec['task'], spec['task'])} {size}"


# ---------------------------------------------------------------------------------- the claims

def claims(study: dict, corpus: dict) -> list[dict]:
  """The paper's three claims, each with the paired intervals it rests on and its verdict."""
  modes = set(study["modes"])
  out = []

  def compare(a_mode, b_mode, value, paper_sign, label, scale=1.0):
    interval = paired_interval(per_seed(corpus, a_mode, value), per_seed(corpus, b_mode, value))
    if interval is None:
      return None
    return {"label": label, "interval": interval, "scale": scale,
            "side": side(interval) * paper_sign}

  if {"es", "nes", "gdes"} <= modes:
    gen = lambda r: curve_mean(r, "eval_mlm_loss")
    disc = lambda r: curve_mean(r, "eval_rtd_auc")
    parts = [compare("nes", "es", gen, -1, "NES - ES, generator MLM loss averaged over the "
                     "evaluations (lower = faster)"),
             compare("gdes", "es", gen, -1, "GDES - ES, the same")]
    extra = [compare("nes", "es", disc, +1, "NES - ES, discriminator RTD AUC averaged over the "
                     "evaluations (higher = faster)"),
             compare("gdes", "es", disc, +1, "GDES - ES, the same")]
    parts = [p for p in parts if p]
    out.append({"claim": "NES and GDES converge faster than ES (Figure 2: the generator's MLM "
                         "loss)", "parts": parts + [p for p in extra if p],
                "verdict": verdict([p["side"] for p in parts]),
                "rule": "the generator rows decide; the discriminator rows are context"})

    table = lambda key: (lambda r: r.get("analysis", {}).get(key))
    parts = [compare("gdes", "nes", table("E_D"), +1, "E_D under GDES - E_D under NES (Table 1: "
                     "0.29 vs 0.02)")]
    within = paired_interval(per_seed(corpus, "gdes", table("E_D")),
                             per_seed(corpus, "gdes", table("E_delta")))
    if within is not None:
      parts.append({"label": "GDES: E_D - E_delta (Table 1: 0.29 vs 0.02)", "interval": within,
                    "scale": 1.0, "side": side(within)})
    parts = [p for p in parts if p]
    out.append({"claim": "GDES embeddings keep the generator's structure (E_D more self-similar "
                         "than NES's) and E_delta carries little of it (Table 1)",
                "parts": parts, "verdict": verdict([p["side"] for p in parts]),
                "rule": "both rows"})

    parts = []
    for spec in study.get("finetune", []):
      score = lambda r, name=spec["name"]: finetune_score(r, name)
      for other in ("es", "nes"):
        p = compare("gdes", other, score, +1, f"{spec_label(spec)}: GDES - {other.upper()}",
                    100.0)
        if p:
          parts.append(p)
    if parts:
      out.append({"claim": "GDES fine-tunes best (Table 2)", "parts": parts,
                  "verdict": verdict([p["side"] for p in parts]),
                  "rule": "every task, against both ES and NES"})
  return out


def pretraining_margin(study: dict, corpus: dict) -> list[dict]:
  """Per fine-tuning task: the best mode against no pre-training, paired by seed.

  The best mode is the highest mean over the seeds that every row has finished, so that a mode
  is not picked (or passed over) for the seeds it happens to have while a study is part-way.
  """
  out = []
  if "none" not in rows(study, corpus):
    return out
  for spec in study.get("finetune", []):
    score = lambda r, name=spec["name"]: finetune_score(r, name)
    by_mode = {m: per_seed(corpus, m, score) for m in (*study["modes"], "none")}
    common = set.intersection(*(set(v) for v in by_mode.values()))
    if not common:
      continue
    means = {m: float(np.mean([by_mode[m][s] for s in common])) for m in study["modes"]}
    best = max(means, key=means.get)
    interval = paired_interval(by_mode[best], by_mode["none"])
    if interval:
      out.append({"spec": spec, "best": best, "chosen_on": sorted(common), "interval": interval,
                  "verdict": {1: "pays off", -1: "worse than no pre-training",
                              0: "not resolved"}[side(interval)]})
  return out


# ------------------------------------------------------------------------------------- the plot

def plot(study: dict, corpus_key: str, path: str) -> str | None:
  """Figure 2 from the held-out evaluation: a panel per curve of EVAL_CURVES, a line per mode
  (mean over seeds) with a min-max band; None when matplotlib is not importable."""
  try:  # late: matplotlib is optional, and its backend must be chosen before pyplot loads
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  corpus = study["corpora"][corpus_key]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
  for ax, (key, label, reference) in zip(axes.flat, EVAL_CURVES):
    for mode in study["modes"]:
      steps, values = _aligned(corpus, mode, key)
      if not steps:
        continue
      n = values.shape[0]
      ax.plot(steps, values.mean(0), color=COLORS.get(mode),
              label=f"{MODE_NAMES[mode]} ({n} seed{'s' if n > 1 else ''})")
      if n > 1:
        ax.fill_between(steps, values.min(0), values.max(0), color=COLORS.get(mode), alpha=0.2)
    if reference:
      steps, values = _aligned(corpus, study["modes"][0], reference)
      if steps:
        ax.plot(steps, values.mean(0), color="black", linestyle=":", linewidth=1,
                label=reference.replace("eval_", "").replace("_", " "))
    if key == "eval_disc_effective_rank":
      ax.set_yscale("log")   # from ~45 at initialisation down to ~10: both ends readable
      ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
      ax.set_yticks([2, 5, 10, 20, 50])
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"{CORPUS_NAMES.get(corpus_key, corpus_key)}: mean over seeds, band min-max",
               fontsize=11)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _aligned(corpus: dict, mode: str, key: str):
  """(steps every seed evaluated, values [seeds, steps]) of one metric of one mode."""
  series = [curve(run, key) for run in runs_of(corpus, mode).values()]
  series = [s for s in series if s]
  if not series:
    return [], np.zeros((0, 0))
  steps = sorted(set.intersection(*(set(s) for s in series)))
  return steps, np.asarray([[s[k] for k in steps] for s in series])


# ------------------------------------------------------------------------------------- the page

def _fmt(s: dict | None, digits: int = 3, scale: float = 1.0) -> str:
  if s is None:
    return "-"
  text = f"{scale * s['mean']:.{digits}f}"
  if s["n"] > 1:
    text += f" ± {scale * s['std']:.{digits}f}"
  return text


def _fmt_interval(interval: dict, digits: int = 3, scale: float = 1.0) -> str:
  text = f"{scale * interval['mean']:+.{digits}f}"
  if interval["lo"] is not None:
    text += f" [{scale * interval['lo']:+.{digits}f}, {scale * interval['hi']:+.{digits}f}]"
  return text


def _minutes(seconds: float | None) -> str:
  return "-" if seconds is None else f"{seconds / 60:.1f} min"


def _hours(seconds: float) -> str:
  return f"{seconds / 3600:.2f} h"


_SEEDS_WANTED = 5  # the seed count the study asks for where the wall time allows


def _seed_cost(study: dict) -> str:
  """What one seed of one corpus cost here: the figure a choice of seed count rests on."""
  per_seed = []
  for corpus in study["corpora"].values():
    for seed in study["seeds"]:
      runs = [r for r in corpus["runs"].values() if r["seed"] == seed]
      if len(runs) == len(study["modes"]) + ("none" in {r["mode"] for r in runs}) and all(
          r.get("wall_time_s") for r in runs if r["mode"] != "none"):
        per_seed.append(sum(sum(_run_seconds(r)) for r in runs))
  if not per_seed:
    return ""
  median = float(np.median(per_seed))
  text = (f" A finished seed of one corpus took {_hours(median)} here "
          f"(median of {len(per_seed)}), every mode's pre-training and every row's fine-tuning.")
  seeds, corpora = len(study["seeds"]), len(study["corpora"])
  if seeds < _SEEDS_WANTED:
    where = "the corpus" if corpora == 1 else f"the {corpora} corpora"
    text += (f" {_SEEDS_WANTED} seeds of {where} would take about "
             f"{_hours(_SEEDS_WANTED * corpora * median)} here against "
             f"{_hours(seeds * corpora * median)} for {seeds}, hence {seeds}; fewer seeds widen "
             f"the intervals (a larger t quantile).")
  return text


def run_time(study: dict) -> dict:
  """Seconds of pre-training and fine-tuning the study's runs recorded, over every corpus and
  every invocation (a run's pre-training time sums the invocations that trained it)."""
  total = {"pretrain": 0.0, "finetune": 0.0}
  for corpus in study["corpora"].values():
    for run in corpus["runs"].values():
      pretrain, finetune = _run_seconds(run)
      total["pretrain"] += pretrain
      total["finetune"] += finetune
  return total


def _run_seconds(run: dict) -> tuple[float, float]:
  """A row's recorded pre-training and fine-tuning seconds (0 where none were recorded)."""
  return (run.get("wall_time_s") or 0.0,
          sum(f.get("wall_time_s") or 0.0 for f in run["finetune"].values()))


def render(study: dict, out_path: str, pngs: dict) -> str:
  lines = _setup(study, out_path)
  # The command's corpus order, not the JSON's (written with sorted keys): --render_only gives
  # the page the study itself wrote.
  planned = [k for k in study.get("corpora_planned", []) if k in study["corpora"]]
  for key in planned + [k for k in study["corpora"] if k not in planned]:
    lines += _corpus_sections(study, key, pngs.get(key))
  lines += _reproduce(study, out_path)
  return "\n".join(lines) + "\n"


def _setup(study: dict, out_path: str) -> list[str]:
  cfg = study["pretrain_config"]
  m, hw, ft = cfg["model"], study["hardware"], study["ft_settings"]
  tokens = cfg["num_train_steps"] * cfg["global_batch_size"] * cfg["seq_len"]
  phase, run_time_s = study["phase_time_s"], run_time(study)
  json_name = os.path.basename(os.path.splitext(out_path)[0]) + ".json"
  lines = [
      "# GDES study: ES vs NES vs GDES vs no pre-training", "",
      "DeBERTaV3's embedding-sharing experiment (paper section 3: Figure 2, Tables 1 and 2) at "
      f"the recipe of `{study['config_file']}`, with `experiments/gdes_study.py`. The script "
      f"wrote this page from its runs; every number is also in `{json_name}`.", "",
      "## Setup", "", "| | |", "| --- | --- |",
      f"| command | `{study['command']}` |",
      f"| hardware | {hw['devices']} x {hw['device_kind']} ({hw['backend']}), {hw['cpu_count']} "
      f"CPU cores, jax {hw['jax']} |",
      f"| wall time | {_hours(run_time_s['pretrain'] + run_time_s['finetune'])} summed over the "
      f"runs' own records (pre-training {_hours(run_time_s['pretrain'])}, fine-tuning "
      f"{_hours(run_time_s['finetune'])}), across the invocations of the resumable study; the "
      f"last invocation took {_minutes(study.get('wall_time_s'))} (pre-training "
      f"{_minutes(phase['pretrain'])}, embedding analysis {_minutes(phase['analysis'])}, "
      f"fine-tuning {_minutes(phase['finetune'])}) |",
      f"| pre-training config | `{study['config_file']}`"
      + (f" with `{' '.join(study['config_overrides'])}`" if study.get("config_overrides")
         else "") + " |",
      f"| model | discriminator {m['num_layers']} layers, hidden {m['hidden_size']}, "
      f"{m['num_heads']} heads, FFN {m['intermediate_size']} "
      f"({study['model']['discriminator_params'] / 1e6:.2f}M parameters); generator "
      f"{study['model']['generator_layers']} layer(s) ({study['model']['generator_params'] / 1e6:.2f}M);"
      f" {m['vocab_size']} embedding rows |",
      f"| pre-training | {cfg['num_train_steps']} steps x {cfg['global_batch_size']} sequences x "
      f"{cfg['seq_len']} tokens ({tokens / 1e6:.1f}M tokens per run), peak lr "
      f"{cfg['optim']['learning_rate']}, weight decay {cfg['optim']['weight_decay']}, "
      f"{cfg['optim']['warmup_steps']} warmup steps, linear decay, lambda "
      f"{cfg['rtd']['rtd_lambda']}, dropout {m['hidden_dropout']}, {m['dtype']}. ES trains the "
      "joint loss; NES and GDES make two updates per step (paper Fig. 1). Held-out evaluation "
      f"every {cfg['eval']['every_steps']} steps on {cfg['eval']['num_batches']} batch(es) of "
      "a held-out part of the corpus |",
      f"| no pre-training | the same config's initial parameters for the same seed "
      "(`--config.init_step=0` of a pre-training workdir) with the corpus's tokenizer, "
      "fine-tuned the same way |",
      f"| seeds | {', '.join(str(s) for s in study['seeds'])}: seed s sets the pre-training "
      "initialisation and data order and the fine-tuning seed of every row, which is what "
      f"pairs the rows.{_seed_cost(study)} |"]
  planned = study.get("corpora_planned", list(study["corpora"]))
  rows_per_corpus = len(study["modes"]) + (1 if study.get("baseline", True) else 0)
  expected = len(planned) * len(study["seeds"]) * rows_per_corpus
  done = sum(len(c["runs"]) for c in study["corpora"].values())
  if done < expected:
    lines.append(f"| **progress** | **{done} of the {expected} rows x seeds of this study are "
                 "done; the page is rewritten after each, and the tables below hold the finished "
                 "ones only** |")
  if study.get("finetune"):
    specs = "; ".join(f"{spec_label(s)}: {s['epochs']} epoch{'s' if s['epochs'] > 1 else ''}"
                      for s in study["finetune"])
    lines.append(
        f"| fine-tuning | from `{study['glue_dir']}` (training examples taken from the head of "
        f"each train file; the whole dev set): {specs}. Batch {ft['batch_size']}, peak lr "
        f"{ft['learning_rate']} (10% warmup, linear decay), max_seq_length "
        f"{ft['max_seq_length']}, {ft['pooling']} pooling; the best dev epoch (the paper's "
        "model selection) |")
  n = len(study["seeds"])
  t_note = (f" (t(0.975, {n - 1}) = {scipy_stats.t.ppf(0.975, n - 1):.2f} with {n} seeds)"
            if n > 1 else "")
  lines.append("| intervals | paired by seed: mean difference with a 95% Student-t interval "
               f"over the seeds{t_note}. Reproduced = every interval "
               "the claim rests on lies on the paper's side of 0; contradicted = one lies on "
               "the other side; otherwise unresolved |")
  return lines


def _seeds_note(study: dict, corpus: dict) -> str:
  """Which seeds this corpus's intervals pair, and the t quantile that makes their width: a
  part-way corpus has fewer seeds than the study, and a much wider t."""
  seeds = sorted(set.intersection(*(set(runs_of(corpus, m)) for m in rows(study, corpus)))
                 if rows(study, corpus) else set())
  if len(seeds) < 2:
    return (f"Seeds with every row: {', '.join(map(str, seeds)) or 'none'}; an interval needs "
            "two.")
  n = len(seeds)
  return (f"Seeds with every row: {', '.join(map(str, seeds))}; the intervals below pair "
          f"them (t(0.975, {n - 1}) = {scipy_stats.t.ppf(0.975, n - 1):.2f}).")


def _corpus_sections(study: dict, key: str, png: str | None) -> list[str]:
  corpus = study["corpora"][key]
  modes = study["modes"]
  info = corpus.get("info", {})
  lines = ["", f"## Corpus: {CORPUS_NAMES.get(key, key)}", ""]
  if info:
    lines += [f"{info.get('name', key)}: {info.get('pieces', 0) / 1e6:.2f}M pieces in "
              f"{info.get('rows', 0)} rows of the training part; SentencePiece with "
              f"{study['pretrain_config']['data']['spm_vocab_size']} pieces trained on it.", ""]
  speeds = {m: describe([r.get("tokens_per_second") for r in runs_of(corpus, m).values()])
            for m in modes}
  walls = {m: describe([r.get("wall_time_s") for r in runs_of(corpus, m).values()])
           for m in modes}
  lines += ["Pre-training per run: " + "; ".join(
      f"{MODE_NAMES[m]} {_minutes(walls[m]['mean']) if walls[m] else '-'}"
      + (f", {speeds[m]['mean']:,.0f} tokens/s" if speeds[m] else "") for m in modes) + ".", ""]

  lines += [_seeds_note(study, corpus), ""]

  lines += ["### Figure 2 analogue: the held-out evaluation against steps", ""]
  if png:
    lines += [f"![held-out curves, {key}]({os.path.basename(png)})", ""]
  else:
    lines += ["(matplotlib was not importable where this page was written: no plot; the "
              "numbers are below.)", ""]
  for metric, label, reference in EVAL_CURVES:
    aligned = {m: _aligned(corpus, m, metric) for m in modes}
    steps = next((s for s, _ in aligned.values() if s), [])
    if not steps:
      continue
    ref_steps, ref_values = _aligned(corpus, modes[0], reference) if reference else ([], None)
    head = ["step"] + [MODE_NAMES[m] for m in modes] + (
        [reference.replace("eval_", "")] if ref_steps else [])
    lines += [f"{label}, mean ± std over seeds:", "", "| " + " | ".join(head) + " |",
              "| " + " | ".join("---" for _ in head) + " |"]
    for step in steps:
      cells = [str(step)]
      for m in modes:
        st, values = aligned[m]
        cells.append(_fmt(describe(values[:, st.index(step)]), 3) if step in st else "-")
      if ref_steps:
        cells.append(f"{ref_values[:, ref_steps.index(step)].mean():.3f}"
                     if step in ref_steps else "-")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

  lines += ["### Table 1 analogue: average cosine similarity of the word embeddings", "",
            "All pairs of a "
            f"{100 * study['flags'].get('sample_fraction', 0.1):g}% sample of the word pieces "
            "(the same rows in every run) at the last step; mean ± std over seeds, the paper's "
            "value in brackets. E_D is the discriminator's effective table (E_G under ES, its own "
            "under NES, E_G + E_delta under GDES).", "",
            "| sharing | E_G | E_D | E_delta |", "| --- | --- | --- | --- |"]
  for m in modes:
    cells = []
    for name in ("E_G", "E_D", "E_delta"):
      s = describe(list(per_seed(corpus, m, lambda r, n=name: r.get("analysis", {}).get(n))
                        .values()))
      paper = PAPER_TABLE1.get(m, {}).get(name)
      cells.append("-" if s is None else _fmt(s) + (f" ({paper})" if paper is not None else ""))
    lines.append(f"| {MODE_NAMES[m]} | " + " | ".join(cells) + " |")
  lines.append("")

  specs = study.get("finetune", [])
  if specs:
    lines += ["### Table 2 analogue: the discriminators fine-tuned", "",
              "Dev score x 100 of the best epoch, mean ± std over seeds (per seed in brackets). "
              "The paper's column is its MNLI-m/mm accuracy and SQuAD v2.0 F1/EM of base "
              "models.", "",
              "| init | " + " | ".join(f"{spec_label(s)} ({TASK_METRIC.get(s['task'], 'score')})"
                                      for s in specs) + " | paper |",
              "| --- | " + " | ".join("---" for _ in specs) + " | --- |"]
    for m in rows(study, corpus):
      cells = []
      for spec in specs:
        values = per_seed(corpus, m, lambda r, n=spec["name"]: finetune_score(r, n))
        s = describe(list(values.values()))
        cells.append("-" if s is None else _fmt(s, 1, 100.0) + " (" + " / ".join(
            f"{100 * values[k]:.1f}" for k in sorted(values)) + ")")
      lines.append(f"| {MODE_NAMES[m]} | " + " | ".join(cells) +
                   f" | {PAPER_TABLE2.get(m, '')} |")
    lines += ["", "Paired differences x 100, first init minus second (95% t interval):", "",
              "| difference | " + " | ".join(spec_label(s) for s in specs) + " |",
              "| --- | " + " | ".join("---" for _ in specs) + " |"]
    present = rows(study, corpus)
    pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
    for a, b in pairs:
      cells = []
      for spec in specs:
        score = lambda r, n=spec["name"]: finetune_score(r, n)
        interval = paired_interval(per_seed(corpus, a, score), per_seed(corpus, b, score))
        cells.append("-" if interval is None else _fmt_interval(interval, 1, 100.0))
      lines.append(f"| {MODE_NAMES[a]} - {MODE_NAMES[b]} | " + " | ".join(cells) + " |")
    lines.append("")

  lines += ["### The paper's claims at this scale", ""]
  for c in claims(study, corpus):
    lines += [f"**{c['claim']}: {c['verdict']}** ({c['rule']}).", ""]
    for p in c["parts"]:
      digits = 1 if p["scale"] != 1.0 else 3
      lines.append(f"- {p['label']}: {_fmt_interval(p['interval'], digits, p['scale'])}")
    lines.append("")
  margins = pretraining_margin(study, corpus)
  if margins:
    lines += ["**Pre-training against none** (x 100, paired by seed). The best mode per task is the "
              "highest mean on the seeds every row has finished; it is picked on the same scores, "
              "so its interval leans optimistic:", ""]
    for item in margins:
      lines.append(f"- {spec_label(item['spec'])}: {MODE_NAMES[item['best']]} - no pre-training "
                   f"{_fmt_interval(item['interval'], 1, 100.0)}: {item['verdict']}")
    lines.append("")
  return lines


def _reproduce(study: dict, out_path: str) -> list[str]:
  rel = study.get("out_display", out_path)
  return ["## Reproduce", "", "```", study["command"], "```", "",
          "The study is resumable: the same command continues unfinished pre-training runs from "
          "their checkpoints and skips finished runs and fine-tunings. Each run's directory holds "
          "its config.json, metrics.jsonl (the held-out curves), last checkpoint and, per task, "
          "ft_<task>/results.json. `python -m deberta_jax.analyze embeddings --workdir=RUN` "
          "recomputes a row of Table 1; `python -m experiments.gdes_study --render_only "
          f"--out={rel}` rewrites this page from the JSON.", ""]

"""The GDES study: DeBERTaV3's Figure 2, Table 1 and Table 2 at the mini recipe, one command.

  python -m experiments.gdes_study --glue_dir=../shared/data/glue --workdir=/tmp/gdes_study \
      [--config=configs/mini.py --config.num_train_steps=...] [--seeds=0,1,2] \
      [--corpora=glue,embedded] [--out=docs/gdes_study.md]

Every run is a pre-training run of `--config` (configs/mini.py unless given; `--config.*`
overrides apply to all runs), with only the embedding sharing, the seed and the corpus changed,
so that the study cannot drift from the recipe it studies. For each corpus of --corpora
('glue': the GLUE training sentences written by `deberta_jax.finetune.glue_text` from
--glue_dir, never dev; 'embedded': the standard-library docstrings), each mode of --modes and
each seed, it

  * pre-trains (ES with the joint loss, NES and GDES with two updates per step, paper Fig. 1),
    the held-out evaluation logging the generator's MLM loss, the discriminator's RTD loss and
    AUC and its features' effective rank along the run (Figure 2);
  * measures Table 1's average cosine similarity of E_G, E_D and E_delta (`deberta_jax.analyze`);
  * fine-tunes the discriminator on each --finetune task (Table 2);

and fine-tunes the same config's initial parameters for each seed (`--config.init_step=0` of
fine-tuning: no pre-training, same tokenizer) as a fourth row. experiments/gdes_report.py turns
the runs into --out (markdown), one PNG per corpus next to it (with matplotlib) and the JSON
of every number; `--render_only` rewrites the page from that JSON.

The study is resumable: rerunning the same command continues unfinished pre-training runs from
their checkpoints and skips finished runs and complete fine-tunings.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script (python experiments/gdes_study.py)
  sys.path.insert(0, REPO)

from absl import flags  # pylint: disable=wrong-import-position
from absl import logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from deberta_jax import cli  # pylint: disable=wrong-import-position
from experiments import gdes_report  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "mini.py"),
    "Pre-training config of every run; --config.* overrides apply to all of them.",
    lock_config=True)
_OUT = flags.DEFINE_string("out", os.path.join(REPO, "docs", "gdes_study.md"),
                           "Markdown report; the PNGs and the JSON are written next to it.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/gdes_study", "Root of every run of the study.")
_GLUE_DIR = flags.DEFINE_string(
    "glue_dir", os.path.join(os.path.dirname(REPO), "shared", "data", "glue"),
    "GLUE TSV directory (<dir>/SST-2/train.tsv ...): the in-domain corpus (train splits) and "
    "the fine-tuning tasks.")
_CORPORA = flags.DEFINE_list("corpora", ["glue", "embedded"],
                             "Pre-training corpora: 'glue' (in-domain) and/or 'embedded'.")
_CORPUS_TASKS = flags.DEFINE_list("corpus_tasks", ["sst2", "cola", "rte"],
                                  "GLUE tasks whose training text makes the in-domain corpus.")
_MODES = flags.DEFINE_list("modes", ["es", "nes", "gdes"], "Embedding-sharing modes.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; every row runs each of them.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Add the no-pre-training row.")
_FINETUNE = flags.DEFINE_list(
    "finetune", ["sst2:2000:3", "sst2:20000:1", "cola:0:3"],
    "Fine-tuning runs as TASK:TRAIN_EXAMPLES:EPOCHS (0 examples = the whole train split).")
_FT_LR = flags.DEFINE_float("ft_lr", 1e-3, "Fine-tuning peak learning rate.")
_FT_SEQ = flags.DEFINE_integer("ft_seq_len", 64, "Fine-tuning max_seq_length.")
_FT_BATCH = flags.DEFINE_integer("ft_batch", 32, "Fine-tuning batch size.")
_FT_POOLING = flags.DEFINE_enum("ft_pooling", "mean", ["cls", "mean"], "Fine-tuning pooling.")
_FRACTION = flags.DEFINE_float("sample_fraction", 0.1, "Vocabulary fraction sampled for Table 1.")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Only rewrite --out from its JSON.")

CORPORA = ("glue", "embedded")


# ------------------------------------------------------------------------------------ the plan

def finetune_specs(values) -> list[dict]:
  """[{'name', 'task', 'max_train', 'epochs'}] from --finetune's TASK:N:EPOCHS entries."""
  specs = []
  for value in values:
    parts = value.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[2]) < 1:
      raise cli.app.UsageError(f"--finetune entry {value!r} is not TASK:TRAIN_EXAMPLES:EPOCHS "
                               "(e.g. sst2:2000:3; 0 examples = all)")
    task, n, epochs = parts[0], int(parts[1]), int(parts[2])
    specs.append({"name": f"{task}_{n or 'all'}", "task": task, "max_train": n,
                  "epochs": epochs})
  if len({s["name"] for s in specs}) != len(specs):
    raise cli.app.UsageError(f"--finetune={','.join(values)} names one task and size twice")
  return specs


def check_flags() -> None:
  for corpus in _CORPORA.value:
    if corpus not in CORPORA:
      raise cli.app.UsageError(f"--corpora: {corpus!r} is not one of {CORPORA}")
  for mode in _MODES.value:
    if mode not in ("es", "nes", "gdes"):
      raise cli.app.UsageError(f"--modes: {mode!r} is not es, nes or gdes")
  if not all(s.lstrip("-").isdigit() for s in _SEEDS.value) or not _SEEDS.value:
    raise cli.app.UsageError(f"--seeds={','.join(_SEEDS.value)} must be integers")
  needs_glue = "glue" in _CORPORA.value or _FINETUNE.value
  if needs_glue and not os.path.isdir(_GLUE_DIR.value):
    raise cli.app.UsageError(f"--glue_dir={_GLUE_DIR.value!r} is not a directory (the in-domain "
                             "corpus and the fine-tuning tasks need it)")
  finetune_specs(_FINETUNE.value)


def config_overrides(argv) -> list[str]:
  """The --config.* overrides of the command line, for the report."""
  return [a for a in argv[1:] if a.startswith("--config.")]


def pretrain_config(base, corpus_path: str | None, mode: str, seed: int, cache_dir: str):
  """`base` (the --config) with only what the study varies: sharing, seed and corpus."""
  c = base.copy_and_resolve_references()
  c.unlock()
  c.seed = seed
  c.model.embedding_sharing = mode
  if corpus_path is None:
    c.data.source = "embedded"
  else:
    c.data.source = "text_files"
    c.data.text_files = corpus_path
  c.data.cache_dir = cache_dir
  c.ckpt.async_save = False
  c.lock()
  return c


def finetune_config(spec: dict, init: str, init_step: int, seed: int, dtype: str):
  """The fine-tuning config of one run; `init_step` 0 for no pre-training, -1 (the newest
  checkpoint) otherwise, so that results.json's config reproduces the run on its own."""
  from configs import finetune as finetune_configs  # pylint: disable=import-outside-toplevel
  c = finetune_configs.get_config()
  c.task = spec["task"]
  c.init = init
  c.init_step = init_step
  c.glue_dir = _GLUE_DIR.value
  c.seed = seed
  c.num_epochs = spec["epochs"]
  c.max_train_examples = spec["max_train"]
  c.batch_size = _FT_BATCH.value
  c.learning_rate = _FT_LR.value
  c.max_seq_length = _FT_SEQ.value
  c.pooling = _FT_POOLING.value
  c.export_best = False
  c.model_dtype = dtype
  c.log_every_steps = 100
  return c


# ----------------------------------------------------------------------------------------- runs

class Study:
  """The runs of the study; JAX and the project's training code are imported here, after the
  CPU device count of the config has been set (see main)."""

  def __init__(self, base_config, argv):
    # pylint: disable=import-outside-toplevel
    import jax
    from deberta_jax import analyze
    from deberta_jax import workdir as workdir_lib
    from deberta_jax.data import pipeline as pipeline_lib
    from deberta_jax.finetune import glue_text
    from deberta_jax.finetune import train as finetune
    from deberta_jax.pretraining import train
    from deberta_jax.runtime import checkpointing
    from deberta_jax.runtime import compilation_cache
    from deberta_jax.runtime import metrics
    # pylint: enable=import-outside-toplevel
    self.jax, self.analyze, self.workdir_lib = jax, analyze, workdir_lib
    self.pipeline_lib, self.glue_text, self.finetune = pipeline_lib, glue_text, finetune
    self.train, self.checkpointing, self.metrics = train, checkpointing, metrics
    self.base = base_config
    self.root = os.path.abspath(_WORKDIR.value)
    self.cache_dir = os.path.join(self.root, "cache")
    self.seeds = [int(s) for s in _SEEDS.value]
    self.specs = finetune_specs(_FINETUNE.value)
    self.argv = argv
    compilation_cache.enable(pretrain_config(base_config, None, _MODES.value[0], 0,
                                             self.cache_dir))

  def corpus_path(self, corpus: str) -> str | None:
    """The in-domain text file (written once), or None for the embedded corpus."""
    if corpus == "embedded":
      return None
    path = os.path.join(self.root, "corpus", "glue_train.txt")
    if not os.path.isfile(path):
      lines, counts = self.glue_text.build(_GLUE_DIR.value, _CORPUS_TASKS.value)
      self.glue_text.write(lines, path)
      logging.info("in-domain corpus %s: %d lines %s", path, len(lines), counts)
    return path

  def pretrain(self, config, workdir: str) -> dict:
    done = config.num_train_steps in self.checkpointing.committed_steps(
        os.path.join(workdir, "checkpoints"))
    # The run's wall time, summed over the invocations that trained it: a stopped study
    # resumes runs part-way, and the reruns that find a run done read the time from here.
    timing = os.path.join(workdir, "study_wall_time.json")
    recorded = {}
    if os.path.isfile(timing):
      with open(timing) as f:
        recorded = json.load(f)
    parts = recorded.get("parts_s", [recorded["wall_time_s"]] if recorded else [])
    if not done:
      logging.info("pre-training %s seed %d -> %s", config.model.embedding_sharing, config.seed,
                   workdir)
      start = time.time()
      try:
        self.train.run(config, workdir)
      finally:   # also when stopped: the part it trained counts toward the run
        parts = [*parts, time.time() - start]
        if os.path.isdir(workdir):   # a run refused before it began leaves no workdir behind
          with open(timing, "w") as f:
            json.dump({**recorded, "wall_time_s": sum(parts), "parts_s": parts}, f)
    wall_time = sum(parts) if parts else None
    records = self.metrics.read_metrics(workdir)
    keys = {k for r in records for k in r if k.startswith("eval_")}
    speeds = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    return {"workdir": workdir, "wall_time_s": wall_time,
            "eval": {k: [[r["step"], r[k]] for r in records if k in r] for k in sorted(keys)},
            "train": {k: [[r["step"], r[k]] for r in records if k in r]
                      for k in ("mlm_loss", "rtd_loss")},
            "tokens_per_second": float(sorted(speeds)[len(speeds) // 2]) if speeds else None}

  def finetune_all(self, init, seed: int, out_root: str, dtype: str) -> dict:
    results = {}
    for spec in self.specs:
      config = finetune_config(spec, init.path, 0 if init.step == 0 else -1, seed, dtype)
      out = os.path.join(out_root, f"ft_{spec['name']}")
      path = os.path.join(out, self.finetune.RESULTS_FILE)
      result = None
      if os.path.isfile(path):
        with open(path) as f:
          previous = json.load(f)
        if (previous.get("config") == config.to_dict()
            and len(previous["epochs"]) == config.num_epochs):
          result = previous
      if result is None:
        result = self.finetune.run(config, out, init)
      best = result["best"]
      split = next(k for k in best if isinstance(best[k], dict))   # dev / dev_matched
      results[spec["name"]] = {"score": best[split]["score"], "best_epoch": best["epoch"],
                               "epochs": result["epochs"],
                               "wall_time_s": result.get("wall_time_s"),
                               "train_examples": result["train_examples"],
                               "eval_examples": result["eval_examples"]}
    return results

  def run(self) -> dict:
    started = self.started = time.time()
    first = pretrain_config(self.base, None, _MODES.value[0], self.seeds[0], self.cache_dir)
    study = {
        "command": "python -m experiments.gdes_study " + " ".join(
            shlex.quote(a) for a in self.argv[1:]),
        "config_file": _display_path(config_flags.get_config_filename(flags.FLAGS["config"])),
        "config_overrides": config_overrides(self.argv),
        "flags": {h.name: h.value for h in globals().values()
                  if isinstance(h, flags.FlagHolder) and h is not _CONFIG},
        "hardware": self.hardware(),
        "pretrain_config": json.loads(first.to_json()),
        "model": self.model_sizes(first),
        "modes": list(_MODES.value), "seeds": self.seeds, "finetune": self.specs,
        "ft_settings": {"learning_rate": _FT_LR.value, "max_seq_length": _FT_SEQ.value,
                        "batch_size": _FT_BATCH.value, "pooling": _FT_POOLING.value},
        "glue_dir": _GLUE_DIR.value, "corpora": {}, "corpora_planned": list(_CORPORA.value),
        "baseline": _BASELINE.value,
        "phase_time_s": {"pretrain": 0.0, "analysis": 0.0, "finetune": 0.0},
    }
    for corpus in _CORPORA.value:
      self.run_corpus(corpus, study)
    study["wall_time_s"] = time.time() - started
    return study

  def run_corpus(self, corpus: str, study: dict) -> None:
    """Seed by seed (every mode, then no pre-training), so that a study stopped part-way
    already pairs its finished seeds; the page is rewritten after every run."""
    text = self.corpus_path(corpus)
    root = os.path.join(self.root, corpus)
    out = study["corpora"].setdefault(corpus, {"runs": {}})
    phase = study["phase_time_s"]
    # No pre-training is step 0 of the seed's run under the recipe's own sharing (GDES where
    # the study runs it): that run's config, tokenizer and initial parameters.
    source_mode = "gdes" if "gdes" in _MODES.value else _MODES.value[0]
    for seed in self.seeds:
      for mode in _MODES.value:
        config = pretrain_config(self.base, text, mode, seed, self.cache_dir)
        workdir = os.path.join(root, f"{mode}_s{seed}")
        t0 = time.time()
        run = self.pretrain(config, workdir)
        t1 = time.time()
        run_config, model, params, step = self.workdir_lib.load(workdir)
        run["analysis"] = self.analyze.embeddings_report(workdir, run_config, params, step,
                                                         _FRACTION.value, 0)
        init = self.finetune.init_from_workdir(workdir, run_config, model, params, step)
        del params
        t2 = time.time()
        run["finetune"] = self.finetune_all(init, seed, workdir, config.model.dtype)
        t3 = time.time()
        phase["pretrain"] += t1 - t0
        phase["analysis"] += t2 - t1
        phase["finetune"] += t3 - t2
        out["runs"][f"{mode}_s{seed}"] = {"mode": mode, "seed": seed, **run}
        logging.info("%s/%s_s%d done: pre-train %.0fs, Table 1 %s, fine-tune %s (%.0fs)", corpus,
                     mode, seed, t1 - t0, {k: round(run["analysis"][k], 4) for k in
                                           ("E_G", "E_D", "E_delta") if k in run["analysis"]},
                     {k: round(v["score"], 4) for k, v in run["finetune"].items()}, t3 - t2)
        if "info" not in out:
          out["info"] = self.corpus_info(config)
        self.checkpoint_report(study)
      if _BASELINE.value:
        t0 = time.time()
        source = os.path.join(root, f"{source_mode}_s{seed}")
        init = self.finetune.load_init(source, 0)
        results = self.finetune_all(init, seed, os.path.join(root, f"none_s{seed}"),
                                    self.base.model.dtype)
        phase["finetune"] += time.time() - t0
        out["runs"][f"none_s{seed}"] = {"mode": "none", "seed": seed, "init": source,
                                        "finetune": results}
        logging.info("%s/none_s%d: fine-tune %s", corpus, seed,
                     {k: round(v["score"], 4) for k, v in results.items()})
        self.checkpoint_report(study)

  def checkpoint_report(self, study: dict) -> None:
    study["wall_time_s"] = time.time() - self.started
    write_report(study, _OUT.value)

  def model_sizes(self, config) -> dict:
    # pylint: disable=import-outside-toplevel
    from flax.linen import meta
    import numpy as np
    from deberta_jax.models.rtd import RTDModel
    # pylint: enable=import-outside-toplevel
    model = RTDModel.from_config(config)
    shapes = meta.unbox(self.jax.eval_shape(lambda k: model.init(k, 8), self.jax.random.key(0)))
    count = lambda tree: int(sum(np.prod(x.shape) for x in self.jax.tree.leaves(tree)))
    return {"generator_params": count(shapes["generator"]),
            "discriminator_params": count(shapes["discriminator"]),
            "generator_layers": model.generator_config.num_layers}

  def corpus_info(self, config) -> dict:
    pipe = self.pipeline_lib.make_pipeline(config, 0, 1)
    return {"name": pipe.corpus_name, "pieces": int(pipe.num_chunks * pipe.seq_len),
            "rows": int(pipe.num_chunks)}

  def hardware(self) -> dict:
    devices = self.jax.devices()
    return {"backend": self.jax.default_backend(), "devices": len(devices),
            "device_kind": devices[0].device_kind, "cpu_count": os.cpu_count(),
            "host": platform.platform(), "jax": self.jax.__version__}


# ----------------------------------------------------------------------------------- the report

def _display_path(path: str) -> str:
  """Relative to the checkout where it lies inside it: the page names no one's home directory."""
  rel = os.path.relpath(os.path.abspath(path), REPO)
  return path if rel.startswith("..") else rel


def write_report(study: dict, out_path: str) -> None:
  """The JSON, a PNG per corpus (with matplotlib; an existing one is kept without it) and the
  markdown page."""
  out_path = os.path.abspath(out_path)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  stem = os.path.splitext(out_path)[0]
  study["out_display"] = _display_path(out_path)
  tmp = stem + ".json.tmp"
  with open(tmp, "w") as f:
    json.dump(study, f, indent=1, sort_keys=True)
  os.replace(tmp, stem + ".json")
  pngs = {}
  for key, corpus in study["corpora"].items():
    path = f"{stem}_{key}.png"
    made = gdes_report.plot(study, key, path) if corpus["runs"] else None
    if made is None and os.path.exists(path):
      made = path   # --render_only where matplotlib is missing: keep the plot already there
    if made:
      pngs[key] = made
  with open(out_path, "w") as f:
    f.write(gdes_report.render(study, out_path, pngs))
  logging.info("wrote %s (%d plot%s) and %s.json", out_path, len(pngs),
               "" if len(pngs) == 1 else "s", stem)


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging(keep=("deberta_jax", "gdes_study"))
  if _RENDER_ONLY.value:
    path = os.path.splitext(os.path.abspath(_OUT.value))[0] + ".json"
    if not os.path.isfile(path):
      raise cli.app.UsageError(f"--render_only: {path} does not exist (run the study first)")
    with open(path) as f:
      study = json.load(f)
    write_report(study, _OUT.value)
  else:
    check_flags()
    config = cli.load_config(_CONFIG)
    from deberta_jax.runtime import cpu_devices  # pylint: disable=import-outside-toplevel
    cpu_devices.apply(config)   # before JAX starts: the device count is read once
    study = Study(config, sys.argv).run()
    write_report(study, _OUT.value)
  print(os.path.abspath(_OUT.value))


if __name__ == "__main__":
  cli.run(main)

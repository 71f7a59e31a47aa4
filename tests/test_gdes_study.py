"""The GDES study: its statistics and verdicts on known numbers, and one small study end to end
(pre-training, Table 1, fine-tuning, the no-pre-training row, the page, resume, --render_only)."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import gdes_report as report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paired_interval_is_student_t_on_the_per_seed_differences():
  a = {0: 1.0, 1: 2.0, 2: 3.0, 7: 100.0}   # seed 7 has no partner: left out
  b = {0: 0.0, 1: 0.0, 2: 0.0}
  interval = report.paired_interval(a, b)
  half = scipy_stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)   # differences 1, 2, 3: sd 1
  chex.assert_trees_all_close((interval["mean"], interval["lo"], interval["hi"]),
                              (2.0, 2.0 - half, 2.0 + half))
  assert interval["n"] == 3 and interval["seeds"] == [0, 1, 2]
  assert abs(half - 4.302653 / np.sqrt(3)) < 1e-5
  one = report.paired_interval({0: 1.0}, {0: 0.5})
  assert one["mean"] == 0.5 and one["lo"] is None and report.side(one) == 0
  assert report.paired_interval({0: 1.0}, {1: 1.0}) is None


def test_sides_and_verdicts():
  above = report.paired_interval({0: 3.0, 1: 3.1, 2: 2.9}, {0: 1.0, 1: 1.0, 2: 1.0})
  below = report.paired_interval({0: 1.0, 1: 1.0, 2: 1.0}, {0: 3.0, 1: 3.1, 2: 2.9})
  across = report.paired_interval({0: 1.0, 1: -1.0, 2: 0.5}, {0: 0.0, 1: 0.0, 2: 0.0})
  assert (report.side(above), report.side(below), report.side(across)) == (1, -1, 0)
  assert report.verdict([1, 1]) == "reproduced"
  assert report.verdict([1, 0]) == "unresolved"
  assert report.verdict([1, -1, 0]) == "contradicted"
  assert report.verdict([]) == "unresolved"


def _synthetic_study():
  """Three seeds per mode where, by construction, NES and GDES converge faster (lower generator
  loss), GDES keeps E_D self-similar with a small E_delta, GDES fine-tunes *worse* than ES on
  the first task, and every mode beats no pre-training on both tasks."""
  rng = np.random.default_rng(0)
  specs = [{"name": "sst2_2000", "task": "sst2", "max_train": 2000, "epochs": 3},
           {"name": "cola_all", "task": "cola", "max_train": 0, "epochs": 3}]
  gen_offset = {"es": 0.5, "nes": 0.0, "gdes": 0.0}
  table1 = {"es": {"E_G": 0.05, "E_D": 0.05}, "nes": {"E_G": 0.4, "E_D": 0.03},
            "gdes": {"E_G": 0.4, "E_D": 0.3, "E_delta": 0.02}}
  scores = {"es": (0.80, 0.10), "nes": (0.78, 0.11), "gdes": (0.75, 0.12), "none": (0.70, 0.0)}
  runs = {}
  for mode in ("es", "nes", "gdes", "none"):
    for seed in range(3):
      noise = lambda: float(rng.normal(0, 0.002))
      run = {"mode": mode, "seed": seed, "finetune": {
          s["name"]: {"score": scores[mode][i] + noise()} for i, s in enumerate(specs)}}
      if mode != "none":
        steps = [0, 100, 200, 300]
        run["eval"] = {
            "eval_mlm_loss": [[t, 7.0 - t / 100 + gen_offset[mode] + noise()] for t in steps],
            "eval_unigram_entropy": [[t, 6.0] for t in steps],
            "eval_rtd_loss": [[t, 0.4 - t / 3000 + noise()] for t in steps],
            "eval_rtd_base_loss": [[t, 0.38] for t in steps],
            "eval_rtd_auc": [[t, 0.5 + t / 1000 + noise()] for t in steps],
            "eval_disc_effective_rank": [[t, 10 + noise()] for t in steps]}
        run["analysis"] = {k: v + noise() for k, v in table1[mode].items()}
        run["tokens_per_second"], run["wall_time_s"] = 1000.0, 60.0
      runs[f"{mode}_s{seed}"] = run
  config = {"num_train_steps": 300, "global_batch_size": 32, "seq_len": 64,
            "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 4,
                      "intermediate_size": 256, "vocab_size": 2048, "hidden_dropout": 0.0,
                      "dtype": "float32"},
            "optim": {"learning_rate": 2e-3, "weight_decay": 0.1, "warmup_steps": 20},
            "rtd": {"rtd_lambda": 50.0}, "eval": {"every_steps": 100, "num_batches": 8},
            "data": {"spm_vocab_size": 2000}}
  return {"command": "python -m experiments.gdes_study", "config_file": "configs/mini.py",
          "config_overrides": [], "flags": {"sample_fraction": 0.1},
          "hardware": {"backend": "cpu", "devices": 2, "device_kind": "cpu", "cpu_count": 2,
                       "jax": "0"},
          "pretrain_config": config,
          "model": {"generator_params": 1, "discriminator_params": 1, "generator_layers": 1},
          "modes": ["es", "nes", "gdes"], "seeds": [0, 1, 2], "finetune": specs,
          "ft_settings": {"learning_rate": 1e-3, "max_seq_length": 64, "batch_size": 32,
                          "pooling": "mean"},
          "glue_dir": "glue", "corpora": {"glue": {"runs": runs}},
          "phase_time_s": {"pretrain": 1.0, "analysis": 1.0, "finetune": 1.0},
          "wall_time_s": 3.0}


def test_claims_and_margin_on_a_study_built_to_known_answers(tmp_path):
  study = _synthetic_study()
  corpus = study["corpora"]["glue"]
  verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in report.claims(study, corpus)}
  assert verdicts == {"NES and GDES converge faster than ES": "reproduced",
                      "GDES embeddings keep the generator's structure": "reproduced",
                      "GDES fine-tunes best": "contradicted"}, verdicts
  margins = report.pretraining_margin(study, corpus)
  assert [(m["spec"]["name"], m["best"], m["verdict"]) for m in margins] == [
      ("sst2_2000", "es", "pays off"), ("cola_all", "gdes", "pays off")]
  chex.assert_trees_all_close(margins[0]["interval"]["mean"], 0.10, atol=0.01)
  # Part-way through a study the best mode is picked on the seeds every row has: here ES lacks
  # seed 2, where GDES would otherwise win SST-2 on a seed ES never ran.
  partial = {**corpus, "runs": {k: v for k, v in corpus["runs"].items() if k != "es_s2"}}
  partial["runs"]["gdes_s2"] = {**partial["runs"]["gdes_s2"], "finetune": {
      "sst2_2000": {"score": 0.99}, "cola_all": {"score": 0.12}}}
  first = report.pretraining_margin(study, partial)[0]
  assert (first["best"], first["chosen_on"]) == ("es", [0, 1])

  png = report.plot(study, "glue", str(tmp_path / "curves.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  page = report.render(study, "/tmp/x/gdes_study.md", {"glue": png})
  assert "![held-out curves, glue](curves.png)" in page
  assert report.run_time(study) == {"pretrain": 9 * 60.0, "finetune": 0.0}
  assert "| wall time | 0.15 h summed over the runs' own records" in page
  assert "A finished seed of one corpus took 0.05 h here (median of 3)" in page
  assert ("5 seeds of the corpus would take about 0.25 h here against 0.15 h for 3, hence 3"
          in page)
  for needle in ("## Corpus: in-domain", "### Figure 2 analogue", "### Table 1 analogue",
                 "### Table 2 analogue", "| GDES - no pre-training |",
                 "**GDES fine-tunes best (Table 2): contradicted**",
                 "SST-2 2k: ES - no pre-training +9.", "t(0.975, 2) = 4.30",
                 "Seeds with every row: 0, 1, 2; the intervals below pair them "
                 "(t(0.975, 2) = 4.30)."):
    assert needle in page, needle
  # The page keeps the command's corpus order, whatever the order of the JSON it is read from.
  both = report.render({**study, "corpora": {"embedded": partial, "glue": corpus},
                        "corpora_planned": ["glue", "embedded"]}, "/tmp/x/gdes_study.md", {})
  assert both.index("## Corpus: in-domain") < both.index("## Corpus: embedded")
  # A corpus part-way through says how few seeds its intervals pair, and their wider t.
  part_way = report.render({**study, "corpora": {"glue": partial}}, "/tmp/x/gdes_study.md",
                           {"glue": None})
  assert ("Seeds with every row: 0, 1; the intervals below pair them (t(0.975, 1) = 12.71)."
          in part_way)
  # A study where the fine-tuning differences straddle 0 cannot decide the claim.
  for seed, delta in enumerate((0.05, -0.05, 0.01)):
    for spec in ("sst2_2000", "cola_all"):
      es = corpus["runs"][f"es_s{seed}"]["finetune"][spec]["score"]
      nes = corpus["runs"][f"nes_s{seed}"]["finetune"][spec]["score"]
      corpus["runs"][f"gdes_s{seed}"]["finetune"][spec]["score"] = max(es, nes) + delta
  last = report.claims(study, corpus)[-1]
  assert last["verdict"] == "unresolved", [p["interval"] for p in last["parts"]]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  from tests.test_finetune import write_sst2  # pylint: disable=import-outside-toplevel
  return write_sst2(tmp_path_factory.mktemp("glue"), 400, 60)


def _study(workdir, out, glue_dir, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  command = [sys.executable, "-m", "experiments.gdes_study", f"--workdir={workdir}",
             f"--out={out}", f"--glue_dir={glue_dir}", "--corpora=glue", "--corpus_tasks=sst2",
             "--modes=gdes", "--seeds=0,1", "--finetune=sst2:64:1",
             "--config=configs/tiny.py", "--config.num_train_steps=4",
             "--config.global_batch_size=8", "--config.seq_len=32", "--config.eval.every_steps=2",
             "--config.eval.num_batches=1", "--config.eval.holdout_fraction=0.1",
             "--config.ckpt.every_steps=4", "--config.log.every_steps=2",
             "--config.data.spm_vocab_size=40", "--config.model.vocab_size=128",
             "--config.data.part_mb=0.002", "--config.mesh.cpu_devices=1", *extra]
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_small_study_end_to_end_resumes_and_renders(tmp_path, glue_dir):
  workdir, out = tmp_path / "study", tmp_path / "docs" / "study.md"
  done = _study(workdir, out, glue_dir)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(tmp_path / "docs" / "study.json") as f:
    study = json.load(f)
  corpus = study["corpora"]["glue"]
  assert sorted(corpus["runs"]) == ["gdes_s0", "gdes_s1", "none_s0", "none_s1"]
  gdes = corpus["runs"]["gdes_s0"]
  assert [s for s, _ in gdes["eval"]["eval_rtd_auc"]] == [0, 2, 4]
  assert {"E_G", "E_D", "E_delta"} <= set(gdes["analysis"])
  # A run's pre-training time is what the invocations that trained it took, kept in its workdir.
  with open(workdir / "glue" / "gdes_s0" / "study_wall_time.json") as f:
    timing = json.load(f)
  assert len(timing["parts_s"]) == 1 and gdes["wall_time_s"] == sum(timing["parts_s"]) > 0
  for name in ("gdes_s0", "none_s1"):
    assert 0.0 <= corpus["runs"][name]["finetune"]["sst2_64"]["score"] <= 1.0
  # No pre-training is step 0 of the seed's run: its fine-tuning started from that.
  with open(workdir / "glue" / "none_s1" / "ft_sst2_64" / "results.json") as f:
    results = json.load(f)
  assert results["init"]["step"] == 0 and results["init"]["path"].endswith("gdes_s1")
  assert results["config"]["init_step"] == 0   # its config alone reproduces it
  page = out.read_text()
  assert (tmp_path / "docs" / "study_glue.png").stat().st_size > 0
  assert "| GDES - no pre-training |" in page and "--config.num_train_steps=4" in page

  # Rerun: every run and fine-tuning is found complete, nothing is trained again.
  checkpoint_files = sorted(str(p) for p in (workdir / "glue").rglob("*") if p.is_file())
  stamps = [os.path.getmtime(p) for p in checkpoint_files]
  again = _study(workdir, out, glue_dir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "pre-training gdes" not in again.stderr and "fine-tuning sst2" not in again.stderr
  assert [os.path.getmtime(p) for p in checkpoint_files] == stamps
  page = out.read_text()

  os.remove(out)
  rendered = subprocess.run([sys.executable, "-m", "experiments.gdes_study", "--render_only",
                             f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
  assert rendered.returncode == 0, rendered.stderr[-3000:]
  assert out.read_text() == page


def test_bad_finetune_entry_exits_2(tmp_path, glue_dir):
  done = subprocess.run([sys.executable, "-m", "experiments.gdes_study",
                         f"--workdir={tmp_path}", f"--glue_dir={glue_dir}",
                         "--finetune=sst2:many:1"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2 and "sst2:many:1" in done.stderr, done.stderr[-2000:]
  assert not os.listdir(tmp_path)

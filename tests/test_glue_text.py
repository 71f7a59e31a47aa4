"""The in-domain corpus builder: GLUE training text only, SST-2 reduced to its maximal phrases."""

import os
import subprocess
import sys

import chex
import pytest

from deberta_jax.finetune import glue_text


def _write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join("\t".join(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("glue")
  # SST-2 lists every parse-tree phrase of a sentence, as the real train.tsv does.
  sst_train = ["a gorgeous , witty , seductive movie .", "a gorgeous , witty", "witty , seductive",
               "movie .", "the plot is nothing but boilerplate clichés", "nothing but",
               "boilerplate clichés", "the plot", "seductive movie", "a gorgeous , witty",
               "a seductive plot"]
  _write(str(root / "SST-2" / "train.tsv"),
         [["sentence", "label"]] + [[s, "1"] for s in sst_train])
  _write(str(root / "SST-2" / "dev.tsv"), [["sentence", "label"], ["dev sentence unseen", "0"]])
  _write(str(root / "CoLA" / "train.tsv"), [["gj04", "1", "", "The book was read by Kim."],
                                          ["gj04", "0", "*", "Kim book the read."]])
  _write(str(root / "CoLA" / "dev.tsv"), [["gj04", "1", "", "A dev sentence of CoLA."]])
  _write(str(root / "RTE" / "train.tsv"), [["index", "sentence1", "sentence2", "label"],
                                         ["0", "A premise here.", "A hypothesis.", "entailment"]])
  _write(str(root / "RTE" / "dev.tsv"), [["index", "sentence1", "sentence2", "label"],
                                       ["0", "RTE dev premise.", "RTE dev hypothesis.",
                                        "entailment"]])
  return str(root)


def test_maximal_phrases_drop_spans_of_longer_phrases():
  kept = glue_text.maximal_phrases(["the plot", "plot is", "the plot is thin", "thin", " ",
                                    "a  different   one", "plot"])
  chex.assert_equal(kept, ["the plot is thin", "a different one"])
  # A phrase sharing words but not as a contiguous span is kept.
  chex.assert_equal(glue_text.maximal_phrases(["a b c", "a c"]), ["a b c", "a c"])


def test_build_writes_train_text_of_each_task_never_dev(glue_dir, tmp_path):
  lines, counts = glue_text.build(glue_dir, ("sst2", "cola", "rte"), seed=0)
  chex.assert_equal(counts, {"sst2": 3, "cola": 2, "rte": 2})  # "a seductive plot" is its own
  chex.assert_equal(sorted(lines), sorted([
      "a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés",
      "a seductive plot", "The book was read by Kim.", "Kim book the read.", "A premise here.",
      "A hypothesis."]))
  assert not any("dev" in line for line in lines)
  # The order is a seeded shuffle: reproducible, and another seed gives another order.
  chex.assert_equal(glue_text.build(glue_dir, ("sst2", "cola", "rte"), seed=0)[0], lines)
  assert any(glue_text.build(glue_dir, ("sst2", "cola", "rte"), seed=s)[0] != lines
             for s in (1, 2, 3))


def test_cli_writes_the_file_and_refuses_bad_input(glue_dir, tmp_path):
  out = tmp_path / "corpus" / "glue_train.txt"
  cmd = [sys.executable, "-m", "deberta_jax.finetune.glue_text", f"--glue_dir={glue_dir}",
         f"--out={out}", "--tasks=sst2,cola"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "5 lines" in done.stdout
  chex.assert_equal(len(out.read_text().splitlines()), 5)
  bad = subprocess.run(cmd[:-1] + ["--tasks=sst2,nope"], capture_output=True, text=True,
                       check=False)
  assert bad.returncode != 0
  assert "'nope' is not a GLUE task" in bad.stderr
  missing = subprocess.run(cmd[:3] + [f"--glue_dir={tmp_path / 'none'}", f"--out={out}"],
                           capture_output=True, text=True, check=False)
  assert missing.returncode != 0 and "is not a directory" in missing.stderr

"""An in-domain pre-training corpus from GLUE training splits: one sentence per line.

  python -m deberta_jax.finetune.glue_text --glue_dir=/data/glue --out=/tmp/glue_train.txt \
      [--tasks=sst2,cola,rte] [--seed=0]

Pre-training on the text of the downstream tasks (their *training* splits only: the dev sets stay
unseen) is the cheapest way to test whether a recipe pays off downstream, and is what
configs/mini.py is measured with (docs/benchmarks.md).

SST-2's training split is not a list of sentences: it holds every phrase of the Stanford
Sentiment Treebank's parse trees ("kids , spirit", ", and motorcycles"), 67k rows drawn from
about 7k sentences. Written as they are, the packed pre-training rows would be runs of unrelated
fragments, and replaced-token detection would have no context to learn from. Only the maximal
phrases are kept: those that are not a contiguous word span of a longer phrase. The other tasks'
sentences are kept whole (both sentences of a pair task, each on its own line). The lines are
shuffled with `seed`, so that the part the held-out evaluation keeps back
(`config.eval.holdout_fraction`) draws from every task.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Iterable, Sequence

from absl import app
from absl import flags

from deberta_jax.finetune import glue

DEFAULT_TASKS = ("sst2", "cola", "rte")

_FLAGS = {}


def maximal_phrases(phrases: Iterable[str]) -> list[str]:
  """The distinct phrases that are not a contiguous word span of another phrase, longest first.

  A span index (every contiguous word span of each kept phrase) makes this linear in the kept
  text's span count, not quadratic in the number of phrases.
  """
  unique = sorted({" ".join(p.split()) for p in phrases} - {""},
                  key=lambda p: (-len(p.split()), p))
  spans, kept = set(), []
  for phrase in unique:
    words = tuple(phrase.split())
    if words in spans:
      continue
    kept.append(phrase)
    spans.update(words[i:j] for i in range(len(words)) for j in range(i + 1, len(words) + 1))
  return kept


def task_sentences(task: glue.Task, split: glue.Split) -> list[str]:
  """The training split's sentences: maximal phrases for SST-2, every text field otherwise."""
  texts = list(split.text_a) + list(split.text_b or [])
  if task.name == "sst2":
    return maximal_phrases(texts)
  return [t.strip() for t in texts if t.strip()]


def build(glue_dir: str, tasks: Sequence[str] = DEFAULT_TASKS, seed: int = 0,
          tfds_data_dir: str = "") -> tuple[list[str], dict[str, int]]:
  """(shuffled lines, lines per task) from the `train` split of each task."""
  lines, counts = [], {}
  for name in tasks:
    task = glue.get_task(name)
    train = glue.load(task, glue_dir, tfds_data_dir)["train"]
    sentences = task_sentences(task, train)
    counts[task.name] = len(sentences)
    lines.extend(" ".join(s.split()) for s in sentences)
  random.Random(seed).shuffle(lines)
  return lines, counts


def write(lines: Sequence[str], path: str) -> None:
  """The whole file at once through a temporary name: a reader never sees part of it."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)


def _define_flags() -> None:
  if _FLAGS:
    return
  _FLAGS["glue_dir"] = flags.DEFINE_string("glue_dir", "", "GLUE TSV directory (GLUE_DIR/SST-2/...).")
  _FLAGS["tfds_data_dir"] = flags.DEFINE_string(
      "tfds_data_dir", "", "Read tfds glue/<task> from here when --glue_dir is empty.")
  _FLAGS["tasks"] = flags.DEFINE_list("tasks", list(DEFAULT_TASKS), "GLUE tasks whose train "
                                      "split is written.")
  _FLAGS["out"] = flags.DEFINE_string("out", "", "The text file to write.")
  _FLAGS["seed"] = flags.DEFINE_integer("seed", 0, "Seed of the line order.")


def main(argv) -> None:
  del argv
  glue_dir, out = _FLAGS["glue_dir"].value, _FLAGS["out"].value
  if not out or not (glue_dir or _FLAGS["tfds_data_dir"].value):
    sys.exit("glue_text: --out and one of --glue_dir / --tfds_data_dir are required")
  try:
    lines, counts = build(glue_dir, _FLAGS["tasks"].value, _FLAGS["seed"].value,
                          _FLAGS["tfds_data_dir"].value)
  except (glue.DataError, ValueError) as e:
    sys.exit(f"glue_text: {e}")
  write(lines, out)
  words = sum(len(line.split()) for line in lines)
  print(f"wrote {out}: {len(lines)} lines, {words} words ({counts})")


def run_main() -> None:
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  run_main()

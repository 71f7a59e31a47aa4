"""Writes a synthetic English corpus of a given size for data-path measurements (docs/data.md).

  python benchmarks/make_text_corpus.py --out=/tmp/corpus_1g --total_mb=1000 --files=8

Each line is a paragraph of 3 to 12 sentences drawn at random (seeded) from the GLUE training
files under ../shared/data/glue (real English), or, without them, from the embedded docstring
corpus. Sizes, line lengths and the token distribution are those of ordinary prose; the text
repeats its sentences, which matters for nothing measured here (speed, memory, disk).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GLUE = os.path.join(HERE, "..", "..", "shared", "data", "glue")


def sentences() -> list[str]:
  out = []
  for task, column in (("SST-2", "sentence"), ("CoLA", None), ("RTE", "sentence1")):
    path = os.path.join(GLUE, task, "train.tsv")
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if column is None:  # CoLA has no header: the sentence is the fourth column
      out += [r[3] for r in rows if len(r) > 3]
    else:
      index = rows[0].index(column)
      out += [r[index] for r in rows[1:] if len(r) > index]
  if not out:
    from deberta_jax.data import corpus  # fallback: no GLUE files on this machine
    out = [line for doc in corpus.embedded_documents() for line in doc.splitlines()
           if line.strip()]
  return [s.strip() for s in out if s.strip()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--total_mb", type=float, default=1000)
  parser.add_argument("--files", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  pool = sentences()
  rng = random.Random(args.seed)
  os.makedirs(args.out, exist_ok=True)
  per_file = int(args.total_mb * 1e6 / args.files)
  for i in range(args.files):
    path = os.path.join(args.out, f"part-{i:03d}.txt")
    written = 0
    with open(path, "w", encoding="utf-8") as f:
      while written < per_file:
        line = " ".join(rng.choices(pool, k=rng.randint(3, 12))) + "\n"
        f.write(line)
        written += len(line.encode("utf-8"))
    print(f"{path}: {written} bytes", file=sys.stderr)


if __name__ == "__main__":
  main()

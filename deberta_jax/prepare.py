"""Prepare a corpus once for pre-training: tokenise, pack and shard it, with a manifest.

  python -m deberta_jax.prepare --config=configs/large.py --out=gs://bucket/wiki-L512 \\
      --config.data.source=text_files --config.data.text_files='gs://bucket/wiki/*.txt' \\
      --config.data.spm_model=gs://bucket/spm.model --num_workers=8

then train with `--config.data.source=prepared --config.data.prepared_dir=gs://bucket/wiki-L512`.
The corpus is read from `config.data` (any source: embedded, text_files, jsonl, parquet, tfds) and
packed into `config.seq_len` rows with `config.data.spm_model` (or an spm model trained on it
first, see `python -m deberta_jax.tokenizer train`). `--num_workers` processes work on one
machine; `--shard_index=I --num_shards=K` gives machine I its share of the parts, so K machines
(e.g. the workers of a TPU slice, WORKSPACE.md) prepare one dataset together. Rerunning the same
command skips finished shards; the last machine to finish writes DIR/manifest.json.

  python -m deberta_jax.prepare verify --out=DIR     checks DIR/spm.model against the manifest
                                                     and reads every shard to check its sha256

A worker process that dies (e.g. the out-of-memory killer) has its part retried once, then the
run stops naming the part. SIGTERM stops the workers, deletes unfinished shards and exits with
code 4; finished shards are kept, so rerunning the command resumes.

Exit codes: 0 done (or this machine's share done), 2 bad input (one line names it), 4 stopped by
SIGTERM (rerun to resume).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from deberta_jax import cli
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import pipeline
from deberta_jax.data import preparation
from deberta_jax.data import shards

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py): its data section and seq_len decide the dataset.",
    lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory, local or gs://.")
_WORKERS = flags.DEFINE_integer("num_workers", 1, "Worker processes on this machine.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This machine's index in [0, num_shards).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Machines preparing the dataset together.")


def _prepare() -> str:
  if _CONFIG.value is None:
    raise cli.app.UsageError("--config is required.")
  config = cli.load_config(_CONFIG)
  if corpus_lib.cfg_get(config.data, "source", "embedded") == "prepared":
    raise cli.app.UsageError("config.data.source='prepared' is already prepared; give the "
                             "source to read (text_files, jsonl, parquet, tfds or embedded).")
  corpus = corpus_lib.corpus_from_config(config)
  corpus.check_not_empty()
  tokenizer = pipeline.tokenizer_for(config, corpus)
  manifest = preparation.prepare(
      corpus, tokenizer, int(config.seq_len), _OUT.value,
      vocab_size=int(config.model.vocab_size), part_bytes=pipeline.part_bytes(config),
      num_workers=_WORKERS.value, shard_index=_SHARD_INDEX.value, num_shards=_NUM_SHARDS.value)
  if manifest is None:
    return json.dumps({"out": _OUT.value, "complete": False})
  return json.dumps({"out": _OUT.value, "complete": True, "fingerprint": manifest["fingerprint"],
                     "sequences": manifest["num_sequences"], "tokens": manifest["num_tokens"],
                     "shards": len(manifest["shards"])})


def _verify() -> str:
  manifest = shards.read_manifest(_OUT.value)
  shards.check_tokenizer(_OUT.value, manifest)
  shards.check_shard_sizes(_OUT.value, manifest)
  shards.verify_checksums(_OUT.value, manifest)
  return json.dumps({"out": _OUT.value, "verified": True, "fingerprint": manifest["fingerprint"],
                     "shards": len(manifest["shards"])})


def main(argv):
  commands = {"verify": _verify}
  if len(argv) > 2 or (len(argv) == 2 and argv[1] not in commands):
    raise cli.app.UsageError(f"unexpected arguments {argv[1:]}; usage: python -m "
                             f"deberta_jax.prepare [verify] --out=DIR [--config=...]")
  if not _OUT.value:
    raise cli.app.UsageError("--out is required (the prepared dataset's directory).")
  print(commands[argv[1]]() if len(argv) == 2 else _prepare())


if __name__ == "__main__":
  cli.run(main)

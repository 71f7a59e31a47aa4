"""Prepare a corpus once: split it into parts, tokenise and pack each part into a shard, in
parallel worker processes and over several machines, then write the manifest.

Parts are planned from the corpus alone (`Corpus.parts`), so every machine computes the same
list; machine `shard_index` of `num_shards` takes parts i with i % num_shards == shard_index,
and its `num_workers` processes take those one at a time. A shard whose record (`.json`) exists
and matches the plan is skipped, so a rerun after a crash or preemption only does what is left.
Whoever finishes the last shard writes the manifest; until then the dataset cannot be read.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from typing import Any

from absl import logging

from deberta_jax.data import DataError
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import shards
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.data import storage


def _plan_key(corpus_fingerprint: str, tokenizer, seq_len: int) -> dict[str, Any]:
  return {"corpus_fingerprint": corpus_fingerprint, "tokenizer_fingerprint": tokenizer.fingerprint,
          "seq_len": int(seq_len)}


def _read_record(out_dir: str, index: int, count: int) -> dict[str, Any] | None:
  path = storage.join(out_dir, shards.record_name(index, count))
  if not storage.exists(path):
    return None
  try:
    return json.loads(storage.read_bytes(path))
  except ValueError:
    return None  # a damaged record: the shard is made again


def _is_done(record: dict[str, Any] | None, part: corpus_lib.Part, key: dict[str, Any]) -> bool:
  return (record is not None and record.get("part") == dataclasses.asdict(part)
          and all(record.get(k) == v for k, v in key.items()))


# Each worker process loads the tokenizer once (spm processors cannot be pickled).
_WORKER: dict[str, Any] = {}


def _init_worker(spm_path: str, threads: int) -> None:
  _WORKER["tokenizer"] = tokenizer_lib.Tokenizer(spm_path)
  _WORKER["threads"] = threads


def _prepare_part(task: dict[str, Any], corpus=None, tokenizer=None, threads: int = 0,
                  on_text=None) -> dict[str, Any]:
  """Writes one shard and then its record; returns the record."""
  tokenizer = tokenizer or _WORKER["tokenizer"]
  threads = threads or _WORKER.get("threads", 0)
  part, index, count, out_dir = task["part"], task["index"], task["count"], task["out_dir"]
  name = shards.shard_name(index, count)
  local_dir = out_dir if not storage.is_remote(out_dir) else tempfile.gettempdir()
  tmp = os.path.join(local_dir, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    fields = shards.write_shard(corpus_lib.read_part(part, corpus), tokenizer, task["seq_len"],
                                task["dtype"], tmp, num_threads=threads, on_text=on_text)
    storage.put_file(tmp, storage.join(out_dir, name))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  record = {"file": name, **fields, "part": dataclasses.asdict(part), **task["key"]}
  storage.write_bytes(storage.join(out_dir, shards.record_name(index, count)),
                      json.dumps(record, indent=1).encode())
  return record


class _Progress:
  """A progress bar over text bytes with ETA (tqdm), or log lines when tqdm is absent."""

  def __init__(self, total: int, description: str, enabled: bool):
    self._bar = None
    if enabled:
      try:
        import tqdm  # installed with tensorflow-datasets
        self._bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=description,
                              file=sys.stderr, mininterval=2.0, smoothing=0.1)
      except ImportError:
        pass

  def update(self, n: int) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def prepare(corpus: corpus_lib.Corpus, tokenizer, seq_len: int, out_dir: str, *,
            vocab_size: int, part_bytes: int = corpus_lib.DEFAULT_PART_BYTES,
            num_workers: int = 1, shard_index: int = 0, num_shards: int = 1,
            progress: bool = True) -> dict[str, Any] | None:
  """Prepares this machine's share of `corpus` into `out_dir`; returns the manifest once every
  shard (of every machine) exists, else None."""
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise DataError(f"--shard_index={shard_index} must be in [0, --num_shards={num_shards}).")
  if num_workers < 1:
    raise DataError(f"--num_workers={num_workers} must be >= 1.")
  tokenizer_lib.check_vocab_size(tokenizer.num_pieces, vocab_size, tokenizer.model_path)
  out_dir = storage.absolute(out_dir)
  key = _plan_key(corpus.fingerprint, tokenizer, seq_len)
  _refuse_other_dataset(out_dir, key)
  storage.makedirs(out_dir)
  spm_path = storage.join(out_dir, shards.SPM_FILE)
  if not storage.exists(spm_path):
    storage.write_bytes(spm_path, tokenizer.proto)

  parts = corpus.parts(part_bytes)
  count = len(parts)
  dtype = shards.token_dtype(vocab_size)
  mine = [i for i in range(count) if i % num_shards == shard_index]
  todo = [i for i in mine if not _is_done(_read_record(out_dir, i, count), parts[i], key)]
  logging.info("Preparing %s into %s: %d parts, %d for this machine (%d of %d), %d already done",
               corpus.name, out_dir, count, len(mine), shard_index, num_shards,
               len(mine) - len(todo))
  tasks = [{"part": parts[i], "index": i, "count": count, "out_dir": out_dir,
            "seq_len": int(seq_len), "dtype": dtype, "key": key} for i in todo]
  bar = _Progress(sum(parts[i].size for i in todo), f"prepare {len(todo)} shards",
                  progress and bool(todo))
  start = time.time()
  try:
    in_process = num_workers == 1 or len(tasks) <= 1 or any(
        t["part"].kind == "documents" for t in tasks)
    if in_process:
      for task in tasks:
        _prepare_part(task, corpus, tokenizer, on_text=bar.update)
    else:
      threads = max(1, (os.cpu_count() or 1) // num_workers)
      ctx = multiprocessing.get_context("spawn")  # fork is unsafe once jax or gcsfs threads run
      with ctx.Pool(min(num_workers, len(tasks)), initializer=_init_worker,
                    initargs=(tokenizer.model_path, threads)) as pool:
        for record in pool.imap_unordered(_prepare_part, tasks):
          bar.update(record["part"]["size"])
  finally:
    bar.close()
  if todo:
    logging.info("Prepared %d shards in %.1f s", len(todo), time.time() - start)
  return _write_manifest_if_complete(corpus, tokenizer, seq_len, out_dir, parts, key, dtype,
                                     part_bytes)


def _refuse_other_dataset(out_dir: str, key: dict[str, Any]) -> None:
  """Shards of another corpus, tokenizer or seq_len in `out_dir` are never mixed or overwritten."""
  if not storage.isdir(out_dir):
    return
  for path in storage.listdir(out_dir):
    name = os.path.basename(path.rstrip("/"))
    if name.startswith("shard-") and name.endswith(".json"):
      try:
        record = json.loads(storage.read_bytes(path))
      except ValueError:
        continue
      other = {k: record.get(k) for k in key}
      if other != key:
        raise DataError(f"--out={out_dir} holds shards of another dataset ({other}); this one "
                        f"is {key}. Use another --out directory.")
      return


def _write_manifest_if_complete(corpus, tokenizer, seq_len, out_dir, parts, key, dtype,
                                part_bytes) -> dict[str, Any] | None:
  count = len(parts)
  records = [_read_record(out_dir, i, count) for i in range(count)]
  missing = [i for i, (r, p) in enumerate(zip(records, parts)) if not _is_done(r, p, key)]
  if missing:
    logging.info("%d of %d shards are still missing (e.g. %s); the manifest is written when the "
                 "last one is done.", len(missing), count, shards.shard_name(missing[0], count))
    return None
  entries = [{k: r[k] for k in ("file", "sequences", "tokens", "bytes", "sha256",
                                "header_bytes")} for r in records if r["sequences"] > 0]
  if not entries:
    raise DataError(f"Corpus {corpus.name} is empty: tokenizing it gave no pieces.")
  manifest = {
      "format": shards.FORMAT, "version": shards.FORMAT_VERSION,
      "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint,
                 "text_bytes": sum(p.size for p in parts)},
      "tokenizer": {"file": shards.SPM_FILE, "fingerprint": tokenizer.fingerprint,
                    "num_pieces": tokenizer.num_pieces},
      "seq_len": int(seq_len), "dtype": str(dtype), "part_bytes": int(part_bytes),
      "num_sequences": sum(e["sequences"] for e in entries),
      "num_tokens": sum(e["tokens"] for e in entries),
      "shards": entries,
  }
  manifest["fingerprint"] = shards.fingerprint(manifest)
  storage.write_bytes(storage.join(out_dir, shards.MANIFEST),
                      json.dumps(manifest, indent=1).encode())
  logging.info("Prepared dataset %s: %d sequences of %d, %d pieces, %d shards, fingerprint %s",
               out_dir, manifest["num_sequences"], seq_len, manifest["num_tokens"], len(entries),
               manifest["fingerprint"])
  return manifest

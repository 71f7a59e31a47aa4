"""Deterministic, resumable, per-process batches read from a prepared dataset: `make_pipeline`.

Every source ends up as a prepared dataset (data/shards.py): `source='prepared'` names one made by
`python -m deberta_jax.prepare`; the other sources are prepared into the cache on first use and
read the same way.

Order. Epoch e visits every row once, in the order of a permutation of [0, N) keyed by
(seed, e): grain's `index_shuffle`, a keyed bijection computed per index, so no N-element array
is held (80M rows of a 160 GB corpus would take 640 MB per epoch). The k-th example of the whole
run (counting all processes) is row perm_e(k mod N) with e = k div N, and global batch b is
examples [b*G, (b+1)*G), G = config.global_batch_size. Process p of P takes rows
[p*G/P, (p+1)*G/P) of each global batch: processes read only their own rows, disjoint, and
together the global batch (what `jax.make_array_from_process_local_data` expects).

Reading. Batches are read by grain: a `MapDataset` over batch numbers whose elements are this
process's rows of that batch, iterated with `ReadOptions(num_threads, prefetch_buffer_size)`, so
background threads read the next batches (positioned reads of fixed-size rows, data/storage.py)
while the step runs.

Resumption. The order is a pure function of (seed, examples seen), so the state is those numbers
plus the dataset fingerprint: `state()` goes into each checkpoint and `restore(state)` continues
with exactly the batch an uninterrupted run would have produced, even with another number of
processes or another global batch (the position counts examples, not batches), and refuses a
state saved on another dataset. Read-ahead batches are not counted: the position is what the
trainer consumed.
"""

from __future__ import annotations

import bisect
import os
import time
from typing import Any, Iterator

import numpy as np
from absl import logging

from deberta_jax.data import DataError
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import preparation
from deberta_jax.data import shards
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.data import storage

# Bump when train_spm's settings change, so cached models trained with older ones are not reused.
SPM_SETTINGS_VERSION = 2
STATE_KEYS = ("seed", "examples_seen", "num_chunks")
_SHUFFLE_ROUNDS = 4  # Feistel rounds of index_shuffle (grain's default for its own shuffles)


class PreparedRows:
  """Random access to the rows of a prepared dataset (local directory or gs://)."""

  def __init__(self, directory: str, manifest: dict[str, Any] | None = None):
    self.directory = storage.absolute(directory)
    self.manifest = manifest or shards.read_manifest(self.directory)
    shards.check_shard_sizes(self.directory, self.manifest)
    self.seq_len = int(self.manifest["seq_len"])
    self.dtype = np.dtype(self.manifest["dtype"])
    self.row_bytes = self.seq_len * self.dtype.itemsize
    self.fingerprint = self.manifest["fingerprint"]
    entries = self.manifest["shards"]
    self._starts = np.cumsum([0] + [s["sequences"] for s in entries]).tolist()
    self._headers = [int(s["header_bytes"]) for s in entries]
    self._reader = storage.RangeReader([storage.join(self.directory, s["file"]) for s in entries])

  def __len__(self) -> int:
    return self._starts[-1]

  def read(self, rows: np.ndarray) -> np.ndarray:
    """int32 [len(rows), seq_len] of global row numbers `rows`."""
    requests = []
    for row in np.asarray(rows, dtype=np.int64).tolist():
      if not 0 <= row < len(self):
        raise IndexError(f"row {row} out of range [0, {len(self)})")
      shard = bisect.bisect_right(self._starts, row) - 1
      offset = self._headers[shard] + (row - self._starts[shard]) * self.row_bytes
      requests.append((shard, offset, self.row_bytes))
    data = b"".join(self._reader.read(requests))
    return np.frombuffer(data, dtype=self.dtype).reshape(len(requests), self.seq_len).astype(
        np.int32)


def epoch_seed(seed: int, epoch: int) -> int:
  """The index_shuffle key of one epoch (a 32-bit value derived from both numbers)."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


class Pipeline:
  """Endless batches {'input_ids', 'attention_mask'}: int32 [global_batch_size // process_count,
  seq_len], this process's slice of every global batch."""

  def __init__(self, rows: PreparedRows, tokenizer: tokenizer_lib.Tokenizer, *, seed: int,
               global_batch_size: int, process_index: int = 0, process_count: int = 1,
               corpus_name: str = "", read_threads: int = 16, prefetch_batches: int = 16,
               holdout_rows: int = 0):
    _check_layout(global_batch_size, process_index, process_count)
    _check_seed(seed)
    if not 0 <= holdout_rows <= len(rows) // 2:
      raise DataError(f"{holdout_rows} held-out rows of a dataset of {len(rows)}: at most half "
                      f"may be held out (config.eval.holdout_fraction, config.eval.num_batches).")
    self.rows = rows
    self.holdout_rows = int(holdout_rows)
    self.tokenizer = tokenizer
    self.seed = int(seed)
    self.global_batch_size = int(global_batch_size)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.corpus_name = corpus_name
    self.read_threads = int(read_threads)
    self.prefetch_batches = int(prefetch_batches)
    self._examples_seen = 0
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None
    self._iterator_origin = 0

  @property
  def num_chunks(self) -> int:
    return len(self.rows)

  @property
  def num_train_rows(self) -> int:
    return len(self.rows) - self.holdout_rows

  def _split(self, positions: list[int]) -> list[int]:
    """The held-out/train split: one fixed permutation of all rows (keyed by the dataset alone,
    so every host, every seed and every resume agrees); its first `holdout_rows` entries are
    held out, the rest are the training pool."""
    from grain.experimental import index_shuffle  # grain loads its C++ extension on import
    if not self.holdout_rows:
      return positions
    key = int(self.fingerprint, 16) & 0x7FFFFFFF
    return [index_shuffle(p, max_index=self.num_chunks - 1, seed=key, rounds=_SHUFFLE_ROUNDS)
            for p in positions]

  def holdout_indices(self, count: int) -> np.ndarray:
    """Row numbers of held-out examples 0 .. count-1 (wrapping around the held-out rows)."""
    if not self.holdout_rows:
      raise DataError("No rows are held out (config.eval.every_steps=0).")
    return np.asarray(self._split([i % self.holdout_rows for i in range(count)]), dtype=np.int64)

  def holdout_batch(self, index: int, global_batch_size: int) -> dict[str, np.ndarray]:
    """This process's rows of held-out batch `index` (fixed: the same in every evaluation)."""
    local = global_batch_size // self.process_count
    start = index * global_batch_size + self.process_index * local
    ids = self.rows.read(self.holdout_indices(start + local)[start:])
    return {"input_ids": ids, "attention_mask": (ids != self.tokenizer.pad_id).astype(np.int32)}

  @property
  def seq_len(self) -> int:
    return self.rows.seq_len

  @property
  def fingerprint(self) -> str:
    return self.rows.fingerprint

  def chunk_indices(self, start: int, count: int) -> np.ndarray:
    """Row numbers of global examples start .. start+count-1."""
    from grain.experimental import index_shuffle  # grain loads its C++ extension on import
    n = self.num_train_rows
    pool = []
    for position in range(start, start + count):
      epoch, offset = divmod(position, n)
      pool.append(self.holdout_rows + index_shuffle(
          offset, max_index=n - 1, seed=epoch_seed(self.seed, epoch), rounds=_SHUFFLE_ROUNDS))
    return np.asarray(self._split(pool), dtype=np.int64)

  def batch_at(self, start: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch whose first example is `start`."""
    first = start + self.process_index * self.local_batch_size
    ids = self.rows.read(self.chunk_indices(first, self.local_batch_size))
    return {"input_ids": ids, "attention_mask": (ids != self.tokenizer.pad_id).astype(np.int32)}

  def _start_iterator(self) -> None:
    import grain  # imported when batches are first needed: `import deberta_jax.data` stays light
    origin, stride = self._examples_seen, self.global_batch_size
    dataset = grain.MapDataset.range(0, 1 << 62).map(
        lambda b: self.batch_at(origin + b * stride))
    self._iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=self.read_threads, prefetch_buffer_size=self.prefetch_batches)))
    self._iterator_origin = origin

  def next_batch(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._start_iterator()
    batch = next(self._iterator)
    self._examples_seen += self.global_batch_size
    return batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.next_batch()

  def state(self) -> dict[str, Any]:
    """JSON-serializable position: `seed` and `examples_seen` identify the next batch;
    `dataset_fingerprint` (and `num_chunks`) the rows they count in; `epoch` and `position`
    (within the epoch) are for humans."""
    n = self._examples_seen
    return {"seed": self.seed, "examples_seen": n, "num_chunks": self.num_chunks,
            "dataset_fingerprint": self.fingerprint, "holdout_rows": self.holdout_rows,
            "epoch": n // self.num_train_rows, "position": n % self.num_train_rows,
            "global_batch_size": self.global_batch_size}

  def restore(self, state: dict[str, Any]) -> None:
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise DataError(f"Pipeline state {state!r} lacks {missing}.")
    saved = state.get("dataset_fingerprint")
    if saved is not None and saved != self.fingerprint:
      raise DataError(
          f"The checkpoint's data position counts in dataset {saved}, but this run reads dataset "
          f"{self.fingerprint} ({self.corpus_name}): the corpus, the spm model or "
          f"config.seq_len changed. Resume with the original data, or start a new workdir.")
    if int(state["num_chunks"]) != self.num_chunks:
      raise DataError(
          f"Pipeline state was saved for a corpus of {state['num_chunks']} chunks, this one has "
          f"{self.num_chunks}: the corpus, the spm model or config.seq_len changed.")
    if int(state.get("holdout_rows", 0)) != self.holdout_rows:
      raise DataError(
          f"The checkpoint's data position counts in a training pool with "
          f"{state.get('holdout_rows', 0)} held-out rows; this run holds out "
          f"{self.holdout_rows} (config.eval changed). Resume with the original config.eval.")
    if int(state["seed"]) != self.seed:
      logging.warning("Restoring data order of seed %s (config.seed is %s).", state["seed"],
                      self.seed)
      self.seed = int(state["seed"])
    self._examples_seen = int(state["examples_seen"])
    self._iterator = None  # read-ahead from the old position is dropped

  def __repr__(self) -> str:
    return (f"Pipeline({self.corpus_name}, dataset={self.fingerprint}, rows={self.num_chunks}, "
            f"seq_len={self.seq_len}, batch={self.local_batch_size}/{self.global_batch_size}, "
            f"process={self.process_index}/{self.process_count})")


def _check_seed(seed: Any) -> None:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"config.seed={seed!r} must be a non-negative integer (it keys the data "
                    f"order).")


def _check_layout(global_batch_size: int, process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in [0, process_count="
                    f"{process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise DataError(f"config.global_batch_size={global_batch_size} must be a positive multiple "
                    f"of the process count {process_count}.")


def trained_spm_path(config: Any, corpus: corpus_lib.Corpus) -> str:
  """Where the spm model trained on `corpus` for this config is cached."""
  vocab = int(corpus_lib.cfg_get(config.data, "spm_vocab_size", 128000))
  return storage.join(corpus_lib.resolve_cache_dir(config), "spm",
                      f"spm-{corpus.fingerprint}-{vocab}-v{SPM_SETTINGS_VERSION}.model")


def tokenizer_for(config: Any, corpus: corpus_lib.Corpus | None) -> tokenizer_lib.Tokenizer:
  """config.data.spm_model, or a model trained on the corpus and cached by (corpus, vocab)."""
  spm_model = corpus_lib.cfg_get(config.data, "spm_model", "")
  if spm_model:
    path = storage.absolute(spm_model)
    if not storage.isfile(path):
      raise DataError(f"config.data.spm_model={spm_model!r}: SentencePiece model file not found.")
    return tokenizer_lib.Tokenizer(path)
  assert corpus is not None
  path = trained_spm_path(config, corpus)
  if not storage.exists(path):
    vocab = int(corpus_lib.cfg_get(config.data, "spm_vocab_size", 128000))
    logging.info("Training a %d-piece SentencePiece model on %s into %s", vocab, corpus.name,
                 path)
    tokenizer_lib.train_spm(corpus.lines(), vocab, path[:-len(".model")],
                            max_sentences=int(corpus_lib.cfg_get(
                                config.data, "spm_max_sentences", 500_000)))
  return tokenizer_lib.Tokenizer(path)


def part_bytes(config: Any) -> int:
  return int(float(corpus_lib.cfg_get(config.data, "part_mb", 64)) * (1 << 20))


def _check_vocab(config: Any, tokenizer) -> None:
  tokenizer_lib.check_vocab_size(tokenizer.num_pieces, int(config.model.vocab_size),
                                 tokenizer.model_path)


def cached_dataset_dir(config: Any, corpus: corpus_lib.Corpus, tokenizer) -> str:
  """Where a corpus prepared automatically for this (tokenizer, seq_len) lives in the cache."""
  key = (f"{corpus.fingerprint}-{tokenizer.fingerprint}-L{int(config.seq_len)}-"
         f"p{part_bytes(config)}-v{shards.FORMAT_VERSION}")
  return storage.join(corpus_lib.resolve_cache_dir(config), "prepared", key)


def prepared_from_config(config: Any, process_index: int = 0, process_count: int = 1,
                         num_workers: int = 0) -> tuple[str, dict[str, Any], str]:
  """(prepared dir, manifest, corpus name) for the configured source, preparing it first when
  the source is not already 'prepared'.

  A local cache is prepared whole on every host (each host has its own disk); a gs:// cache is
  shared, so process p prepares parts p, p+P, ... and every process waits for the manifest.
  """
  data = config.data
  source = corpus_lib.cfg_get(data, "source", "embedded")
  if source == "prepared":
    directory = corpus_lib.cfg_get(data, "prepared_dir", "")
    if not directory:
      raise DataError("config.data.prepared_dir is empty; set it to a directory made by "
                      "`python -m deberta_jax.prepare` for config.data.source='prepared'.")
    directory = storage.absolute(directory)
    manifest = shards.read_manifest(directory)
    return directory, manifest, manifest["corpus"]["name"]

  tokenizer = None
  if corpus_lib.cfg_get(data, "spm_model", ""):
    tokenizer = tokenizer_for(config, None)
    _check_vocab(config, tokenizer)
  else:  # a trained model has exactly spm_vocab_size pieces: check before spending the time
    pieces = int(corpus_lib.cfg_get(data, "spm_vocab_size", 128000))
    tokenizer_lib.check_vocab_size(pieces, int(config.model.vocab_size),
                                   f"to be trained: config.data.spm_vocab_size={pieces}")
  corpus = corpus_lib.corpus_from_config(config)
  corpus.check_not_empty()
  if tokenizer is None:
    tokenizer = tokenizer_for(config, corpus)
    _check_vocab(config, tokenizer)
  directory = cached_dataset_dir(config, corpus, tokenizer)
  manifest_path = storage.join(directory, shards.MANIFEST)
  if not storage.exists(manifest_path):
    shared = storage.is_remote(directory) and process_count > 1
    workers = num_workers or min(len(corpus.parts(part_bytes(config))), 8, _cpu_count())
    preparation.prepare(
        corpus, tokenizer, int(config.seq_len), directory, vocab_size=int(config.model.vocab_size),
        part_bytes=part_bytes(config), num_workers=max(1, workers),
        shard_index=process_index if shared else 0, num_shards=process_count if shared else 1)
    _wait_for(manifest_path)
  return directory, shards.read_manifest(directory), corpus.name


def _cpu_count() -> int:
  return os.cpu_count() or 1


def _wait_for(path: str, timeout_s: float = 24 * 3600, poll_s: float = 10.0) -> None:
  """Waits until another host has written `path` (the manifest of a shared preparation)."""
  deadline = time.time() + timeout_s
  while not storage.exists(path):
    if time.time() > deadline:
      raise DataError(f"Timed out waiting for {path}: another host did not finish its shards.")
    time.sleep(poll_s)


def eval_batch_size(config: Any) -> int:
  return int(corpus_lib.cfg_get(config.get("eval", {}), "batch_size", 0)) or int(
      config.global_batch_size)


def holdout_rows(config: Any, num_rows: int) -> int:
  """Rows held out for evaluation: `config.eval.holdout_fraction` of the dataset, at least what
  the evaluation batches read (so no held-out row repeats), at most half of a small dataset."""
  evaluation = config.get("eval", None)
  if evaluation is None or not int(corpus_lib.cfg_get(evaluation, "every_steps", 0)):
    return 0
  needed = int(evaluation.num_batches) * eval_batch_size(config)
  wanted = max(int(np.ceil(float(evaluation.holdout_fraction) * num_rows)), needed)
  return min(wanted, num_rows // 2)


def make_pipeline(config: Any, process_index: int = 0, process_count: int = 1) -> Pipeline:
  """Prepares the data if needed (cached), checks it against the config, returns the batches.

  Cheap checks run first (batch layout, seed, seq_len, spm model file and its fit with
  config.model.vocab_size), so a wrong config fails before any corpus is prepared.
  """
  global_batch_size = int(config.global_batch_size)
  _check_layout(global_batch_size, process_index, process_count)
  _check_seed(config.seed)
  seq_len = int(config.seq_len)
  if seq_len < 3:
    raise DataError(f"config.seq_len={seq_len} must be >= 3 ([CLS], a piece and [SEP]).")
  directory, manifest, corpus_name = prepared_from_config(config, process_index, process_count)
  if int(manifest["seq_len"]) != seq_len:
    raise DataError(f"Prepared dataset {directory} has sequences of {manifest['seq_len']} "
                    f"tokens but config.seq_len={seq_len}; prepare it again with "
                    f"--config.seq_len={seq_len} or set config.seq_len={manifest['seq_len']}.")
  tokenizer = tokenizer_lib.Tokenizer(storage.join(directory, manifest["tokenizer"]["file"]))
  spm_model = corpus_lib.cfg_get(config.data, "spm_model", "")
  if spm_model:
    given = tokenizer_for(config, None)
    if given.fingerprint != tokenizer.fingerprint:
      raise DataError(f"config.data.spm_model={spm_model!r} (fingerprint {given.fingerprint}) is "
                      f"not the model dataset {directory} was tokenised with "
                      f"({tokenizer.fingerprint}).")
  _check_vocab(config, tokenizer)
  rows = PreparedRows(directory, manifest)
  pipeline = Pipeline(rows, tokenizer, seed=int(config.seed), global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count,
                      corpus_name=corpus_name, holdout_rows=holdout_rows(config, len(rows)),
                      read_threads=int(corpus_lib.cfg_get(config.data, "read_threads", 16)),
                      prefetch_batches=int(corpus_lib.cfg_get(config.data, "prefetch_batches", 16)))
  logging.info("%r: %d pieces in %s", pipeline, manifest["num_tokens"], directory)
  return pipeline

"""Deterministic, resumable, per-process batches read from a prepared dataset: `make_pipeline`.

Every source ends up as a prepared dataset (data/shards.py): `source='prepared'` names one made by
`python -m deberta_jax.prepare`; the other sources are prepared into the cache on first use and
read the same way.

Order. The k-th example of the whole run (counting all processes) is position k mod N of epoch
e = k div N over the N training rows, and global batch b is examples [b*G, (b+1)*G),
G = config.global_batch_size. Process p of P takes examples [p*G/P, (p+1)*G/P) of each global
batch: processes read only their own rows, disjoint, and together the global batch (what
`jax.make_array_from_process_local_data` expects). Within an epoch (`BlockOrder`): the training
rows are cut into blocks of `config.data.read_block_rows` consecutive rows of one shard (a block
never crosses a shard, so one ranged GET reads it); the blocks are permuted (keyed by seed and
epoch) and laid end to end, and the rows of each window of `read_block_rows *
config.data.shuffle_window_blocks` places of that sequence are permuted (keyed by seed, epoch and
window; windows are cut at multiples of their size in the run's example count, so batches stay
inside one in every epoch). So a batch takes its rows from a few blocks, and
reads each block's rows in one request (`PreparedRows.read`). The epoch holds one int64 per block
(a 160 GB corpus has ~70M rows: 1.1M blocks of 64, 9 MB), not one per row. With
`read_block_rows=1` the order is the per-row shuffle of earlier versions: grain's `index_shuffle`,
a keyed bijection computed per index, so no N-element array is held.

Reading. Batches are read by grain: a `MapDataset` over batch numbers whose elements are this
process's rows of that batch, iterated with `ReadOptions(num_threads, prefetch_buffer_size)`, so
background threads read the next batches (positioned reads of fixed-size rows, data/storage.py)
while the step runs.

Held-out rows. With evaluation on, whole shards are held out (data/shards.py: a shard is one
part of the corpus, a line-aligned run of its text), so no held-out text is ever packed into a
training row: only a document cut by a part boundary can have its other half on the training side.
Which shards: the smallest prefix of a fixed pseudo-random order of the shards (keyed by the
dataset fingerprint) whose rows reach `config.eval.holdout_fraction` of the dataset, at least one
shard. It depends on the dataset and `config.eval` alone, not on the global batch, the seed or the
host count, so every host agrees and a resume with another batch keeps the same training pool.
Epochs then visit the rows of the other shards (the training pool).

Resumption. The order is a pure function of (seed, block and window sizes, examples seen), so the
state is those numbers plus the dataset fingerprint and the held-out shards (a state without the
block size is the per-row order of earlier versions): `state()` goes into each checkpoint and
`restore(state)` continues with exactly the batch an uninterrupted run would have produced, even
with another number of processes or another global batch (the position counts examples, not
batches), and refuses a state saved on another dataset or another held-out split. Read-ahead
batches are not counted: the position is what the trainer consumed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Iterator

import numpy as np
from absl import logging

from deberta_jax import caches
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
DEFAULT_BLOCK_ROWS = 64
DEFAULT_WINDOW_BLOCKS = 16


class PreparedRows:
  """Random access to the rows of a prepared dataset (local directory or gs://)."""

  def __init__(self, directory: str, manifest: dict[str, Any] | None = None,
               block_rows: int = DEFAULT_BLOCK_ROWS, connections: int = 100,
               retry_minutes: float = 10.0):
    self.directory = storage.absolute(directory)
    self.manifest = manifest or shards.read_manifest(self.directory)
    shards.check_shard_sizes(self.directory, self.manifest)
    self.seq_len = int(self.manifest["seq_len"])
    self.dtype = np.dtype(self.manifest["dtype"])
    self.row_bytes = self.seq_len * self.dtype.itemsize
    self.fingerprint = self.manifest["fingerprint"]
    self.block_rows = max(1, int(block_rows))
    entries = self.manifest["shards"]
    self.shard_files = [s["file"] for s in entries]
    self._starts = np.cumsum([0] + [s["sequences"] for s in entries]).tolist()
    self._start_array = np.asarray(self._starts, dtype=np.int64)
    self._headers = [int(s["header_bytes"]) for s in entries]
    self._reader = storage.RangeReader([storage.join(self.directory, s["file"]) for s in entries],
                                       connections=connections, retry_minutes=retry_minutes)
    self._remote = storage.is_remote(self.directory)
    self.rows_read = 0  # data_bench: requests and CPU per row read
    self._count_lock = threading.Lock()

  def __len__(self) -> int:
    return self._starts[-1]

  def shard_range(self, shard: int) -> tuple[int, int]:
    """[first, last + 1) global row numbers of shard `shard`."""
    return self._starts[shard], self._starts[shard + 1]

  def read_spans(self, rows: np.ndarray) -> list[tuple[int, int, int]]:
    """The requests (shard, first row in the shard, row count) that read `rows`: on an object
    store one per block of `block_rows` rows (counted from the shard's first row) that holds any
    of them, spanning the first to the last wanted row of the block, so each request pays one
    round trip for many rows; on a local disk one per run of consecutive rows (a `pread` costs
    microseconds, and reading rows nobody asked for would only cost bandwidth)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size and not (0 <= rows[0] and rows[-1] < len(self)):
      bad = rows[0] if rows[0] < 0 else rows[-1]
      raise IndexError(f"row {bad} out of range [0, {len(self)})")
    shard = np.searchsorted(self._start_array, rows, side="right") - 1
    local = rows - self._start_array[shard]
    if self._remote:
      group = local // self.block_rows
    else:  # a new group wherever a row does not follow the previous one in the same shard
      step = np.ones(rows.size, dtype=bool)
      step[1:] = (np.diff(rows) != 1) | (np.diff(shard) != 0)
      group = np.cumsum(step)
    cut = np.flatnonzero(np.r_[True, (np.diff(shard) != 0) | (np.diff(group) != 0)])
    last = np.r_[cut[1:], rows.size] - 1
    return [(int(shard[a]), int(local[a]), int(local[b] - local[a] + 1))
            for a, b in zip(cut, last)]

  def read(self, rows: np.ndarray) -> np.ndarray:
    """int32 [len(rows), seq_len] of global row numbers `rows` (read_spans: one request per block
    on an object store)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    spans = self.read_spans(rows)
    with self._count_lock:
      self.rows_read += rows.size
    data = self._reader.read([(shard, self._headers[shard] + first * self.row_bytes,
                               count * self.row_bytes) for shard, first, count in spans])
    span_rows = [np.frombuffer(d, dtype=self.dtype).reshape(-1, self.seq_len) for d in data]
    # Where each wanted row is in the concatenated spans.
    offsets = np.cumsum([0] + [count for _, _, count in spans])
    starts = np.asarray([self._starts[shard] + first for shard, first, _ in spans],
                        dtype=np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    everything = (np.concatenate(span_rows) if span_rows
                  else np.zeros((0, self.seq_len), self.dtype))
    return everything[offsets[which] + rows - starts[which]].astype(np.int32)


class ShardRows:
  """The rows of some shards numbered 0 .. len-1 (shard by shard): the held-out set or the
  training pool, mapped to global row numbers."""

  def __init__(self, rows: PreparedRows, shard_indices):
    self.shards = tuple(int(i) for i in shard_indices)
    ranges = [rows.shard_range(i) for i in self.shards]
    self._firsts = np.asarray([a for a, _ in ranges], dtype=np.int64)
    self._starts = np.cumsum([0] + [b - a for a, b in ranges]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def to_rows(self, positions) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    which = np.searchsorted(self._starts, positions, side="right") - 1
    return self._firsts[which] + positions - self._starts[which]


class BlockOrder:
  """The training order of one pool (module docstring): blocks of `block_rows` consecutive rows
  of one shard, permuted per epoch and laid end to end; then the rows of each window of
  `block_rows * window_blocks` consecutive places of that sequence are permuted. Windows are
  cut at multiples of their size in the run's example count (and at epoch ends), so batches
  whose size divides the window (or is a multiple of it) never straddle two. The shorter last
  blocks of shards go after the full ones (in their own permutation): then in the first epoch
  every window but the last few is exactly `window_blocks` whole blocks, and a batch of 256 at
  the defaults reads 16 blocks, not the 17 a window cut across two blocks costs (as in later
  epochs, which start mid-window). Short blocks are ~0.1% of the rows of 64 MB parts.

  `positions(seed, start, count)` gives the pool positions of global examples
  start .. start+count-1. Thread-safe (grain's reader threads share it); keeps the layout of the
  two epochs used last. The permutations are numpy's (`Generator(Philox(SeedSequence(key)))
  .permutation`): cheap for a million blocks, where index_shuffle costs ~5 us per call; a numpy
  release that changed that stream would change the order, not its properties."""

  def __init__(self, pool: ShardRows, block_rows: int, window_blocks: int):
    self.block_rows, self.window_blocks = int(block_rows), int(window_blocks)
    self.window_rows = self.block_rows * self.window_blocks
    starts, lengths = [], []
    for first, stop in zip(pool._starts[:-1].tolist(), pool._starts[1:].tolist()):
      block_starts = np.arange(first, stop, self.block_rows, dtype=np.int64)
      starts.append(block_starts)
      lengths.append(np.minimum(self.block_rows, stop - block_starts))
    self.block_starts = np.concatenate(starts)
    self.block_lengths = np.concatenate(lengths)
    self.size = len(pool)
    self._epochs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()

  @staticmethod
  def _generator(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(k) for k in key])))

  def _epoch(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(first pool position, first place in the epoch) of each block, in the epoch's order."""
    with self._lock:
      layout = self._epochs.get((seed, epoch))
      if layout is None:
        generator = self._generator(seed, epoch, 0)
        full = np.flatnonzero(self.block_lengths == self.block_rows)
        short = np.flatnonzero(self.block_lengths != self.block_rows)
        order = np.concatenate([full[generator.permutation(len(full))],
                                short[generator.permutation(len(short))]])
        lengths = self.block_lengths[order]
        layout = self.block_starts[order], np.cumsum(lengths) - lengths
        if len(self._epochs) >= 2:
          self._epochs.pop(next(iter(self._epochs)))
        self._epochs[(seed, epoch)] = layout
      return layout

  def positions(self, seed: int, start: int, count: int) -> np.ndarray:
    k = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(k, self.size)
    # Windows are cut at multiples of window_rows of the whole run's example count (and at epoch
    # ends), not of the epoch's: an epoch rarely holds a whole number of batches, and windows
    # counted from its start would put every batch of the next epochs across two of them.
    windows = k // self.window_rows
    places = np.empty(count, dtype=np.int64)
    for epoch, window in sorted(set(zip(epochs.tolist(), windows.tolist()))):
      here = (epochs == epoch) & (windows == window)
      epoch_start = epoch * self.size
      first = max(window * self.window_rows, epoch_start)
      stop = min((window + 1) * self.window_rows, epoch_start + self.size)
      shuffled = self._generator(seed, epoch, 1, window).permutation(stop - first)
      places[here] = first - epoch_start + shuffled[k[here] - first]
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs).tolist():
      block_first, block_place = self._epoch(seed, epoch)
      mask = epochs == epoch
      block = np.searchsorted(block_place, places[mask], side="right") - 1
      out[mask] = block_first[block] + places[mask] - block_place[block]
    return out


def _shuffled(index: int, size: int, seed: int) -> int:
  """index_shuffle of `index` in [0, size) (a keyed bijection, nothing held in memory)."""
  from grain.experimental import index_shuffle  # grain loads its C++ extension on import
  if size == 1:
    return 0
  return index_shuffle(index, max_index=size - 1, seed=seed, rounds=_SHUFFLE_ROUNDS)


def epoch_seed(seed: int, epoch: int) -> int:
  """The index_shuffle key of one epoch (a 32-bit value derived from both numbers)."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


def choose_holdout_shards(rows: PreparedRows, fraction: float) -> tuple[int, ...]:
  """The held-out shards of a dataset at `fraction` (module docstring): shards in a fixed order
  keyed by the dataset fingerprint, taken while the held-out rows stay at most half the dataset,
  until they reach `fraction` of its rows. Raises DataError when no shard can be held out."""
  total = len(rows)
  count = len(rows.shard_files)
  order = sorted(range(count), key=lambda i: hashlib.sha256(
      f"{rows.fingerprint}/{rows.shard_files[i]}".encode()).hexdigest())
  wanted = max(1, int(np.ceil(float(fraction) * total)))
  chosen, held = [], 0
  for shard in order:
    first, stop = rows.shard_range(shard)
    if len(chosen) + 1 < count and held + (stop - first) <= total // 2:
      chosen.append(shard)
      held += stop - first
    if held >= wanted:
      break
  if not chosen:
    raise DataError(
        f"Prepared dataset {rows.directory} has {count} shard(s) of {total} rows: the held-out "
        f"evaluation holds out whole shards (never rows of a shard that is trained on) and none "
        f"can be held out leaving at least half the rows for training. Prepare the corpus in "
        f"more, smaller parts (config.data.part_mb, now giving {count}) or turn the evaluation "
        f"off (--config.eval.every_steps=0).")
  return tuple(sorted(chosen))


class Pipeline:
  """Endless batches {'input_ids', 'attention_mask'}: int32 [global_batch_size // process_count,
  seq_len], this process's slice of every global batch."""

  def __init__(self, rows: PreparedRows, tokenizer: tokenizer_lib.Tokenizer, *, seed: int,
               global_batch_size: int, process_index: int = 0, process_count: int = 1,
               corpus_name: str = "", read_threads: int = 16, prefetch_batches: int = 16,
               holdout_shards=(), read_block_rows: int = DEFAULT_BLOCK_ROWS,
               shuffle_window_blocks: int = DEFAULT_WINDOW_BLOCKS):
    _check_layout(global_batch_size, process_index, process_count)
    _check_seed(seed)
    holdout_shards = tuple(sorted(int(i) for i in holdout_shards))
    if len(holdout_shards) >= len(rows.shard_files):
      raise DataError(f"All {len(rows.shard_files)} shards of {rows.directory} would be held "
                      f"out; at least one must be trained on.")
    self.rows = rows
    self.holdout = ShardRows(rows, holdout_shards)
    self.train = ShardRows(rows, [i for i in range(len(rows.shard_files))
                                  if i not in holdout_shards])
    if int(read_block_rows) < 1 or int(shuffle_window_blocks) < 1:
      raise DataError(f"config.data.read_block_rows={read_block_rows} and "
                      f"config.data.shuffle_window_blocks={shuffle_window_blocks} must be >= 1.")
    self._set_order(int(read_block_rows), int(shuffle_window_blocks))
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
  def holdout_rows(self) -> int:
    return len(self.holdout)

  @property
  def num_train_rows(self) -> int:
    return len(self.train)

  @property
  def holdout_files(self) -> list[str]:
    return [self.rows.shard_files[i] for i in self.holdout.shards]

  def holdout_indices(self, count: int) -> np.ndarray:
    """Row numbers of held-out examples 0 .. count-1: the held-out rows in a fixed order keyed
    by the dataset alone (the same on every host, for every seed and batch size), wrapping
    around when more are asked for than there are."""
    if not self.holdout_rows:
      raise DataError("No rows are held out (config.eval.every_steps=0).")
    key = int(self.fingerprint, 16) & 0x7FFFFFFF
    n = self.holdout_rows
    return self.holdout.to_rows([_shuffled(i % n, n, key) for i in range(count)])

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

  def _set_order(self, block_rows: int, window_blocks: int) -> None:
    self.read_block_rows, self.shuffle_window_blocks = block_rows, window_blocks
    self.rows.block_rows = block_rows
    self._order = (BlockOrder(self.train, block_rows, window_blocks) if block_rows > 1
                   else None)

  def chunk_indices(self, start: int, count: int) -> np.ndarray:
    """Row numbers of global examples start .. start+count-1."""
    if self._order is not None:
      return self.train.to_rows(self._order.positions(self.seed, start, count))
    n = self.num_train_rows
    pool = []
    for position in range(start, start + count):
      epoch, offset = divmod(position, n)
      pool.append(_shuffled(offset, n, epoch_seed(self.seed, epoch)))
    return self.train.to_rows(pool)

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
    `dataset_fingerprint`, `num_chunks` and `holdout_shards` the rows they count in; `epoch`,
    `position` (within the epoch) and `global_batch_size` are for humans."""
    n = self._examples_seen
    return {"seed": self.seed, "examples_seen": n, "num_chunks": self.num_chunks,
            "dataset_fingerprint": self.fingerprint, "holdout_rows": self.holdout_rows,
            "holdout_shards": self.holdout_files,
            "read_block_rows": self.read_block_rows,
            "shuffle_window_blocks": self.shuffle_window_blocks,
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
    held = state.get("holdout_shards")
    if held is None and int(state.get("holdout_rows", 0)):
      raise DataError(
          "The checkpoint's data position counts in a training pool with held-out rows chosen "
          "row by row (an older deberta_jax); this one holds out whole shards. Resume with "
          "--config.eval.every_steps=0 or start a new workdir.")
    if list(held or []) != self.holdout_files:
      raise DataError(
          f"The checkpoint's data position counts in a training pool without the held-out shards "
          f"{list(held or [])}; this run holds out {self.holdout_files} (config.eval.every_steps "
          f"or config.eval.holdout_fraction changed). Resume with the original config.eval.")
    if int(state["seed"]) != self.seed:
      logging.warning("Restoring data order of seed %s (config.seed is %s).", state["seed"],
                      self.seed)
      self.seed = int(state["seed"])
    # The order the checkpoint counted in goes on (a state without these fields was saved by a
    # version that shuffled rows one by one).
    order = (int(state.get("read_block_rows", 1)), int(state.get("shuffle_window_blocks",
                                                                 self.shuffle_window_blocks)))
    if order != (self.read_block_rows, self.shuffle_window_blocks):
      logging.warning("Restoring the data order of read_block_rows=%d, shuffle_window_blocks=%d "
                      "that the checkpoint counts in (config.data has %d, %d).", *order,
                      self.read_block_rows, self.shuffle_window_blocks)
      self._set_order(*order)
    self._examples_seen = int(state["examples_seen"])
    self._iterator = None  # read-ahead from the old position is dropped

  def __repr__(self) -> str:
    return (f"Pipeline({self.corpus_name}, dataset={self.fingerprint}, rows={self.num_chunks}, "
            f"held out={self.holdout_rows} in {len(self.holdout.shards)} shard(s), "
            f"seq_len={self.seq_len}, batch={self.local_batch_size}/{self.global_batch_size}, "
            f"blocks of {self.read_block_rows} rows, {self.shuffle_window_blocks} per window, "
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
  return storage.join(caches.directory(config), "spm",
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
  return storage.join(caches.directory(config), "prepared", key)


def prepared_from_config(config: Any, process_index: int = 0, process_count: int = 1,
                         num_workers: int = 0) -> tuple[str, dict[str, Any], str]:
  """(prepared dir, manifest, corpus name) for the configured source, preparing it first when
  the source is not already 'prepared'.

  A local cache is prepared whole on every host (each host has its own disk); a gs:// cache is
  shared, so process p prepares parts p, p+P, ... and every process waits for the manifest, at
  most config.data.prepare_wait_minutes. A single process turns SIGTERM during the preparation
  into errors.Preempted; several leave SIGTERM to JAX's preemption notifier, which holds it.
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
    count = len(corpus.parts(part_bytes(config)))
    workers = num_workers or min(count, 8, _cpu_count())
    preparation.prepare(
        corpus, tokenizer, int(config.seq_len), directory, vocab_size=int(config.model.vocab_size),
        part_bytes=part_bytes(config), num_workers=max(1, workers),
        shard_index=process_index if shared else 0, num_shards=process_count if shared else 1,
        handle_sigterm=process_count == 1)
    minutes = float(corpus_lib.cfg_get(data, "prepare_wait_minutes", 60.0))
    _wait_for(directory, count, process_count if shared else 1, minutes * 60.0)
  return directory, shards.read_manifest(directory), corpus.name


def _cpu_count() -> int:
  return os.cpu_count() or 1


def _wait_for(directory: str, count: int, process_count: int, timeout_s: float,
              log_every_s: float = 60.0) -> None:
  """Waits until the manifest of a shared preparation is written (by the host that finishes the
  last shard), logging how many of the `count` shard records exist; after `timeout_s` raises a
  DataError naming the missing shards and the processes whose share they are (part i is process
  i % process_count's), since a host that died never finishes its share."""
  path = storage.join(directory, shards.MANIFEST)
  poll_s = min(10.0, max(0.05, timeout_s / 20))
  start = last_log = time.monotonic()
  first = True
  while not storage.exists(path):
    waited = time.monotonic() - start
    if first or waited > timeout_s or time.monotonic() - last_log >= log_every_s:
      first, last_log = False, time.monotonic()
      try:
        names = {os.path.basename(p.rstrip("/")) for p in storage.listdir(directory)}
      except FileNotFoundError:  # no host has written anything yet
        names = set()
      missing = [i for i in range(count) if shards.record_name(i, count) not in names]
      owners = sorted({i % process_count for i in missing})
      if waited > timeout_s:
        listed = ", ".join(shards.shard_name(i, count) for i in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        why = (f"{len(missing)} of {count} shards are missing ({listed}{more}; the share of "
               f"process {', '.join(map(str, owners))}: that host failed or is still preparing)"
               if missing else f"all {count} shard records exist but the host that finished the "
               f"last one stopped before writing {shards.MANIFEST}")
        raise DataError(
            f"Waited {timeout_s / 60:.1f} min (config.data.prepare_wait_minutes) for {path}: "
            f"{why}. Rerun (finished shards are kept), or raise "
            f"config.data.prepare_wait_minutes if preparation is just slow.")
      logging.info("Waiting for %s: %d of %d shard records exist (missing: process %s's); "
                   "%.1f of %.1f min waited", path, count - len(missing), count,
                   ", ".join(map(str, owners)) or "none", waited / 60, timeout_s / 60)
    time.sleep(poll_s)


def eval_batch_size(config: Any) -> int:
  return int(corpus_lib.cfg_get(config.get("eval", {}), "batch_size", 0)) or int(
      config.global_batch_size)


def holdout_shards(config: Any, rows: PreparedRows) -> tuple[int, ...]:
  """The shards held out for evaluation (choose_holdout_shards), none when it is off."""
  evaluation = config.get("eval", None)
  if evaluation is None or not int(corpus_lib.cfg_get(evaluation, "every_steps", 0)):
    return ()
  return choose_holdout_shards(rows, float(evaluation.holdout_fraction))


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
  shards.check_tokenizer(directory, manifest, tokenizer.fingerprint)
  spm_model = corpus_lib.cfg_get(config.data, "spm_model", "")
  if spm_model:
    given = tokenizer_for(config, None)
    if given.fingerprint != tokenizer.fingerprint:
      raise DataError(f"config.data.spm_model={spm_model!r} (fingerprint {given.fingerprint}) is "
                      f"not the model dataset {directory} was tokenised with "
                      f"({tokenizer.fingerprint}).")
  _check_vocab(config, tokenizer)
  rows = PreparedRows(directory, manifest,
                      connections=int(corpus_lib.cfg_get(config.data, "read_connections", 100)),
                      retry_minutes=float(corpus_lib.cfg_get(config.data, "read_retry_minutes",
                                                             10.0)))
  pipeline = Pipeline(rows, tokenizer, seed=int(config.seed), global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count,
                      corpus_name=corpus_name, holdout_shards=holdout_shards(config, rows),
                      read_threads=int(corpus_lib.cfg_get(config.data, "read_threads", 16)),
                      prefetch_batches=int(corpus_lib.cfg_get(config.data, "prefetch_batches", 16)),
                      read_block_rows=int(corpus_lib.cfg_get(config.data, "read_block_rows",
                                                             DEFAULT_BLOCK_ROWS)),
                      shuffle_window_blocks=int(corpus_lib.cfg_get(
                          config.data, "shuffle_window_blocks", DEFAULT_WINDOW_BLOCKS)))
  logging.info("%r: %d pieces in %s", pipeline, manifest["num_tokens"], directory)
  return pipeline

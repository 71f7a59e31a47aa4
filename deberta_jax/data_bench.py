"""How fast the loader feeds one host: batches of a prepared dataset, read as training reads them.

  python -m deberta_jax.data_bench --prepared_dir=DIR --batch=256 --batches=200 --cold

Reads `--batches` batches of `--batch` sequences through `data.pipeline.Pipeline` (the global
shuffle, this process's rows, grain's read-ahead threads) and prints one JSON line last, with
`tokens_per_second` (sequence positions read per second, padding included, as the trainer's
figure counts them), `requests_per_row` (byte ranges asked of the store per row read: one GET
each on gs://, one `pread` locally) and `cpu_ms_per_row` (CPU time of the whole process, every
thread, per row read). `--cold` first evicts the shards from the page cache
(`posix_fadvise(DONTNEED)` after an fsync; local files only), which is what a fresh VM, or a
dataset larger than RAM, sees; a gs:// dataset is always read from the server.
`--process_count=P` reads one process's share (batch / P rows of each global batch).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from deberta_jax import cli
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.data import storage

_DIR = flags.DEFINE_string("prepared_dir", None, "A prepared dataset (local or gs://).")
_BATCH = flags.DEFINE_integer("batch", 256, "Global batch size (sequences).")
_BATCHES = flags.DEFINE_integer("batches", 100, "Batches to time (after one untimed batch).")
_COLD = flags.DEFINE_bool("cold", False, "Evict the shards from the page cache first.")
_THREADS = flags.DEFINE_integer("read_threads", 16, "config.data.read_threads.")
_PREFETCH = flags.DEFINE_integer("prefetch_batches", 16, "config.data.prefetch_batches.")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "Processes sharing each batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Data-order seed.")
_BLOCK = flags.DEFINE_integer("read_block_rows", pipeline_lib.DEFAULT_BLOCK_ROWS,
                              "config.data.read_block_rows (1 = one request per row).")
_WINDOW = flags.DEFINE_integer("shuffle_window_blocks", pipeline_lib.DEFAULT_WINDOW_BLOCKS,
                               "config.data.shuffle_window_blocks.")
_CONNECTIONS = flags.DEFINE_integer("read_connections", 100, "config.data.read_connections.")


def evict_from_page_cache(paths: list[str]) -> int:
  """Drops the cached pages of local files; returns how many files it could evict."""
  evicted = 0
  for path in paths:
    if storage.is_remote(path) or not hasattr(os, "posix_fadvise"):
      continue
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)  # dirty pages cannot be dropped
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      evicted += 1
    finally:
      os.close(fd)
  return evicted


def main(argv):
  if len(argv) > 1:
    raise cli.app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _DIR.value:
    raise cli.app.UsageError("--prepared_dir is required.")
  rows = pipeline_lib.PreparedRows(_DIR.value, connections=_CONNECTIONS.value)
  files = [storage.join(rows.directory, s["file"]) for s in rows.manifest["shards"]]
  evicted = evict_from_page_cache(files) if _COLD.value else 0
  tokenizer = tokenizer_lib.Tokenizer(storage.join(rows.directory,
                                                   rows.manifest["tokenizer"]["file"]))
  pipeline = pipeline_lib.Pipeline(
      rows, tokenizer, seed=_SEED.value, global_batch_size=_BATCH.value,
      process_count=_PROCESS_COUNT.value, read_threads=_THREADS.value,
      prefetch_batches=_PREFETCH.value, read_block_rows=_BLOCK.value,
      shuffle_window_blocks=_WINDOW.value)
  pipeline.next_batch()  # starts the threads; not timed
  reader = rows._reader  # pylint: disable=protected-access
  requests_before, rows_before, cpu_before = reader.requests, rows.rows_read, time.process_time()
  start = time.perf_counter()
  for _ in range(_BATCHES.value):
    batch = pipeline.next_batch()
  seconds = time.perf_counter() - start
  # Read-ahead goes on while this loop runs: requests and CPU are per row read in the timed span
  # (batches taken and batches read ahead alike).
  cpu = time.process_time() - cpu_before
  requests = reader.requests - requests_before
  rows_read = max(1, rows.rows_read - rows_before)
  tokens = _BATCHES.value * batch["input_ids"].size
  print(json.dumps({
      "prepared_dir": rows.directory, "cold": bool(_COLD.value), "files_evicted": evicted,
      "seq_len": rows.seq_len, "dtype": str(rows.dtype), "rows_in_dataset": len(rows),
      "local_batch": pipeline.local_batch_size, "batches": _BATCHES.value,
      "read_threads": _THREADS.value, "read_block_rows": _BLOCK.value,
      "shuffle_window_blocks": _WINDOW.value, "read_connections": _CONNECTIONS.value,
      "seconds": round(seconds, 3),
      "requests_per_row": round(requests / rows_read, 4),
      "cpu_ms_per_row": round(1000 * cpu / rows_read, 4),
      "sequences_per_second": round(_BATCHES.value * pipeline.local_batch_size / seconds, 1),
      "tokens_per_second": round(tokens / seconds, 1)}))


if __name__ == "__main__":
  cli.run(main)

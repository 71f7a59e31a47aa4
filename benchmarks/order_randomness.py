"""How random the loader's training order is: block order against the per-row shuffle.

  python benchmarks/order_randomness.py --rows=70000000 --shard_rows=28000 --batch=256

Rows are packed with no document boundaries, so rows close together in a shard hold the same or
neighbouring documents: how often two examples the step sees together come from the same
neighbourhood measures how correlated the order is. For each setting (`read_block_rows`,
`shuffle_window_blocks`), over `--batches` global batches from the start of an epoch of a pool of
`--rows` rows in shards of `--shard_rows`, it prints one JSON line with:

  * `neighbours_within_64`: fraction of consecutive examples (k, k+1) whose rows are in the same
    shard less than 64 rows apart (at 512 tokens a row, ~32k tokens: one long document);
  * `pairs_in_batch_within_64`: the same for all pairs of examples of one batch;
  * `lag1_corr`: correlation of consecutive examples' row numbers (0 for an unordered stream);
  * `blocks_per_batch`: distinct 64-row blocks a batch reads (its requests on gs://).

Computed from `BlockOrder` and the per-row `index_shuffle` directly (no data is read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from deberta_jax.data import pipeline as pipeline_lib  # noqa: E402


class _Pool:
  """The numbering ShardRows gives a training pool of equal shards (what BlockOrder reads)."""

  def __init__(self, rows: int, shard_rows: int):
    self._starts = np.r_[np.arange(0, rows, shard_rows), rows].astype(np.int64)

  def __len__(self) -> int:
    return int(self._starts[-1])


def measure(order_fn, rows: int, shard_rows: int, batch: int, batches: int) -> dict:
  near = pairs = near_pairs = 0
  blocks, lag = [], []
  for b in range(batches):
    r = order_fn(b * batch, batch)
    shard = r // shard_rows
    close = (shard[1:] == shard[:-1]) & (np.abs(np.diff(r)) < 64)
    near += int(close.sum())
    diff = np.abs(r[:, None] - r[None, :])
    same = (shard[:, None] == shard[None, :]) & (diff < 64)
    near_pairs += int((np.triu(same, 1)).sum())
    pairs += batch * (batch - 1) // 2
    blocks.append(len(set(zip(shard.tolist(), ((r % shard_rows) // 64).tolist()))))
    lag.append(r)
  stream = np.concatenate(lag).astype(np.float64)
  return {"neighbours_within_64": near / (batches * (batch - 1)),
          "pairs_in_batch_within_64": near_pairs / pairs,
          "lag1_corr": float(np.corrcoef(stream[:-1], stream[1:])[0, 1]),
          "blocks_per_batch": float(np.mean(blocks))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=70_000_000)
  parser.add_argument("--shard_rows", type=int, default=28_000)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--settings", default="1:1,64:16,64:64,32:32",
                      help="read_block_rows:shuffle_window_blocks pairs")
  args = parser.parse_args()
  pool = _Pool(args.rows, args.shard_rows)
  for setting in args.settings.split(","):
    block, window = (int(x) for x in setting.split(":"))
    if block == 1:
      key = pipeline_lib.epoch_seed(args.seed, 0)
      shuffled = pipeline_lib._shuffled  # pylint: disable=protected-access
      def order_fn(start, count, key=key):
        return np.asarray([shuffled(i, args.rows, key) for i in range(start, start + count)],
                          dtype=np.int64)
    else:
      order = pipeline_lib.BlockOrder(pool, block, window)
      def order_fn(start, count, order=order):
        return order.positions(args.seed, start, count)
    print(json.dumps({"read_block_rows": block, "shuffle_window_blocks": window,
                      "rows": args.rows, "batch": args.batch,
                      **measure(order_fn, args.rows, args.shard_rows, args.batch,
                                args.batches)}), flush=True)


if __name__ == "__main__":
  main()

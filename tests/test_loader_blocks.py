"""The block order of the loader: blocks of consecutive rows of one shard, shuffled, then rows
shuffled within windows of blocks; each batch reads a block's rows in one request; the order is
deterministic, resumes exactly, is the same global stream for any host count or global batch, and
gives processes disjoint rows. Reads on gs:// go to the GCS API server on 127.0.0.1."""

import os

import fsspec
import ml_collections
import numpy as np
import pytest

from deberta_jax import config as config_lib
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.data import preparation
from deberta_jax.data import shards
from deberta_jax.data import spm as tokenizer_lib
from tests.gcs_server import gcs_bucket, gcs_dir, gcs_server  # noqa: F401  pylint: disable=unused-import

SEQ_LEN = 16
BLOCK, WINDOW = 4, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A prepared dataset of numbered lines in several shards of unequal
  size, so blocks end early at shard ends; returns (directory, all rows in order)."""
  root = tmp_path_factory.mktemp("blocks")
  spm = tokenizer_lib.train_spm(corpus_lib.embedded_documents(200_000), 500, str(root / "spm"))
  tok = tokenizer_lib.Tokenizer(spm)
  text = root / "rows.txt"
  text.write_text("".join(f"row {i:04d} is {i * 7919 % 10007:05d}\n" for i in range(300)))
  out = str(root / "prepared")
  preparation.prepare(corpus_lib.text_file_corpus(str(text)), tok, SEQ_LEN, out, vocab_size=512,
                      part_bytes=1000, progress=False)
  manifest = shards.read_manifest(out)
  rows = np.concatenate([np.load(os.path.join(out, s["file"])) for s in manifest["shards"]])
  assert len(manifest["shards"]) >= 3
  return out, rows.astype(np.int32)


def _pipeline(directory, batch=12, index=0, count=1, seed=5, block=BLOCK, window=WINDOW,
              holdout=()):
  rows = pipeline_lib.PreparedRows(directory)
  tok = tokenizer_lib.Tokenizer(os.path.join(directory, "spm.model"))
  return pipeline_lib.Pipeline(rows, tok, seed=seed, global_batch_size=batch, process_index=index,
                               process_count=count, read_threads=2, prefetch_batches=2,
                               holdout_shards=holdout, read_block_rows=block,
                               shuffle_window_blocks=window)


def _block_of(p, row):
  """(shard, block within the shard) of a global row number."""
  starts = [p.rows.shard_range(i)[0] for i in range(len(p.rows.shard_files))]
  shard = int(np.searchsorted(starts, row, side="right") - 1)
  return shard, (row - p.rows.shard_range(shard)[0]) // p.read_block_rows


def test_each_epoch_is_a_permutation_made_of_windows_of_blocks(dataset):
  directory, _ = dataset
  p = _pipeline(directory, holdout=(1,))
  n = p.num_train_rows
  trained = sorted(set(range(len(p.rows))) - set(range(*p.rows.shard_range(1))))
  first, second = p.chunk_indices(0, n), p.chunk_indices(n, n)
  assert sorted(first.tolist()) == trained and sorted(second.tolist()) == trained
  assert first.tolist() != second.tolist()
  assert first.tolist() != sorted(first.tolist())
  # Each window of BLOCK * WINDOW places takes its rows from at most WINDOW + 1 blocks (the
  # first and last may be shared with the neighbouring windows) plus the short last blocks of
  # shards it holds, all inside one shard, and each block's rows lie in one window or two
  # neighbouring ones.
  windows_of = {}
  for w in range(-(-n // (BLOCK * WINDOW))):
    rows = first[w * BLOCK * WINDOW:(w + 1) * BLOCK * WINDOW].tolist()
    blocks = {_block_of(p, r) for r in rows}
    short = {(i, b) for i, b in blocks if p.rows.shard_range(i)[0] + (b + 1) * BLOCK >
             p.rows.shard_range(i)[1]}
    assert len(blocks - short) <= WINDOW + 1, (w, blocks)
    for block in blocks:
      windows_of.setdefault(block, []).append(w)
  for (shard, block), windows in windows_of.items():
    assert windows in ([windows[0]], [windows[0], windows[0] + 1]), (shard, block, windows)
    first_row, stop = p.rows.shard_range(shard)
    assert first_row + block * BLOCK < stop  # every block lies inside its shard
  assert len(windows_of) == sum(-(-(b - a) // BLOCK) for a, b in (
      p.rows.shard_range(i) for i in p.train.shards))


def test_order_is_deterministic_and_keyed_by_seed_and_block_settings(dataset):
  directory, _ = dataset
  a = _pipeline(directory).chunk_indices(0, 100)
  np.testing.assert_array_equal(_pipeline(directory).chunk_indices(0, 100), a)
  for other in (_pipeline(directory, seed=6), _pipeline(directory, block=5),
                _pipeline(directory, window=2)):
    assert other.chunk_indices(0, 100).tolist() != a.tolist()


def test_resume_host_count_and_global_batch_keep_the_global_stream(dataset):
  directory, rows = dataset
  steps = 60  # 720 examples: more than two epochs of 300 rows
  whole = _pipeline(directory)
  reference = np.concatenate([whole.next_batch()["input_ids"] for _ in range(steps)])
  np.testing.assert_array_equal(reference, whole.rows.read(whole.chunk_indices(0, 12 * steps)))
  # Interrupted at step 25, resumed from the JSON state on three hosts with batch 18.
  first = _pipeline(directory)
  for _ in range(25):
    first.next_batch()
  state = first.state()
  assert state["read_block_rows"] == BLOCK and state["shuffle_window_blocks"] == WINDOW
  hosts = [_pipeline(directory, batch=18, index=i, count=3) for i in range(3)]
  for h in hosts:
    h.restore(state)
  resumed = []
  for _ in range(20):
    resumed.append(np.concatenate([h.next_batch()["input_ids"] for h in hosts]))
  np.testing.assert_array_equal(np.concatenate(resumed), reference[25 * 12:25 * 12 + 360])
  # Each host reads its slice of every global batch: rows distinct within an epoch.
  hosts = [_pipeline(directory, batch=12, index=i, count=3) for i in range(3)]
  for step in range(30):
    mine = [whole.chunk_indices(step * 12 + i * 4, 4) for i in range(3)]
    for h, wanted in zip(hosts, mine):
      np.testing.assert_array_equal(h.next_batch()["input_ids"], rows[wanted])
    if (step + 1) * 12 <= whole.num_train_rows:
      assert len(set(np.concatenate(mine).tolist())) == 12


def test_resume_keeps_the_checkpoints_order(dataset):
  """A state saved with other block settings, or by a version without them (per-row order),
  continues in that order, not in the config's."""
  directory, _ = dataset
  per_row = _pipeline(directory, block=1)
  expected = per_row.chunk_indices(36, 24)
  old_state = {k: v for k, v in per_row.state().items()
               if k not in ("read_block_rows", "shuffle_window_blocks")}
  old_state["examples_seen"] = 36
  p = _pipeline(directory)
  p.restore(old_state)
  assert p.read_block_rows == 1
  got = np.concatenate([p.next_batch()["input_ids"] for _ in range(2)])
  np.testing.assert_array_equal(got, per_row.rows.read(expected))
  q = _pipeline(directory, block=7, window=2)
  q.restore(_pipeline(directory).state())
  assert (q.read_block_rows, q.shuffle_window_blocks) == (BLOCK, WINDOW)
  np.testing.assert_array_equal(q.chunk_indices(0, 50), _pipeline(directory).chunk_indices(0, 50))


def test_reads_coalesce_rows_of_a_block_into_one_request(dataset, gcs_dir):
  directory, rows = dataset
  fs = fsspec.filesystem("gs")
  for name in sorted(os.listdir(directory)):
    fs.put_file(os.path.join(directory, name), f"{gcs_dir}/{name}")
  batch = 24
  local = _pipeline(directory, batch=batch)
  remote = _pipeline(gcs_dir, batch=batch)
  wanted = remote.chunk_indices(0, batch)
  spans = remote.rows.read_spans(wanted)
  blocks = {_block_of(remote, r) for r in wanted.tolist()}
  assert len(spans) == len(blocks) < batch  # one request per block touched
  for shard, first, count in spans:
    assert count <= BLOCK and first // BLOCK == (first + count - 1) // BLOCK
  for _ in range(4):
    a, b = local.next_batch(), remote.next_batch()
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  np.testing.assert_array_equal(remote.rows.read(np.array([5, 3, 5, 250, 4])),
                                rows[[5, 3, 5, 250, 4]])
  # Locally a request is one run of consecutive rows: no byte is read that was not asked for.
  assert local.rows.read_spans(np.array([9, 3, 4, 5, 10, 40])) == [
      (s, f, c) for s, f, c in local.rows.read_spans(np.array([3, 4, 5, 9, 10, 40]))]
  assert sum(c for _, _, c in local.rows.read_spans(np.array([9, 3, 4, 5, 10, 40]))) == 6


def test_defaults_cut_requests_per_row_sixteenfold():
  """At the defaults (64-row blocks, 16 per window) a local batch of 256 takes its rows from the
  16 blocks of one window: one request per 16 rows, against one per row with read_block_rows=1
  (shards of 1,000 rows end in short blocks, which must not shift windows)."""

  class Pool:  # 40 shards of 1,000 rows, as ShardRows numbers them
    _starts = np.arange(0, 40_001, 1000, dtype=np.int64)

    def __len__(self):
      return 40_000
  order = pipeline_lib.BlockOrder(Pool(), pipeline_lib.DEFAULT_BLOCK_ROWS,
                                  pipeline_lib.DEFAULT_WINDOW_BLOCKS)
  blocks_per_batch = []
  for b in range(140):  # up to the short blocks at the end of the epoch
    positions = order.positions(3, b * 256, 256)
    blocks_per_batch.append(len({(int(p) // 1000, int(p) % 1000 // 64) for p in positions}))
  assert max(blocks_per_batch) <= 16, blocks_per_batch
  # The next epoch starts mid-window (40,000 is no multiple of 1,024): its batches still stay in
  # one window, whose ends cut through a block each.
  later = [len({(int(p) // 1000, int(p) % 1000 // 64) for p in order.positions(3, b * 256, 256)})
           for b in range(160, 300)]
  assert max(later) <= 17, later


@pytest.mark.parametrize("field,value", [("read_block_rows", 0), ("shuffle_window_blocks", 0),
                                         ("read_connections", 0), ("read_retry_minutes", -1.0)])
def test_config_refuses_a_read_setting_out_of_range(field, value):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.data[field] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.data.{field}"):
    config_lib.validate(c)
  assert isinstance(c, ml_collections.ConfigDict)

"""The prepared-dataset format: packed rows in fixed-size shards, and the manifest that names them.

  DIR/manifest.json                  written last, once every shard exists: what the loader reads
  DIR/spm.model                      the SentencePiece model the rows were tokenised with
  DIR/shard-00000-of-00042.npy       int32 (uint16 for vocabularies < 65536) [rows, seq_len]
  DIR/shard-00000-of-00042.json      that shard's record: part, counts, bytes, sha256, and the
                                     corpus, tokenizer, seq_len and id dtype it was made for

Rows are packed like the official `prepare_data.py` (spec section 4): the non-blank lines of a
part are tokenised and concatenated with no document boundaries, and cut into consecutive chunks
of `seq_len - 2` pieces; each row is `[CLS] chunk [SEP]`, the last row of a shard right-padded
with [PAD]=0 (so attention masks are `ids != 0`: spm never emits [PAD] inside text).

Why plain `.npy` rows and not array_record: every row has the same size, so row i of a shard is
at byte `header + i * row_bytes`: one positioned read (a `pread`, or one ranged GET on gs://),
no index to load, no chunk to decompress (token ids barely compress), and `np.load(mmap_mode='r')`
opens a shard for inspection. Shards are written to a local temporary file, checksummed, and
moved into place (renamed, or uploaded); the shard's `.json` record is written after the shard,
so a record means a finished shard and a rerun skips it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Iterable

import numpy as np

from deberta_jax.data import DataError
from deberta_jax.data import storage

FORMAT = "deberta_jax.prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPM_FILE = "spm.model"
_LINE_BATCH_CHARS = 1 << 20  # text handed to spm per call; bounds the transient Python lists


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.npy"


def record_name(index: int, count: int) -> str:
  return shard_name(index, count)[:-4] + ".json"


def token_dtype(vocab_rows: int) -> np.dtype:
  """uint16 when every id fits (half the disk and reads), else int32 (the official 128k vocab)."""
  return np.dtype("<u2") if vocab_rows <= 65536 else np.dtype("<i4")


def fingerprint(manifest: dict[str, Any]) -> str:
  """What the rows are: tokenizer, layout and every shard's checksum (not where they came from or
  where they are, so copies of a dataset agree)."""
  key = [FORMAT_VERSION, manifest["tokenizer"]["fingerprint"], manifest["seq_len"],
         manifest["dtype"], [(s["file"], s["sequences"], s["sha256"]) for s in manifest["shards"]]]
  return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


class RowPacker:
  """Turns a stream of piece-id arrays into `[CLS] chunk [SEP]` rows of `seq_len` ids."""

  def __init__(self, seq_len: int, dtype: np.dtype, cls_id: int = 1, sep_id: int = 2,
               pad_id: int = 0):
    if seq_len < 3:
      raise DataError(f"config.seq_len={seq_len} must be >= 3 ([CLS], a piece and [SEP]).")
    self.seq_len, self.chunk = int(seq_len), int(seq_len) - 2
    self.dtype = dtype
    self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
    self._pending = np.zeros(0, dtype=np.int64)

  def _rows(self, pieces: np.ndarray) -> np.ndarray:
    n = pieces.size // self.chunk
    rows = np.empty((n, self.seq_len), dtype=self.dtype)
    rows[:, 0] = self.cls_id
    rows[:, 1:-1] = pieces[:n * self.chunk].reshape(n, self.chunk)
    rows[:, -1] = self.sep_id
    return rows

  def add(self, ids: list[np.ndarray]) -> np.ndarray:
    """The full rows that `ids` (appended to what is pending) complete."""
    pieces = np.concatenate([self._pending, *ids]) if ids else self._pending
    n = pieces.size // self.chunk
    self._pending = pieces[n * self.chunk:]
    return self._rows(pieces[:n * self.chunk])

  def finish(self) -> np.ndarray:
    """The last, shorter row ([CLS] rest [SEP] [PAD]...), or no row."""
    if not self._pending.size:
      return np.zeros((0, self.seq_len), dtype=self.dtype)
    row = np.full((1, self.seq_len), self.pad_id, dtype=self.dtype)
    n = self._pending.size
    row[0, 0], row[0, 1:n + 1], row[0, n + 1] = self.cls_id, self._pending, self.sep_id
    self._pending = np.zeros(0, dtype=np.int64)
    return row


def _npy_header(rows: int, seq_len: int, dtype: np.dtype) -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
            "shape": (int(rows), int(seq_len))})
  return buf.getvalue()


def _line_batches(lines: Iterable[str]) -> Iterable[list[str]]:
  batch, size = [], 0
  for line in lines:
    batch.append(line)
    size += len(line)
    if size >= _LINE_BATCH_CHARS:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def write_shard(lines: Iterable[str], tokenizer, seq_len: int, dtype: np.dtype, path: str,
                num_threads: int = 1, on_text=None) -> dict[str, Any]:
  """Tokenises and packs `lines` into the local `.npy` file `path`; returns its record fields.

  The header is written first with 0 rows and rewritten at the end (numpy leaves room for the
  row count to grow in place), so the shard is written in one pass with one batch of lines in
  memory. `on_text(n_chars)` is called after each batch (progress).
  """
  header_bytes = len(_npy_header(0, seq_len, dtype))
  packer = RowPacker(seq_len, dtype, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)
  rows = tokens = 0
  with open(path, "wb") as f:
    f.write(_npy_header(0, seq_len, dtype))
    for batch in _line_batches(lines):
      ids = tokenizer.encode_batch(batch, num_threads=num_threads)
      tokens += sum(x.size for x in ids)
      full = packer.add(ids)
      f.write(full.tobytes())
      rows += len(full)
      if on_text is not None:
        on_text(sum(len(line) for line in batch))
    last = packer.finish()
    f.write(last.tobytes())
    rows += len(last)
    header = _npy_header(rows, seq_len, dtype)
    if len(header) != header_bytes:  # cannot happen below 10**18 rows; fail loudly if it does
      raise RuntimeError(f"npy header size changed ({header_bytes} -> {len(header)})")
    f.seek(0)
    f.write(header)
  return {"sequences": rows, "tokens": tokens, "bytes": os.path.getsize(path),
          "sha256": storage.sha256_of(path), "header_bytes": header_bytes}


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest of a prepared dataset, checked for completeness; DataError names what is wrong."""
  path = storage.join(directory, MANIFEST)
  if not storage.exists(path):
    hint = ""
    if storage.isdir(directory) and any(p.endswith(".json") for p in storage.listdir(directory)):
      hint = (" Some shards are there: preparation has not finished (rerun `python -m "
              "deberta_jax.prepare` with the same flags; finished shards are skipped).")
    raise DataError(f"config.data.prepared_dir={directory!r} has no {MANIFEST}: not a prepared "
                    f"dataset (make one with `python -m deberta_jax.prepare --config=... "
                    f"--out={directory}`).{hint}")
  try:
    manifest = json.loads(storage.read_bytes(path))
    ok = (manifest.get("format") == FORMAT and isinstance(manifest.get("shards"), list)
          and manifest["shards"])
  except (ValueError, AttributeError) as e:
    raise DataError(f"{path} is not valid JSON ({e}).") from e
  if not ok:
    raise DataError(f"{path} is not a deberta_jax prepared-dataset manifest.")
  if manifest.get("version") != FORMAT_VERSION:
    raise DataError(f"{path} has format version {manifest.get('version')}; this deberta_jax "
                    f"reads version {FORMAT_VERSION}: prepare the dataset again.")
  if fingerprint(manifest) != manifest.get("fingerprint"):
    raise DataError(f"{path}: its fingerprint does not match its content; the manifest was "
                    f"edited or damaged.")
  return manifest


def tokenizer_fingerprint(proto: bytes) -> str:
  """The fingerprint of an spm model file's bytes (what `Tokenizer.fingerprint` is)."""
  return hashlib.sha256(proto).hexdigest()[:16]


def shard_dtype(directory: str, record: dict[str, Any]) -> str | None:
  """The id dtype in the `.npy` header of a record's shard (records written before they named
  their dtype), or None when the shard is missing or unreadable."""
  path = storage.join(directory, record.get("file", ""))
  try:
    header = storage.read_range(path, 0, int(record["header_bytes"]))
    buf = io.BytesIO(header)
    np.lib.format.read_magic(buf)
    return str(np.lib.format.read_array_header_1_0(buf)[2])
  except (DataError, OSError, ValueError, KeyError, TypeError):
    return None


def check_tokenizer(directory: str, manifest: dict[str, Any],
                    fingerprint: str | None = None) -> None:
  """The dataset's spm model is the one its rows were tokenised with (the manifest's
  fingerprint): a model left by an earlier preparation attempt, or copied over, would make the
  loader, the workdir's spm.model and everything exported from it decode ids into other pieces.
  `fingerprint` is that of a model already loaded from the directory; else the file is read."""
  name = manifest["tokenizer"]["file"]
  path = storage.join(directory, name)
  if fingerprint is None:
    if not storage.isfile(path):
      raise DataError(f"Prepared dataset {directory}: {name} is missing.")
    fingerprint = tokenizer_fingerprint(storage.read_bytes(path))
  expected = manifest["tokenizer"]["fingerprint"]
  if fingerprint != expected:
    raise DataError(f"Prepared dataset {directory}: {name} has fingerprint {fingerprint}, but "
                    f"the rows were tokenised with the model of fingerprint {expected} "
                    f"({MANIFEST}); it was replaced or is another preparation's. Rerunning "
                    f"`python -m deberta_jax.prepare` with the dataset's flags writes the right "
                    f"one.")


def check_shard_sizes(directory: str, manifest: dict[str, Any]) -> None:
  """Every shard is there with the size the manifest says (one listing; catches truncation and
  missing copies without reading the data)."""
  present = {os.path.basename(p.rstrip("/")): p for p in storage.listdir(directory)}
  for shard in manifest["shards"]:
    path = present.get(shard["file"])
    if path is None:
      raise DataError(f"Prepared dataset {directory}: shard {shard['file']} is missing.")
    actual = storage.size(path)
    if actual != shard["bytes"]:
      raise DataError(f"Prepared dataset {directory}: shard {shard['file']} has {actual} bytes, "
                      f"the manifest says {shard['bytes']} (truncated or replaced).")


def verify_checksums(directory: str, manifest: dict[str, Any]) -> None:
  """Reads every shard and compares its sha256 with the manifest (slow: reads the dataset)."""
  for shard in manifest["shards"]:
    digest = storage.sha256_of(storage.join(directory, shard["file"]))
    if digest != shard["sha256"]:
      raise DataError(f"Prepared dataset {directory}: shard {shard['file']} has sha256 "
                      f"{digest[:16]}..., the manifest says {shard['sha256'][:16]}... (damaged).")

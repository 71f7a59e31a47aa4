"""Tokenize a corpus once into a memory-mapped token stream and cut it into packed rows.

Like the official `prepare_data.py` (spec section 4): every line of every document is tokenized,
ALL pieces are concatenated into one stream with no document boundaries, and the stream is cut
into consecutive chunks of `seq_len - 2` pieces (510 for 512). Each row is
`[CLS] chunk [SEP]` right-padded with [PAD]=0; the last chunk is shorter.

The official loader kept every example as a pickled Python object and needed hundreds of GB of
RAM on large corpora (DeBERTa issue #109). Here the stream is a flat little-endian int32 `.npy`
file in the cache directory, written incrementally (one batch of lines in memory at a time) and
memory-mapped for reading, so RAM use does not grow with the corpus. The file is keyed by
(corpus fingerprint, spm model fingerprint) and does not depend on `seq_len`, so changing the
sequence length reuses it.

Writing: the `.npy` header is reserved first and rewritten with the final length at the end.
numpy pads headers so the shape can grow in place (128 bytes for any 1-D length below 10**18),
so the stream is written in a single pass without knowing its length in advance and without a
second copy on disk. Writers use a unique temporary name and an atomic rename, so processes that
build the same stream concurrently (several hosts sharing a cache) never read a partial file.
"""

from __future__ import annotations

import io
import os
import uuid
from typing import Iterable, Iterator

import numpy as np
from absl import logging

from deberta_jax.data import DataError

# Bump when the stream layout or the line splitting changes.
STREAM_FORMAT_VERSION = 1
_DTYPE = np.dtype("<i4")
_LINE_BATCH_CHARS = 1 << 20  # text handed to spm per call; bounds the transient Python lists


def token_stream_path(cache_dir: str, corpus_fingerprint: str, spm_fingerprint: str) -> str:
  return os.path.join(cache_dir, "tokens", f"tokens-{corpus_fingerprint}-{spm_fingerprint}"
                      f"-v{STREAM_FORMAT_VERSION}.npy")


def _npy_header(length: int) -> bytes:
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buf, {"descr": np.lib.format.dtype_to_descr(_DTYPE), "fortran_order": False,
            "shape": (int(length),)})
  return buf.getvalue()


def _line_batches(documents: Iterable[str]) -> Iterator[list[str]]:
  """Non-blank lines of all documents, grouped into batches of about 1 MiB of text."""
  batch, size = [], 0
  for doc in documents:
    for line in doc.splitlines():
      if line.strip():
        batch.append(line)
        size += len(line)
        if size >= _LINE_BATCH_CHARS:
          yield batch
          batch, size = [], 0
  if batch:
    yield batch


def write_token_stream(documents: Iterable[str], tokenizer, path: str,
                       corpus_name: str = "corpus") -> int:
  """Tokenizes `documents` line by line into the int32 .npy file `path`; returns its length."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  header_len = len(_npy_header(0))
  n = 0
  try:
    with open(tmp, "wb") as f:
      f.write(_npy_header(0))  # placeholder, same size as the final header
      for lines in _line_batches(documents):
        for ids in tokenizer.encode_batch(lines):
          f.write(ids.astype(_DTYPE, copy=False).tobytes())
          n += ids.size
      if n == 0:
        raise DataError(f"Corpus {corpus_name} is empty: tokenizing it gave no pieces.")
      header = _npy_header(n)
      if len(header) != header_len:  # cannot happen below 10**18 tokens; fail loudly if it does
        raise RuntimeError(f"npy header size changed ({header_len} -> {len(header)})")
      f.seek(0)
      f.write(header)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return n


def open_token_stream(path: str) -> np.ndarray:
  """The stream as a read-only int32 memmap (np.lib.format.open_memmap)."""
  tokens = np.lib.format.open_memmap(path, mode="r")
  if tokens.dtype != _DTYPE or tokens.ndim != 1:
    raise DataError(f"Token stream {path} is {tokens.dtype}{tokens.shape}, expected 1-D int32; "
                    f"delete it to rebuild.")
  return tokens


def load_or_build_token_stream(corpus, tokenizer, cache_dir: str) -> tuple[np.ndarray, str]:
  """The cached token stream of (corpus, tokenizer), built on first use; returns (memmap, path)."""
  path = token_stream_path(cache_dir, corpus.fingerprint, tokenizer.fingerprint)
  if not os.path.exists(path):
    logging.info("Tokenizing %s with %s into %s", corpus.name, tokenizer.model_path, path)
    n = write_token_stream(corpus.documents(), tokenizer, path, corpus.name)
    logging.info("Token stream %s: %d pieces", path, n)
  return open_token_stream(path), path


class PackedChunks:
  """Rows `[CLS] tokens[i*L:(i+1)*L] [SEP] [PAD]...` of a token stream, L = seq_len - 2."""

  def __init__(self, tokens: np.ndarray, seq_len: int, cls_id: int = 1, sep_id: int = 2,
               pad_id: int = 0):
    if seq_len < 3:
      raise DataError(f"config.seq_len={seq_len} must be >= 3 ([CLS], a piece and [SEP]).")
    if len(tokens) == 0:
      raise DataError("The token stream is empty: the corpus has no text.")
    self.tokens = tokens
    self.seq_len = int(seq_len)
    self.chunk_len = self.seq_len - 2
    self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
    self.num_chunks = -(-len(tokens) // self.chunk_len)

  def __len__(self) -> int:
    return self.num_chunks

  def gather(self, indices: Iterable[int]) -> dict[str, np.ndarray]:
    """input_ids and attention_mask (1 on [CLS]..[SEP], 0 on padding), int32 [len(indices), L+2]."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= self.num_chunks):
      raise IndexError(f"chunk index out of range [0, {self.num_chunks})")
    input_ids = np.full((indices.size, self.seq_len), self.pad_id, dtype=np.int32)
    attention_mask = np.zeros((indices.size, self.seq_len), dtype=np.int32)
    for row, chunk in enumerate(indices):
      start = int(chunk) * self.chunk_len
      pieces = self.tokens[start:start + self.chunk_len]
      n = len(pieces)
      input_ids[row, 0] = self.cls_id
      input_ids[row, 1:n + 1] = pieces
      input_ids[row, n + 1] = self.sep_id
      attention_mask[row, :n + 2] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

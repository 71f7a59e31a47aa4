"""Deterministic, resumable, per-process batches of packed rows: `make_pipeline(config, ...)`.

Order. Epoch e visits every chunk once, in the order of a permutation drawn by
`np.random.default_rng([seed, e])`; epochs repeat forever. The k-th example of the whole run
(counting all processes) is chunk `perm_e[k mod N]` with `e = k div N`, N = number of chunks, and
global batch b is examples [b*G, (b+1)*G), G = config.global_batch_size. Process p of P takes
rows [p*G/P, (p+1)*G/P) of each global batch, so processes read disjoint rows that concatenate
to the global batch (what `jax.make_array_from_process_local_data` expects), and a corpus with
fewer chunks than G simply wraps into the next epochs.

Resumption. Because the order is a pure function of (seed, examples seen), the pipeline state is
just those numbers: `state()` is a small JSON-serializable dict to store with a checkpoint and
`restore(state)` continues with exactly the batch an uninterrupted run would have produced, even
with a different number of processes or global batch size (the position counts examples, not
batches). Nothing is replayed or skipped by reading.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
from absl import logging

from deberta_jax.data import DataError
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import packing
from deberta_jax.data import spm as tokenizer_lib

# Bump when train_spm's settings change, so cached models trained with older ones are not reused.
SPM_SETTINGS_VERSION = 1
STATE_KEYS = ("seed", "examples_seen", "num_chunks")


class Pipeline:
  """Endless batches {'input_ids', 'attention_mask'}: int32 [global_batch_size // process_count,
  seq_len], this process's slice of every global batch."""

  def __init__(self, chunks: packing.PackedChunks, tokenizer: tokenizer_lib.Tokenizer, *,
               seed: int, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, corpus_name: str = "", tokens_path: str = ""):
    _check_layout(global_batch_size, process_index, process_count)
    _check_seed(seed)
    self.chunks = chunks
    self.tokenizer = tokenizer
    self.seed = int(seed)
    self.global_batch_size = int(global_batch_size)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.corpus_name = corpus_name
    self.tokens_path = tokens_path
    self._examples_seen = 0
    self._perms: dict[int, np.ndarray] = {}

  @property
  def num_chunks(self) -> int:
    return self.chunks.num_chunks

  @property
  def seq_len(self) -> int:
    return self.chunks.seq_len

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 4:  # batches span few epochs; keep memory at a few permutations
        self._perms.pop(min(self._perms))
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)
      self._perms[epoch] = perm.astype(np.int32 if self.num_chunks < 2**31 else np.int64)
    return self._perms[epoch]

  def chunk_indices(self, start: int, count: int) -> np.ndarray:
    """Chunk ids of global examples start .. start+count-1."""
    positions = np.arange(start, start + count, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.num_chunks)
    out = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      out[sel] = self._perm(int(epoch))[offsets[sel]]
    return out

  def next_batch(self) -> dict[str, np.ndarray]:
    start = self._examples_seen + self.process_index * self.local_batch_size
    batch = self.chunks.gather(self.chunk_indices(start, self.local_batch_size))
    self._examples_seen += self.global_batch_size
    return batch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self.next_batch()

  def state(self) -> dict[str, Any]:
    """JSON-serializable position: `seed` and `examples_seen` identify the next batch;
    `num_chunks` guards against restoring onto another corpus or seq_len; `epoch` and
    `position` (within the epoch) are for humans."""
    n = self._examples_seen
    return {"seed": self.seed, "examples_seen": n, "num_chunks": self.num_chunks,
            "epoch": n // self.num_chunks, "position": n % self.num_chunks,
            "global_batch_size": self.global_batch_size}

  def restore(self, state: dict[str, Any]) -> None:
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
      raise DataError(f"Pipeline state {state!r} lacks {missing}.")
    if int(state["num_chunks"]) != self.num_chunks:
      raise DataError(
          f"Pipeline state was saved for a corpus of {state['num_chunks']} chunks, this one has "
          f"{self.num_chunks}: the corpus, the spm model or config.seq_len changed.")
    if int(state["seed"]) != self.seed:
      logging.warning("Restoring data order of seed %s (config.seed is %s).", state["seed"],
                      self.seed)
      self.seed = int(state["seed"])
      self._perms.clear()
    self._examples_seen = int(state["examples_seen"])

  def __repr__(self) -> str:
    return (f"Pipeline({self.corpus_name}, num_chunks={self.num_chunks}, seq_len={self.seq_len}, "
            f"batch={self.local_batch_size}/{self.global_batch_size}, "
            f"process={self.process_index}/{self.process_count})")


def _check_seed(seed: Any) -> None:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"config.seed={seed!r} must be a non-negative integer (it seeds "
                    f"np.random.default_rng([seed, epoch])).")


def _check_layout(global_batch_size: int, process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in [0, process_count="
                    f"{process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise DataError(f"config.global_batch_size={global_batch_size} must be a positive multiple "
                    f"of the process count {process_count}.")


def _tokenizer_from_config(config: Any, corpus: corpus_lib.Corpus | None,
                           cache_dir: str) -> tokenizer_lib.Tokenizer:
  """config.data.spm_model, or a model trained on the corpus and cached by (corpus, vocab)."""
  data = config.data
  spm_model = corpus_lib.cfg_get(data, "spm_model", "")
  if spm_model:
    path = os.path.abspath(os.path.expanduser(spm_model))
    if not os.path.isfile(path):
      raise DataError(f"config.data.spm_model={spm_model!r}: SentencePiece model file not found.")
    return tokenizer_lib.Tokenizer(path)
  assert corpus is not None
  vocab = int(corpus_lib.cfg_get(data, "spm_vocab_size", 128000))
  prefix = os.path.join(cache_dir, "spm",
                        f"spm-{corpus.fingerprint}-{vocab}-v{SPM_SETTINGS_VERSION}")
  if not os.path.exists(prefix + ".model"):
    logging.info("Training a %d-piece SentencePiece model on %s into %s.model", vocab,
                 corpus.name, prefix)
    tokenizer_lib.train_spm(corpus.documents(), vocab, prefix)
  return tokenizer_lib.Tokenizer(prefix + ".model")


def make_pipeline(config: Any, process_index: int = 0, process_count: int = 1) -> Pipeline:
  """Builds (or reuses from the cache) corpus, spm model and token stream; returns the batches.

  Cheap checks run first (batch layout, seq_len, spm model file and its fit with
  config.model.vocab_size), so a wrong config fails before any corpus is prepared.
  """
  global_batch_size = int(config.global_batch_size)
  _check_layout(global_batch_size, process_index, process_count)
  _check_seed(config.seed)
  seq_len = int(config.seq_len)
  if seq_len < 3:
    raise DataError(f"config.seq_len={seq_len} must be >= 3 ([CLS], a piece and [SEP]).")
  vocab_size = int(config.model.vocab_size)
  cache_dir = corpus_lib.resolve_cache_dir(config)

  tokenizer = None
  if corpus_lib.cfg_get(config.data, "spm_model", ""):
    tokenizer = _tokenizer_from_config(config, None, cache_dir)
    tokenizer_lib.check_vocab_size(tokenizer.num_pieces, vocab_size, tokenizer.model_path)
  else:  # a trained model has exactly spm_vocab_size pieces: check before spending the time
    pieces = int(corpus_lib.cfg_get(config.data, "spm_vocab_size", 128000))
    tokenizer_lib.check_vocab_size(
        pieces, vocab_size, f"to be trained: config.data.spm_vocab_size={pieces}")

  corpus = corpus_lib.corpus_from_config(config)
  corpus.check_not_empty()
  if tokenizer is None:
    tokenizer = _tokenizer_from_config(config, corpus, cache_dir)
    tokenizer_lib.check_vocab_size(tokenizer.num_pieces, vocab_size, tokenizer.model_path)
  tokens, tokens_path = packing.load_or_build_token_stream(corpus, tokenizer, cache_dir)
  chunks = packing.PackedChunks(tokens, seq_len, tokenizer.cls_id, tokenizer.sep_id,
                                tokenizer.pad_id)
  pipeline = Pipeline(chunks, tokenizer, seed=int(config.seed),
                      global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, corpus_name=corpus.name,
                      tokens_path=tokens_path)
  logging.info("%r: %d pieces from %s", pipeline, len(tokens), tokens_path)
  return pipeline

"""SentencePiece with the DeBERTaV3 special-token layout, and training such a model.

The official DeBERTaV3 vocabulary (spec section 4) is a unigram SentencePiece model whose first
four pieces are the control/unknown symbols [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3. [MASK] is *not* an
spm piece: it gets the first id after the pieces (128000 for the official 128k model) and the
embedding has a few spare rows on top (128100 rows). We keep that layout exactly because

* the model code and the masking code use the fixed ids 0..3 (pad masking, CLS-relative RTD head);
* literal text "[MASK]" must not become the mask id (DeBERTa issue #86): since [MASK] is outside
  spm, `encode` can never produce it, only the masking step inserts it;
* an official `spm.model` then works unchanged with `config.model.vocab_size = 128100`.

`Tokenizer` refuses models that do not have this layout (for example spm's default
<unk>=0, <s>=1, </s>=2) instead of silently shifting ids; `train_spm` (and the CLI
`python -m deberta_jax.tokenizer train`) produces models that have it.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece

from deberta_jax.data import DataError
from deberta_jax.data import storage

PAD_ID, CLS_ID, SEP_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_PIECES = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
MASK_PIECE = "[MASK]"
# config.model.vocab_size may exceed pieces + 1 by at most this many spare rows. The official
# model has 100 (128100 - 128000); more than 128 almost surely means the config and the spm model
# belong to different vocabularies.
MAX_SPARE_ROWS = 128


def _lazy_spm():
  return sentencepiece


def recommended_vocab_size(num_pieces: int) -> int:
  """Smallest multiple of 128 that holds the pieces plus [MASK] (shards evenly, <= 128 spare)."""
  return -(-(num_pieces + 1) // 128) * 128


def check_vocab_size(num_pieces: int, vocab_size: int, source: str = "") -> None:
  """Raises DataError unless `vocab_size` embedding rows fit an spm model with `num_pieces`.

  The [MASK] id equals `num_pieces`, so it must be < vocab_size; and at most MAX_SPARE_ROWS rows
  may be left unused, which catches a config written for another vocabulary (e.g. 128100 rows
  with a 4000-piece model).
  """
  where = f" ({source})" if source else ""
  if not num_pieces < vocab_size or vocab_size - num_pieces > MAX_SPARE_ROWS:
    raise DataError(
        f"config.model.vocab_size={vocab_size} does not fit a SentencePiece model with "
        f"{num_pieces} pieces{where}: the [MASK] id {num_pieces} must be < vocab_size and at most "
        f"{MAX_SPARE_ROWS} rows may be spare (official: 128100 rows for 128000 pieces). "
        f"Set config.model.vocab_size={recommended_vocab_size(num_pieces)} or use a matching "
        f"spm model / config.data.spm_vocab_size.")


class Tokenizer:
  """A loaded SentencePiece model plus the appended [MASK] id.

  Attributes:
    model_path: the .model file.
    fingerprint: sha256 (hex, 16 chars) of the model file; keys the token-stream cache.
  """

  def __init__(self, model_path: str):
    model_path = os.fspath(model_path)
    if not storage.isfile(model_path):
      raise DataError(f"SentencePiece model file not found: {model_path}")
    proto = storage.read_bytes(model_path)
    sp = _lazy_spm().SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(proto)
    except Exception as e:  # spm raises RuntimeError/OSError depending on the version
      raise DataError(f"Not a valid SentencePiece model: {model_path} ({e})") from e
    layout = (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id())
    if layout != (PAD_ID, CLS_ID, SEP_ID, UNK_ID):
      raise DataError(
          f"SentencePiece model {model_path} has pad/bos/eos/unk ids {layout}; DeBERTaV3 needs "
          f"[PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3. Train one with "
          f"`python -m deberta_jax.tokenizer train --input=... --vocab_size=... "
          f"--model_prefix=...`.")
    self._sp = sp
    self.model_path = model_path
    self.proto = proto
    self.fingerprint = hashlib.sha256(proto).hexdigest()[:16]

  # The layout is fixed (checked above); properties keep call sites readable.
  pad_id = property(lambda self: PAD_ID)
  cls_id = property(lambda self: CLS_ID)
  sep_id = property(lambda self: SEP_ID)
  unk_id = property(lambda self: UNK_ID)

  @property
  def num_pieces(self) -> int:
    """Number of spm pieces (ids 0 .. num_pieces-1)."""
    return self._sp.get_piece_size()

  @property
  def mask_id(self) -> int:
    """[MASK] is appended after the spm pieces (128000 for the official model)."""
    return self.num_pieces

  @property
  def special_ids(self) -> tuple[int, ...]:
    """[PAD], [CLS], [SEP], [UNK], [MASK]: ids that are never masked or predicted as text."""
    return (PAD_ID, CLS_ID, SEP_ID, UNK_ID, self.mask_id)

  def id_to_piece(self, i: int) -> str:
    """The piece of id `i`; ids without one get a name instead of an error: the spare embedding
    rows after [MASK] (up to config.model.vocab_size), which the generator may sample, are
    [unused0], [unused1], ...; a negative id is [invalid-ID]."""
    i = int(i)
    if 0 <= i < self.num_pieces:
      return self._sp.id_to_piece(i)
    if i == self.mask_id:
      return MASK_PIECE
    return f"[unused{i - self.mask_id - 1}]" if i > self.mask_id else f"[invalid{i}]"

  def encode(self, text: str) -> np.ndarray:
    """Pieces of `text` as int32 ids, without [CLS]/[SEP] (packing adds those)."""
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[np.ndarray]:
    """`encode` of many texts at once on `num_threads` threads (spm's C++ pool; 0 = all cores)."""
    ids = self._sp.encode(list(texts), out_type=int,
                          num_threads=num_threads or os.cpu_count() or 1)
    return [np.asarray(x, dtype=np.int32) for x in ids]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, for inspection. [PAD]/[CLS]/[SEP] vanish, [MASK] shows as "[MASK]",
    spare embedding rows (ids > mask_id) show as [UNK]'s surface form."""
    out: list[str] = []
    run: list[int] = []

    def flush():
      if run:
        first = self._sp.id_to_piece(run[0])
        text = self._sp.decode(run)
        out.append((" " if out and first.startswith("\u2581") else "") + text)
        run.clear()

    for i in np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1):
      i = int(i)
      if i == self.mask_id:
        flush()
        out.append((" " if out else "") + MASK_PIECE)
      elif i in (PAD_ID, CLS_ID, SEP_ID):
        continue
      else:
        run.append(i if 0 <= i < self.num_pieces else UNK_ID)
    flush()
    return "".join(out)

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path!r}, num_pieces={self.num_pieces}, mask_id={self.mask_id})"


def _lines(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.splitlines():
      if line.strip():
        yield line


def sample_lines(texts: Iterable[str], max_sentences: int, seed: int = 42) -> tuple[list[str], int]:
  """A uniform random sample of at most `max_sentences` non-blank lines of all `texts`, and the
  number of lines seen (reservoir sampling: one pass, memory bounded by the sample, not by the
  corpus; the sample depends only on the text, its order and `seed`)."""
  rng = random.Random(seed)
  sample: list[str] = []
  seen = 0
  for line in _lines(texts):
    if seen < max_sentences:
      sample.append(line)
    else:
      j = rng.randrange(seen + 1)
      if j < max_sentences:
        sample[j] = line
    seen += 1
  return sample, seen


def train_spm(text_iter: Iterable[str], vocab_size: int, model_prefix: str, *,
              character_coverage: float = 0.9995, max_sentences: int = 500_000,
              num_threads: int = 8, seed: int = 42) -> str:
  """Trains a unigram spm with the DeBERTaV3 layout and returns the path of the .model file.

  Settings follow the user reproduction of the official model (DeBERTa issue #127): unigram,
  pad/bos/eos/unk ids 0/1/2/3 with pieces [PAD] [CLS] [SEP] [UNK], no lower-casing. There is no
  punctuation pre-splitting (the reference tokenizer's split_by_punct is off). Each line of each
  text is one training sentence. spm keeps every sentence it is handed in memory (about 16x the
  text), so here `max_sentences` lines are sampled uniformly over the whole input
  (`sample_lines`) and only they reach spm, so memory stays flat in corpus size.
  `character_coverage` 0.9995 (spm's recommendation for large character sets) keeps rare symbols
  from crowding out pieces; the reproduction used 1.0.

  The model file depends only on the text and these arguments, byte for byte: the sample and
  spm's own randomness are seeded with `seed`, `num_threads` is fixed rather than taken from the
  machine (the EM result changes with the thread count), and the model is received in memory
  rather than through `model_prefix` (spm records that path inside the model). So every host of
  a job trains the same model with the same fingerprint. Files appear whole (a temporary name and
  a rename locally; one upload on gs://), so concurrent trainers never see a half-written model.
  """
  spm = _lazy_spm()
  model_prefix = storage.absolute(os.fspath(model_prefix))
  storage.makedirs(os.path.dirname(model_prefix))
  sentences, seen = sample_lines(text_iter, int(max_sentences), seed)
  counted = {"n": len(sentences)}

  spm.set_random_generator_seed(seed)
  model = io.BytesIO()  # not model_prefix: spm would store the (temporary) path in the model
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=int(vocab_size),
        model_type="unigram", character_coverage=character_coverage,
        pad_id=PAD_ID, bos_id=CLS_ID, eos_id=SEP_ID, unk_id=UNK_ID,
        pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]",
        input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=num_threads, minloglevel=2)
  except Exception as e:  # RuntimeError from C++ (e.g. "Vocabulary size too high")
    if counted["n"] == 0:
      raise DataError(f"Cannot train SentencePiece model {model_prefix}.model: the corpus has "
                      f"no text") from e
    raise DataError(f"SentencePiece training of {model_prefix}.model with vocab_size="
                    f"{vocab_size} on {counted['n']} of {seen} lines failed: {e}") from e
  proto = model.getvalue()
  sp = spm.SentencePieceProcessor(model_proto=proto)
  vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                  for i in range(sp.get_piece_size()))
  storage.write_bytes(model_prefix + ".vocab", vocab.encode("utf-8"))
  storage.write_bytes(model_prefix + ".model", proto)
  return model_prefix + ".model"

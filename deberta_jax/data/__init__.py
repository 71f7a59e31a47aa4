"""Pre-training data: corpus -> SentencePiece -> packed token stream -> batches.

The stages live in one module each so that each can be read and tested alone:

* `corpus`    where text comes from (`config.data.source`: 'embedded', 'text_files', 'tfds'); the
              embedded corpus is prepared once as a tfds array_record dataset and read back through
              `tfds.data_source`, so no TensorFlow is needed anywhere.
* `spm`       the SentencePiece wrapper with the DeBERTaV3 special-token layout
              ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK]=number of spm pieces).
* `packing`   tokenizes every document once into a memory-mapped int32 .npy stream (no Python
              token lists: the official loader ran out of RAM on large corpora, DeBERTa issue #109)
              and cuts it into [CLS] + 510 pieces + [SEP] rows like the official prepare_data.py.
* `pipeline`  `make_pipeline(config, process_index, process_count)`: a deterministic, resumable,
              per-process batch iterator.

Importing this package is cheap on purpose: the public names below are resolved lazily, so
`import deberta_jax.data` neither imports tensorflow_datasets nor touches any file.
"""

from __future__ import annotations

import importlib
from typing import Any

from deberta_jax.errors import BadInput


class DataError(BadInput):
  """A problem with the user's data or data config; the message names the path or config field."""


# Public name -> submodule that defines it (resolved on first attribute access).
_LAZY = {
    "Corpus": "corpus",
    "corpus_from_config": "corpus",
    "embedded_documents": "corpus",
    "prepare_embedded_corpus": "corpus",
    "write_tfds_text_dataset": "corpus",
    "resolve_cache_dir": "corpus",
    "Tokenizer": "spm",
    "train_spm": "spm",
    "check_vocab_size": "spm",
    "recommended_vocab_size": "spm",
    "PackedChunks": "packing",
    "load_or_build_token_stream": "packing",
    "Pipeline": "pipeline",
    "make_pipeline": "pipeline",
}

__all__ = ["DataError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Pre-training data: source -> prepare -> shards -> loader.

The stages live in one module each so that each can be read and tested alone:

* `corpus`       where text comes from (`config.data.source`: 'embedded', 'text_files', 'jsonl',
                 'parquet', 'tfds'), and its split into parts that workers read independently.
* `spm`          the SentencePiece wrapper with the DeBERTaV3 special-token layout
                 ([PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK]=number of spm pieces), and bounded
                 training of such a model.
* `shards`       the prepared-dataset format: packed [CLS] + 510 pieces + [SEP] rows in
                 fixed-size `.npy` shards, and the manifest with fingerprints and checksums.
* `preparation`  corpus -> shards with worker processes and over machines, resumable.
* `pipeline`     `make_pipeline(config, process_index, process_count)`: each process reads
                 its rows of a deterministic global shuffle, with grain threads reading ahead.
* `storage`      local paths and gs:// behind one interface.

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
    "Tokenizer": "spm",
    "train_spm": "spm",
    "check_vocab_size": "spm",
    "recommended_vocab_size": "spm",
    "prepare": "preparation",
    "read_manifest": "shards",
    "PreparedRows": "pipeline",
    "Pipeline": "pipeline",
    "make_pipeline": "pipeline",
}

__all__ = ["DataError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

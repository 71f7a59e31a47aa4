"""Train or inspect a SentencePiece model with the DeBERTaV3 layout.

  python -m deberta_jax.tokenizer train --input='/data/*.txt' --vocab_size=128000 \
      --model_prefix=/data/spm
  python -m deberta_jax.tokenizer train --embedded --vocab_size=4000 --model_prefix=/tmp/spm
  python -m deberta_jax.tokenizer info --model=/data/spm.model

`train` writes PREFIX.model and PREFIX.vocab (local or gs://): a unigram model with [PAD]=0
[CLS]=1 [SEP]=2 [UNK]=3 (see deberta_jax.data.spm.train_spm), trained on `--max_sentences` lines
sampled uniformly over all the input, so its memory does not grow with the corpus, and prints
the [MASK] id and the
`config.model.vocab_size` to use. Training once up front and passing `--config.data.spm_model`
is the way for multi-host runs and large corpora; without it the pipeline trains (and caches) a
model on the corpus itself.
"""

from __future__ import annotations

from absl import flags
import ml_collections

from deberta_jax import caches
from deberta_jax import cli
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import spm as tokenizer_lib

_INPUT = flags.DEFINE_string("input", "", "Text files, local or gs://: a glob, file or "
                             "directory (comma-separated for several).")
_EMBEDDED = flags.DEFINE_bool("embedded", False, "Train on the embedded docstring corpus "
                              "instead of --input.")
_SPLIT = flags.DEFINE_bool("split_on_blank_lines", False, "One document per blank-line block "
                           "(only matters for --input; lines are spm's sentences either way).")
_VOCAB = flags.DEFINE_integer("vocab_size", 4000, "Number of spm pieces ([MASK] comes after).")
_PREFIX = flags.DEFINE_string("model_prefix", "", "Output path without .model/.vocab.")
_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995, "spm character_coverage "
                               "(1.0 keeps every character).")
_MAX_BYTES = flags.DEFINE_integer("embedded_max_bytes", 8_000_000, "Size of the embedded corpus.")
_CACHE = flags.DEFINE_string("cache_dir", "", "Where the embedded corpus is prepared "
                             "('' = $DEBERTA_JAX_CACHE or ~/.cache/deberta_jax).")
_MAX_SENTENCES = flags.DEFINE_integer(
    "max_sentences", 500_000, "Lines sampled uniformly over the whole input to train on: "
    "memory is bounded by this, not by the corpus size.")
_MODEL = flags.DEFINE_string("model", "", "For `info`: the .model file.")


def _describe(tok) -> str:
  specials = ", ".join(f"{tok.id_to_piece(i)}={i}" for i in tok.special_ids)
  return (f"{tok.model_path}: {tok.num_pieces} pieces; {specials}; use "
          f"config.model.vocab_size={tokenizer_lib.recommended_vocab_size(tok.num_pieces)} "
          f"(any value in [{tok.num_pieces + 1}, {tok.num_pieces + tokenizer_lib.MAX_SPARE_ROWS}])")


def _train() -> str:
  if not _PREFIX.value:
    raise cli.app.UsageError("--model_prefix is required.")
  if _EMBEDDED.value:
    cfg = ml_collections.ConfigDict({"data": {"cache_dir": _CACHE.value}})
    name, data_dir = corpus_lib.prepare_embedded_corpus(caches.directory(cfg),
                                                        _MAX_BYTES.value)
    corpus = corpus_lib.tfds_corpus(name, "train", data_dir, "text", label=f"embedded:{name}")
  elif _INPUT.value:
    corpus = corpus_lib.text_file_corpus(_INPUT.value, _SPLIT.value)
  else:
    raise cli.app.UsageError("Give --input=GLOB_OR_FILE or --embedded.")
  corpus.check_not_empty()
  path = tokenizer_lib.train_spm(corpus.lines(), _VOCAB.value, _PREFIX.value,
                                 character_coverage=_COVERAGE.value,
                                 max_sentences=_MAX_SENTENCES.value)
  return _describe(tokenizer_lib.Tokenizer(path))


def _info() -> str:
  if not _MODEL.value:
    raise cli.app.UsageError("--model is required.")
  return _describe(tokenizer_lib.Tokenizer(_MODEL.value))


def main(argv):
  commands = {"train": _train, "info": _info}
  if len(argv) != 2 or argv[1] not in commands:
    raise cli.app.UsageError(f"Usage: python -m deberta_jax.tokenizer {{{'|'.join(commands)}}} "
                         f"[flags]")
  print(commands[argv[1]]())


if __name__ == "__main__":
  cli.run(main)

"""Tests of the data pipeline (deberta_jax.data): CPU only, no network, no TensorFlow.

Everything is written under one temporary cache directory per session (never ~/.cache), the
embedded corpus is capped at 1 MB and spm vocabularies are small so the file runs in seconds.
"""

import json
import os
import subprocess
import sys

import chex
import ml_collections
import numpy as np
import pytest

from deberta_jax import caches
from deberta_jax.data import DataError
from deberta_jax.data import corpus as corpus_lib
from deberta_jax.data import preparation
from deberta_jax.data import shards
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.data import spm as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED_BYTES = 1_000_000
SPM_PIECES = 500


def data_config(cache_dir, **data_overrides):
  """A run config with exactly the fields the data pipeline reads (tiny sizes)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.seq_len = 64
  c.global_batch_size = 8
  c.model = ml_collections.ConfigDict({"vocab_size": 512})  # 500 pieces + [MASK] + 11 spare
  c.data = ml_collections.ConfigDict({
      "source": "embedded", "text_files": "", "split_on_blank_lines": False,
      "tfds_name": "", "tfds_split": "train", "tfds_text_feature": "text", "tfds_data_dir": "",
      "spm_model": "", "spm_vocab_size": SPM_PIECES, "cache_dir": str(cache_dir),
      "embedded_max_bytes": EMBEDDED_BYTES})
  c.data.update(data_overrides)
  return c


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("deberta_jax_cache")


@pytest.fixture(scope="session")
def embedded(cache_dir):
  """(tfds name, data_dir) of the embedded corpus, prepared once for the session."""
  return corpus_lib.prepare_embedded_corpus(str(cache_dir), EMBEDDED_BYTES)


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory):
  """A 500-piece model with the DeBERTaV3 layout, trained on a slice of the embedded text."""
  prefix = tmp_path_factory.mktemp("spm") / "m500"
  return tokenizer_lib.train_spm(corpus_lib.embedded_documents(300_000), SPM_PIECES, str(prefix))


@pytest.fixture(scope="session")
def tok(spm_path):
  return tokenizer_lib.Tokenizer(spm_path)


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
  return path


def _pipeline_docs(n_words=400):
  words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
  return [" ".join(words[(i * 7 + j) % len(words)] for j in range(n_words // 4)) + "."
          for i in range(8)]


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_special_layout(tok):
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.num_pieces == SPM_PIECES
  assert tok.mask_id == SPM_PIECES
  assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
  assert tok.id_to_piece(tok.mask_id) == "[MASK]"
  assert set(tok.special_ids) == {0, 1, 2, 3, SPM_PIECES}


def test_tokenizer_encode_decode(tok):
  ids = tok.encode("Return the value of the attribute. [MASK] [CLS]")
  assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and ids.ndim == 1
  assert ids.size > 5
  # Literal special-token text is ordinary text (DeBERTa issue #86): no control/mask ids.
  assert not set(ids.tolist()) & {0, 1, 2, tok.mask_id}
  assert ids.max() < tok.num_pieces
  text = "Return the value of the attribute."
  assert tok.decode(tok.encode(text)) == text
  with_specials = np.concatenate([[1], tok.encode(text), [2, 0, 0]])
  assert tok.decode(with_specials) == text
  assert "[MASK]" in tok.decode([tok.mask_id] + tok.encode(text).tolist())
  batch = tok.encode_batch([text, "of the"])
  np.testing.assert_array_equal(batch[0], tok.encode(text))


def test_train_spm_is_deterministic(tmp_path, spm_path):
  again = tokenizer_lib.train_spm(corpus_lib.embedded_documents(300_000), SPM_PIECES,
                                  str(tmp_path / "again"))
  assert tokenizer_lib.Tokenizer(again).fingerprint == tokenizer_lib.Tokenizer(spm_path).fingerprint


def test_tokenizer_rejects_other_layouts(tmp_path):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  text = [line for d in corpus_lib.embedded_documents(100_000) for line in d.splitlines()]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "d"),
                                 vocab_size=200, minloglevel=2)  # spm default: <unk>=0 <s>=1
  with pytest.raises(DataError, match=str(tmp_path / "d.model")):
    tokenizer_lib.Tokenizer(str(tmp_path / "d.model"))
  with pytest.raises(DataError, match="not found"):
    tokenizer_lib.Tokenizer(str(tmp_path / "missing.model"))
  _write(tmp_path / "junk.model", b"not a model")
  with pytest.raises(DataError, match="junk.model"):
    tokenizer_lib.Tokenizer(str(tmp_path / "junk.model"))


@pytest.mark.parametrize("vocab,ok", [(500, False), (501, True), (512, True), (628, True),
                                      (629, False), (128100, False)])
def test_check_vocab_size(vocab, ok):
  if ok:
    tokenizer_lib.check_vocab_size(500, vocab)
  else:
    with pytest.raises(DataError) as e:
      tokenizer_lib.check_vocab_size(500, vocab, "m.model")
    msg = str(e.value)
    assert "config.model.vocab_size" in msg and str(vocab) in msg and "500" in msg
  assert tokenizer_lib.recommended_vocab_size(128000) == 128128
  assert tokenizer_lib.recommended_vocab_size(4000) == 4096


def _cli(*args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "deberta_jax.tokenizer", *args], env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_cli_train_from_files(tmp_path):
  docs = list(corpus_lib.embedded_documents(150_000))
  for i in range(3):
    _write(tmp_path / "in" / f"{i}.txt", "\n\n".join(docs[i::3]))
  res = _cli("train", f"--input={tmp_path}/in/*.txt", "--vocab_size=300",
             f"--model_prefix={tmp_path}/out/spm")
  assert res.returncode == 0, res.stderr
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "out" / "spm.model"))
  assert (tok.num_pieces, tok.mask_id) == (300, 300)
  assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
  assert os.path.exists(tmp_path / "out" / "spm.vocab")
  assert "config.model.vocab_size=384" in res.stdout
  # A glob matching nothing is a clear error, not a traceback.
  res = _cli("train", f"--input={tmp_path}/nothing/*.txt", "--vocab_size=120",
             f"--model_prefix={tmp_path}/out/x")
  assert res.returncode != 0 and "nothing/*.txt" in res.stderr


def test_cli_train_embedded(tmp_path, cache_dir, embedded):
  del embedded  # prepared already: the CLI reuses it
  res = _cli("train", "--embedded", f"--embedded_max_bytes={EMBEDDED_BYTES}",
             "--vocab_size=300", f"--model_prefix={tmp_path}/emb", f"--cache_dir={cache_dir}")
  assert res.returncode == 0, res.stderr
  assert tokenizer_lib.Tokenizer(str(tmp_path / "emb.model")).mask_id == 300


# ---------------------------------------------------------------------------------------- corpus


def test_embedded_corpus_is_built_deterministic_and_cached(cache_dir, embedded):
  name, data_dir = embedded
  assert data_dir.startswith(str(cache_dir))
  info_file = os.path.join(data_dir, name.replace(":", "/"), "dataset_info.json")
  record_files = [f for f in os.listdir(os.path.dirname(info_file)) if ".array_record" in f]
  assert os.path.exists(info_file) and record_files
  mtime = os.stat(info_file).st_mtime_ns

  corpus = corpus_lib.corpus_from_config(data_config(cache_dir))
  docs = list(corpus.documents())
  size = sum(len(d.encode()) for d in docs)
  assert 500_000 < size <= EMBEDDED_BYTES and len(docs) > 50
  # Same text as a fresh extraction (tfds stores examples in key-hash order).
  assert sorted(docs) == sorted(corpus_lib.embedded_documents(EMBEDDED_BYTES))

  # Second preparation: same dataset, nothing rewritten; same fingerprint.
  assert corpus_lib.prepare_embedded_corpus(str(cache_dir), EMBEDDED_BYTES) == embedded
  assert os.stat(info_file).st_mtime_ns == mtime
  assert corpus_lib.corpus_from_config(data_config(cache_dir)).fingerprint == corpus.fingerprint


def test_embedded_cap_changes_dataset(tmp_path):
  small = list(corpus_lib.embedded_documents(200_000))
  assert 0 < sum(len(d.encode()) for d in small) <= 200_000
  assert small == list(corpus_lib.embedded_documents(200_000))
  assert small != list(corpus_lib.embedded_documents(100_000))
  with pytest.raises(DataError, match="config.data.embedded_max_bytes"):
    corpus_lib.prepare_embedded_corpus(str(tmp_path), 0)


def test_text_files_both_split_modes(tmp_path):
  _write(tmp_path / "a.txt", "\ufeffFirst para line one\nline two\n\n\nSecond para\n")
  _write(tmp_path / "b.txt", "\n  \nonly block\n")
  _write(tmp_path / "sub" / "c.txt", "nested\n")
  per_file = corpus_lib.corpus_from_config(
      data_config(tmp_path, source="text_files", text_files=str(tmp_path / "*.txt")))
  assert list(per_file.documents()) == ["First para line one\nline two\n\n\nSecond para",
                                        "only block"]
  blocks = corpus_lib.corpus_from_config(data_config(
      tmp_path, source="text_files", text_files=str(tmp_path / "*.txt"),
      split_on_blank_lines=True))
  assert list(blocks.documents()) == ["First para line one\nline two", "Second para",
                                      "only block"]
  assert blocks.fingerprint != per_file.fingerprint
  recursive = corpus_lib.text_file_corpus(f"{tmp_path}/**/*.txt")
  assert "nested" in list(recursive.documents())
  several = corpus_lib.text_file_corpus(f"{tmp_path}/b.txt,{tmp_path}/sub")
  assert list(several.documents()) == ["only block", "nested"]


def test_text_files_fingerprint_follows_content(tmp_path):
  f = _write(tmp_path / "a.txt", "one\n")
  before = corpus_lib.text_file_corpus(str(f)).fingerprint
  _write(f, "one two\n")
  assert corpus_lib.text_file_corpus(str(f)).fingerprint != before


def test_tfds_source_reads_prepared_dataset(tmp_path):
  docs = [f"document {i}: déjà vu, {'text ' * i}" for i in range(1, 40)]
  builder_dir = corpus_lib.write_tfds_text_dataset("deberta_jax_test_corpus", lambda: docs,
                                                   str(tmp_path / "tfds"))
  assert builder_dir.endswith(os.path.join("deberta_jax_test_corpus", "1.0.0"))
  assert any(".array_record" in f for f in os.listdir(builder_dir))
  cfg = data_config(tmp_path, source="tfds", tfds_name="deberta_jax_test_corpus",
                    tfds_data_dir=str(tmp_path / "tfds"))
  corpus = corpus_lib.corpus_from_config(cfg)
  assert sorted(corpus.documents()) == sorted(docs)
  # Split slicing is tfds's.
  cfg.data.tfds_split = "train[:10]"
  assert len(list(corpus_lib.corpus_from_config(cfg).documents())) == 10
  # Also readable with plain tfds, i.e. the files are a normal tfds dataset.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source("deberta_jax_test_corpus", split="train",
                            data_dir=str(tmp_path / "tfds"))
  assert len(source) == len(docs)
  assert "tensorflow" not in sys.modules  # no TF anywhere


def test_tfds_source_errors(tmp_path):
  corpus_lib.write_tfds_text_dataset("deberta_jax_err_corpus", lambda: ["a b c"],
                                     str(tmp_path / "tfds"))
  base = dict(source="tfds", tfds_data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="config.data.tfds_text_feature='body'"):
    corpus_lib.corpus_from_config(data_config(
        tmp_path, tfds_name="deberta_jax_err_corpus", tfds_text_feature="body", **base))
  with pytest.raises(DataError, match="config.data.tfds_name='deberta_jax_no_such_dataset'"):
    corpus_lib.corpus_from_config(data_config(
        tmp_path, tfds_name="deberta_jax_no_such_dataset", **base))
  with pytest.raises(DataError, match="config.data.tfds_name is empty"):
    corpus_lib.corpus_from_config(data_config(tmp_path, tfds_name="", **base))


def test_cache_dir_resolution(monkeypatch, tmp_path):
  cfg = data_config("")
  monkeypatch.setenv("DEBERTA_JAX_CACHE", str(tmp_path / "env"))
  assert caches.directory(cfg) == str(tmp_path / "env")
  monkeypatch.delenv("DEBERTA_JAX_CACHE")
  assert caches.directory(cfg) == os.path.expanduser("~/.cache/deberta_jax")
  assert caches.directory(data_config(tmp_path)) == str(tmp_path)


# ------------------------------------------------------------------------------- prepare / shards


def _rows_text(tok, rows):
  """The pieces of packed rows, [CLS]/[SEP]/[PAD] removed, concatenated."""
  return np.concatenate([r[1:(r != 0).sum() - 1] for r in rows])


def test_row_packer_layout():
  packer = shards.RowPacker(6, np.dtype("<u2"))
  full = packer.add([np.arange(10, 17), np.arange(20, 23)])  # 10 pieces: 2 rows of 4, 2 left
  last = packer.finish()
  np.testing.assert_array_equal(full, [[1, 10, 11, 12, 13, 2], [1, 14, 15, 16, 20, 2]])
  np.testing.assert_array_equal(last, [[1, 21, 22, 2, 0, 0]])
  assert packer.finish().shape == (0, 6)


def test_prepare_shards_manifest_and_rerun(tmp_path, tok):
  lines = [f"Line {i}: {'alpha beta gamma ' * (i % 7 + 1)}end." for i in range(400)]
  _write(tmp_path / "corpus" / "a.txt", "\n".join(lines[:150]) + "\n")
  _write(tmp_path / "corpus" / "b.txt", "\ufeff" + "\n\n".join(lines[150:]))
  corpus = corpus_lib.text_file_corpus(str(tmp_path / "corpus" / "*.txt"))
  parts = corpus.parts(2000)  # several parts per file, cut inside lines
  assert len(parts) > 4 and {p.path for p in parts} == {
      str(tmp_path / "corpus" / "a.txt"), str(tmp_path / "corpus" / "b.txt")}
  # Every line is read by exactly one part, in order, wherever the cuts fall.
  assert [x for p in parts for x in corpus_lib.read_part(p)] == lines
  out = tmp_path / "prepared"
  manifest = preparation.prepare(corpus, tok, 16, str(out), vocab_size=512, part_bytes=2000,
                                 progress=False)
  assert manifest == shards.read_manifest(str(out))
  assert manifest["seq_len"] == 16 and manifest["dtype"] == "uint16"
  assert len(manifest["shards"]) == len(parts)
  assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
  assert (out / "spm.model").read_bytes() == open(tok.model_path, "rb").read()
  rows = [np.load(out / s["file"]) for s in manifest["shards"]]
  assert sum(len(r) for r in rows) == manifest["num_sequences"]
  for part, r in zip(parts, rows):  # each shard packs its part's pieces, in order
    expected = np.concatenate([tok.encode(x) for x in corpus_lib.read_part(part)])
    np.testing.assert_array_equal(_rows_text(tok, r), expected)
    assert (r[:, 0] == tok.cls_id).all() and ((r != 0).sum(1)[:-1] == 16).all()
  # A rerun skips every finished shard; a lost shard record is made again.
  mtimes = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
  os.remove(out / shards.record_name(2, len(parts)))
  again = preparation.prepare(corpus, tok, 16, str(out), vocab_size=512, part_bytes=2000,
                              progress=False)
  assert again["fingerprint"] == manifest["fingerprint"]
  changed = [f for f in mtimes if os.stat(out / f).st_mtime_ns != mtimes[f]]
  assert sorted(changed) == sorted([shards.shard_name(2, len(parts)),
                                    shards.record_name(2, len(parts)), "manifest.json"])
  # Two machines, each its half, give the same dataset; the first to finish writes no manifest.
  split = tmp_path / "split"
  assert preparation.prepare(corpus, tok, 16, str(split), vocab_size=512, part_bytes=2000,
                             shard_index=1, num_shards=2, progress=False) is None
  assert not (split / "manifest.json").exists()
  both = preparation.prepare(corpus, tok, 16, str(split), vocab_size=512, part_bytes=2000,
                             shard_index=0, num_shards=2, progress=False)
  assert both["fingerprint"] == manifest["fingerprint"]
  # Another tokenizer or seq_len never mixes into the directory.
  with pytest.raises(DataError, match="another dataset"):
    preparation.prepare(corpus, tok, 32, str(out), vocab_size=512, part_bytes=2000,
                        progress=False)
  # Damage is named: a truncated shard, then an edited manifest.
  first = out / manifest["shards"][0]["file"]
  first.write_bytes(first.read_bytes()[:-4])
  with pytest.raises(DataError, match="truncated"):
    pipeline_lib.PreparedRows(str(out))
  (out / "manifest.json").write_text(json.dumps(dict(manifest, num_sequences=1)).replace(
      manifest["fingerprint"], "0" * 16))
  with pytest.raises(DataError, match="fingerprint does not match"):
    shards.read_manifest(str(out))


def test_prepare_cli_workers_jsonl_and_parquet(tmp_path, spm_path):
  """The entry point with 2 worker processes equals one process, for JSONL and Parquet input."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  texts = [f"Record {i} says {'delta epsilon ' * (i % 5 + 1)}." for i in range(300)]
  jsonl = tmp_path / "in" / "data.jsonl"
  _write(jsonl, "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts)))
  pq.write_table(pa.table({"body": texts}), tmp_path / "in" / "data.parquet", row_group_size=50)
  results = {}
  for source, files_field, workers in (("jsonl", "jsonl_files", 1), ("jsonl", "jsonl_files", 2),
                                       ("parquet", "parquet_files", 2)):
    out = tmp_path / f"out-{source}-{workers}"
    suffix = "jsonl" if source == "jsonl" else "parquet"
    res = subprocess.run(
        [sys.executable, "-m", "deberta_jax.prepare", "--config=configs/tiny.py", f"--out={out}",
         f"--num_workers={workers}", f"--config.data.source={source}",
         f"--config.data.{files_field}={tmp_path / 'in' / ('*.' + suffix)}",
         "--config.data.text_field=body", f"--config.data.spm_model={spm_path}",
         "--config.model.vocab_size=512", "--config.seq_len=32", "--config.data.part_mb=0.002"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["complete"] and summary["shards"] > 2
    manifest = shards.read_manifest(str(out))
    rows = np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])
    results[(source, workers)] = (summary["fingerprint"], rows)
  assert results[("jsonl", 1)][0] == results[("jsonl", 2)][0]
  tok = tokenizer_lib.Tokenizer(spm_path)
  expected = np.concatenate([tok.encode(t) for t in texts])
  for _, rows in results.values():
    np.testing.assert_array_equal(_rows_text(tok, rows), expected)
  bad = subprocess.run(
      [sys.executable, "-m", "deberta_jax.prepare", "--config=configs/tiny.py",
       f"--out={tmp_path / 'bad'}", "--config.data.source=jsonl",
       f"--config.data.jsonl_files={jsonl}", "--config.data.text_field=text",
       f"--config.data.spm_model={spm_path}", "--config.model.vocab_size=512"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 2 and "config.data.text_field='text'" in bad.stderr


# -------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="session")
def text_cfg(tmp_path_factory, spm_path):
  """A small text_files corpus (about 40 chunks of 62 pieces) with the session's spm model."""
  d = tmp_path_factory.mktemp("pipeline_corpus")
  for i, doc in enumerate(_pipeline_docs()):
    _write(d / f"doc{i}.txt", doc)
  return data_config(tmp_path_factory.mktemp("pipeline_cache"), source="text_files",
                     text_files=str(d / "*.txt"), spm_model=spm_path)


def _batches(p, n):
  return [p.next_batch() for _ in range(n)]


def test_pipeline_batches_shapes(text_cfg):
  p = pipeline_lib.make_pipeline(text_cfg)
  assert p.num_chunks >= text_cfg.global_batch_size
  b = p.next_batch()
  chex.assert_shape([b["input_ids"], b["attention_mask"]], (8, 64))
  assert b["input_ids"].dtype == np.int32 and b["attention_mask"].dtype == np.int32
  assert (b["input_ids"][:, 0] == 1).all()
  assert p.tokenizer.mask_id == SPM_PIECES


def test_pipeline_epoch_is_a_permutation(text_cfg):
  p = pipeline_lib.make_pipeline(text_cfg)
  n = p.num_chunks
  for epoch in range(2):
    assert sorted(p.chunk_indices(epoch * n, n).tolist()) == list(range(n))
  assert p.chunk_indices(0, n).tolist() != p.chunk_indices(n, n).tolist()


def test_pipeline_deterministic_from_seed(text_cfg):
  a = _batches(pipeline_lib.make_pipeline(text_cfg), 3)
  b = _batches(pipeline_lib.make_pipeline(text_cfg), 3)
  chex.assert_trees_all_equal(a, b)
  other = text_cfg.copy_and_resolve_references()
  other.seed = 1
  c = _batches(pipeline_lib.make_pipeline(other), 3)
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_pipeline_state_restore_equals_uninterrupted(text_cfg):
  steps = 11  # crosses several epochs of ~40 chunks with batch 8
  reference = _batches(pipeline_lib.make_pipeline(text_cfg), steps)
  p = pipeline_lib.make_pipeline(text_cfg)
  _batches(p, 6)
  state = json.loads(json.dumps(p.state()))  # JSON-serializable
  assert state["examples_seen"] == 6 * 8 and state["seed"] == 0
  resumed = pipeline_lib.make_pipeline(text_cfg)
  resumed.restore(state)
  chex.assert_trees_all_equal(_batches(resumed, steps - 6), reference[6:])
  # Resuming with another process count continues the same global stream.
  halves = [pipeline_lib.make_pipeline(text_cfg, i, 2) for i in range(2)]
  for h in halves:
    h.restore(state)
  got = [np.concatenate([h.next_batch()["input_ids"] for h in halves]) for _ in range(steps - 6)]
  for g, r in zip(got, reference[6:]):
    np.testing.assert_array_equal(g, r["input_ids"])


def test_pipeline_restore_rejects_other_corpus(text_cfg):
  p = pipeline_lib.make_pipeline(text_cfg)
  state = p.state()
  with pytest.raises(DataError, match="chunks"):
    p.restore(dict(state, num_chunks=state["num_chunks"] + 1))
  with pytest.raises(DataError, match="examples_seen"):
    p.restore({"seed": 0, "num_chunks": state["num_chunks"]})
  other = dict(state, dataset_fingerprint="0123456789abcdef")
  with pytest.raises(DataError, match=f"dataset 0123456789abcdef.*dataset {p.fingerprint}"):
    p.restore(other)
  # Another global batch continues the same global stream of examples.
  reference = np.concatenate([p.next_batch()["input_ids"] for _ in range(3)])  # 24 examples
  wider = text_cfg.copy_and_resolve_references()
  wider.global_batch_size = 12
  q = pipeline_lib.make_pipeline(wider)
  q.restore(state)
  np.testing.assert_array_equal(
      np.concatenate([q.next_batch()["input_ids"] for _ in range(2)]), reference)


def test_pipeline_process_slices(text_cfg):
  global_batches = _batches(pipeline_lib.make_pipeline(text_cfg), 4)
  count = 4
  per_process = [_batches(pipeline_lib.make_pipeline(text_cfg, i, count), 4)
                 for i in range(count)]
  for step, full in enumerate(global_batches):
    parts = [per_process[i][step] for i in range(count)]
    for part in parts:
      chex.assert_shape(part["input_ids"], (8 // count, 64))
    for key in ("input_ids", "attention_mask"):
      np.testing.assert_array_equal(np.concatenate([x[key] for x in parts]), full[key])
  # Disjoint: the chunks of one global batch (within an epoch) are distinct.
  p = pipeline_lib.make_pipeline(text_cfg)
  slices = [set(p.chunk_indices(i * 2, 2).tolist()) for i in range(count)]
  assert sum(len(s) for s in slices) == len(set().union(*slices)) == 8


def test_pipeline_corpus_smaller_than_batch(tmp_path, spm_path):
  _write(tmp_path / "tiny.txt", "Just a few words here.")
  cfg = data_config(tmp_path / "cache", source="text_files", text_files=str(tmp_path / "*.txt"),
                    spm_model=spm_path)
  p = pipeline_lib.make_pipeline(cfg)
  assert p.num_chunks == 1
  b = p.next_batch()
  chex.assert_shape(b["input_ids"], (8, 64))
  assert (b["input_ids"] == b["input_ids"][0]).all()


def test_pipeline_embedded_trains_and_caches_spm(cache_dir, embedded, monkeypatch):
  del embedded
  cfg = data_config(cache_dir)
  cfg.seq_len = 128
  p = pipeline_lib.make_pipeline(cfg)
  assert p.tokenizer.num_pieces == SPM_PIECES
  trained = pipeline_lib.trained_spm_path(cfg, corpus_lib.corpus_from_config(cfg))
  assert trained.startswith(os.path.join(str(cache_dir), "spm"))
  assert tokenizer_lib.Tokenizer(trained).fingerprint == p.tokenizer.fingerprint
  assert p.num_chunks > 100
  first = p.next_batch()

  def fail(*a, **k):
    raise AssertionError("spm retrained although cached")
  monkeypatch.setattr(tokenizer_lib, "train_spm", fail)
  monkeypatch.setattr(preparation, "prepare", fail)
  again = pipeline_lib.make_pipeline(cfg)
  assert again.tokenizer.fingerprint == p.tokenizer.fingerprint
  chex.assert_trees_all_equal(again.next_batch(), first)


# ------------------------------------------------------------------------------- error handling


def test_error_glob_matches_nothing(tmp_path):
  cfg = data_config(tmp_path, source="text_files", text_files=str(tmp_path / "none" / "*.txt"))
  with pytest.raises(DataError, match=r"none/\*\.txt"):
    pipeline_lib.make_pipeline(cfg)


def test_error_missing_corpus_path(tmp_path):
  cfg = data_config(tmp_path, source="text_files", text_files=str(tmp_path / "absent.txt"))
  with pytest.raises(DataError, match="absent.txt"):
    pipeline_lib.make_pipeline(cfg)
  cfg.data.text_files = ""
  with pytest.raises(DataError, match="config.data.text_files"):
    pipeline_lib.make_pipeline(cfg)


def test_error_empty_corpus(tmp_path, spm_path):
  _write(tmp_path / "blank.txt", "\n   \n\n")
  cfg = data_config(tmp_path, source="text_files", text_files=str(tmp_path / "*.txt"),
                    spm_model=spm_path)
  with pytest.raises(DataError, match="empty"):
    pipeline_lib.make_pipeline(cfg)
  cfg.data.spm_model = ""  # would train an spm: still the corpus error, not an spm crash
  with pytest.raises(DataError, match="empty"):
    pipeline_lib.make_pipeline(cfg)


def test_error_undecodable_file(tmp_path, spm_path):
  _write(tmp_path / "good.txt", "fine text\n")
  _write(tmp_path / "bad.txt", b"ok line\n\xff\xfe broken \xc3\x28\n")
  cfg = data_config(tmp_path, source="text_files", text_files=str(tmp_path / "*.txt"),
                    spm_model=spm_path)
  with pytest.raises(DataError, match=r"bad\.txt.*line at byte 8"):
    pipeline_lib.make_pipeline(cfg)


def test_error_missing_spm_model(tmp_path):
  cfg = data_config(tmp_path, spm_model=str(tmp_path / "nope.model"))
  with pytest.raises(DataError, match=r"config\.data\.spm_model=.*nope\.model"):
    pipeline_lib.make_pipeline(cfg)


@pytest.mark.parametrize("vocab_size", [500, 700, 128100])
def test_error_vocab_size_mismatch(tmp_path, spm_path, vocab_size):
  cfg = data_config(tmp_path, spm_model=spm_path)
  cfg.model.vocab_size = vocab_size
  with pytest.raises(DataError) as e:
    pipeline_lib.make_pipeline(cfg)
  msg = str(e.value)
  assert "config.model.vocab_size" in msg and str(vocab_size) in msg and "500" in msg
  # Also checked before training an spm, against config.data.spm_vocab_size.
  cfg.data.spm_model = ""
  with pytest.raises(DataError, match="config.data.spm_vocab_size=500"):
    pipeline_lib.make_pipeline(cfg)


def test_error_bad_config_fields(tmp_path):
  with pytest.raises(DataError, match="config.data.source='wiki'"):
    pipeline_lib.make_pipeline(data_config(tmp_path, source="wiki"))
  with pytest.raises(DataError, match="config.global_batch_size=8"):
    pipeline_lib.make_pipeline(data_config(tmp_path), process_index=0, process_count=3)
  cfg = data_config(tmp_path)
  cfg.seed = -1
  with pytest.raises(DataError, match="config.seed"):
    pipeline_lib.make_pipeline(cfg)
  cfg = data_config(tmp_path)
  cfg.seq_len = 2
  with pytest.raises(DataError, match="config.seq_len"):
    pipeline_lib.make_pipeline(cfg)


def test_import_is_lazy():
  code = ("import sys, deberta_jax.data as d; assert 'tensorflow_datasets' not in sys.modules; "
          "assert 'sentencepiece' not in sys.modules; d.Tokenizer; d.make_pipeline; print('ok')")
  res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=120, check=False)
  assert res.returncode == 0 and "ok" in res.stdout, res.stderr

"""Where the pre-training text comes from: config.data.source = embedded | text_files | jsonl |
parquet | tfds (and 'prepared', a dataset written by `python -m deberta_jax.prepare`, read by
`data/loader.py`, not here).

Every source becomes a `Corpus`: a name for messages, a fingerprint that changes whenever the text
may have changed (it keys the spm-model and prepared-dataset caches), an iterator of documents, and
a split into `Part`s: pieces that worker processes (or machines) read independently, each into one
shard of the prepared dataset. Text and JSONL files split at line boundaries inside a file (a
single 100 GB file still spreads over every worker), Parquet files by row groups, tfds datasets
by record ranges.

* 'embedded' (default) needs no download and no user file: the docstrings of the standard library
  and of the packages deberta_jax itself depends on (numpy, scipy, jax, flax, ...), read from the
  source files with `ast` (never imported: importing arbitrary modules has side effects), in
  sorted order and capped at `config.data.embedded_max_bytes`, so one machine always gets the same
  corpus. It is prepared once as a tfds dataset under `<cache_dir>/tfds` and read back like any
  other tfds dataset.
* 'text_files': a glob (or comma-separated globs/files/directories), local or gs://; one document
  per file, or per blank-line-separated block with `config.data.split_on_blank_lines`.
* 'jsonl' / 'parquet': `config.data.jsonl_files` / `config.data.parquet_files` name the files
  (globs, local or gs://), `config.data.text_field` the field holding the text (how most
  published corpora arrive).
* 'tfds': any tfds dataset with a text feature, prepared in array_record format.

tensorflow-datasets without TensorFlow (what we found, tfds 4.9.10, array_record 0.8.6,
Python 3.11, `tensorflow` not installed; docs: tensorflow.org/datasets/tfless_tfds):

1. *Preparing works.* `GeneratorBasedBuilder.download_and_prepare()` on a builder constructed
   with `file_format="array_record"` runs without TF: tfds' own example serializer encodes the
   features, array_record writes `NAME-SPLIT.array_record-0000i-of-0000n` next to
   `dataset_info.json` and `features.json`, examples are shuffled deterministically by key hash.
   So no hand-written layout is needed; `write_tfds_text_dataset` is a plain tfds builder.
2. *Reading works* through `tfds.data_source(name, split=..., data_dir=..., download=False)` (or
   `builder.as_data_source()`): a random-access `ArrayRecordDataSource` with `len`, `[i]` and
   `__getitems__`. A dataset written by an unregistered builder is found from its files alone
   (`'name/config:version'` + data_dir), so readers need no builder code. Text features come
   back as UTF-8 `bytes`.
3. `as_dataset()`/`tfds.load` need TF, and tfrecord-format datasets cannot be data sources
   ("Random access data source for file format FileFormat.TFRECORD is not supported"): catalog
   datasets must be prepared with `file_format='array_record'` to be used here.
4. `self.dataset_info_from_configs()` lists the builder module's directory for metadata files
   (README, CITATIONS.bib...) and fails outside a dedicated dataset package, so our builder
   builds `tfds.core.DatasetInfo(builder=self, ...)` directly.
5. Defining a builder class registers its snake_case name globally and a second definition of the
   same name raises; our builder classes are created on demand with `skip_registration=True`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import types
from typing import Any, Callable, Iterable, Iterator
import warnings

import tensorflow_datasets as tfds

from deberta_jax import caches
from deberta_jax.data import DataError
from deberta_jax.data import storage

SOURCES = ("embedded", "text_files", "jsonl", "parquet", "tfds")
EMBEDDED_DATASET = "deberta_jax_embedded_docstrings"
# Bump when the extraction below changes, so caches built by older code are not reused.
EMBEDDED_FORMAT_VERSION = "1.0.0"
DEFAULT_EMBEDDED_MAX_BYTES = 8_000_000
# After the standard library, in this order: what deberta_jax depends on, so it is installed
# wherever the framework runs. Missing ones are skipped.
EMBEDDED_PACKAGES = ("numpy", "scipy", "jax", "flax", "optax", "orbax", "chex", "ml_collections",
                     "absl", "etils", "tensorflow_datasets")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "testing",
                        "idle_test", "_vendor", "third_party"})
_TFDS_READ_BATCH = 256


def cfg_get(section: Any, name: str, default: Any) -> Any:
  """`section.name`, or `default` when the field is absent or None (configs may predate fields)."""
  try:
    value = section[name]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# Text handed to one `Part` when a corpus is split for preparation: large enough that a shard's
# fixed costs (opening, checksum, upload) vanish, small enough to spread a corpus over hundreds
# of workers and to lose little work when a worker is preempted.
DEFAULT_PART_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Part:
  """A piece of a corpus that one worker reads alone; preparation turns each into one shard.

  kind 'text' / 'jsonl': the lines starting in bytes [start, stop) of file `path`;
  'parquet': row groups [start, stop) of `path`; 'tfds': records [start, stop) of dataset `name`
  split `split` under data_dir `path`; 'documents': the whole corpus, read in-process (corpora
  built from Python iterables). `field` is the JSON field, column or tfds feature holding text;
  `size` the text bytes it holds (approximately), for progress and balancing.
  """

  kind: str
  path: str = ""
  start: int = 0
  stop: int = 0
  field: str = ""
  name: str = ""
  split: str = ""
  size: int = 0


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A re-iterable source of documents (str, never empty or whitespace-only), and its split into
  independently readable parts (`parts`, None for a corpus that only iterates)."""

  name: str
  fingerprint: str
  _documents: Callable[[], Iterator[str]] = dataclasses.field(repr=False)
  _parts: Callable[[int], list[Part]] | None = dataclasses.field(default=None, repr=False)

  def documents(self) -> Iterator[str]:
    return self._documents()

  def parts(self, part_bytes: int = DEFAULT_PART_BYTES) -> list[Part]:
    """A deterministic split into parts of about `part_bytes` of text each."""
    if self._parts is None:
      return [Part("documents")]
    return self._parts(int(part_bytes))

  def lines(self) -> Iterator[str]:
    """The non-blank lines of every part, in order: what tokenizer training and packing read.
    Streams line by line, where `documents()` would hold a whole file as one document."""
    for part in self.parts(1 << 62):
      yield from read_part(part, self)

  def check_not_empty(self) -> None:
    """Raises DataError when the corpus has no text (reads only up to its first line)."""
    for _ in self.lines():
      return
    raise DataError(f"Corpus {self.name} is empty: it has no text.")


def _byte_ranges(path: str, file_size: int, part_bytes: int) -> list[tuple[int, int]]:
  count = max(1, -(-file_size // part_bytes))
  cuts = [file_size * i // count for i in range(count + 1)]
  return list(zip(cuts[:-1], cuts[1:]))


def read_part(part: Part, corpus: Corpus | None = None) -> Iterator[str]:
  """The non-blank text lines of one part (what packing concatenates), in order."""
  if part.kind == "documents":
    assert corpus is not None, "a 'documents' part is read through its corpus"
    for doc in corpus.documents():
      yield from (line for line in doc.splitlines() if line.strip())
  elif part.kind == "text":
    for raw, offset in _lines_with_offsets(part):
      line = _decode(raw, part.path, offset, "config.data.text_files")
      if line.strip():
        yield line.rstrip("\r\n")
  elif part.kind == "jsonl":
    for raw, offset in _lines_with_offsets(part):
      if not raw.strip():
        continue
      text = _jsonl_text(raw, part, offset)
      yield from (line for line in text.splitlines() if line.strip())
  elif part.kind == "parquet":
    for text in _parquet_texts(part):
      yield from (line for line in text.splitlines() if line.strip())
  elif part.kind == "tfds":
    source = _open_tfds(part.name, part.split, part.path)
    for start in range(part.start, part.stop, _TFDS_READ_BATCH):
      indices = list(range(start, min(part.stop, start + _TFDS_READ_BATCH)))
      for index, record in zip(indices, source.__getitems__(indices)):
        what = f"tfds {part.name!r} split {part.split!r} record {index} feature {part.field!r}"
        text = _tfds_text(_get_feature(record, part.field), what)
        yield from (line for line in text.splitlines() if line.strip())
  else:
    raise ValueError(f"unknown part kind {part.kind!r}")


def _lines_with_offsets(part: Part) -> Iterator[tuple[bytes, int]]:
  offset = part.start
  first = True
  for raw in storage.iter_lines(part.path, part.start, part.stop):
    if first and part.start == 0 and raw.startswith(b"\xef\xbb\xbf"):
      raw = raw[3:]  # a UTF-8 byte-order mark is not text
    first = False
    yield raw, offset
    offset += len(raw)


def _decode(raw: bytes, path: str, offset: int, field: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{field}: {path} is not valid UTF-8 (the line at byte {offset}, its byte "
                    f"{e.start}): {e.reason}.") from e


# --------------------------------------------------------------------------- embedded docstrings


def _embedded_roots() -> list[tuple[str, str]]:
  """(label, directory) pairs: the stdlib first, then EMBEDDED_PACKAGES, each found without being
  imported (`find_spec` of a top-level name only locates it)."""
  roots = [("stdlib", sysconfig.get_paths()["stdlib"])]
  for pkg in EMBEDDED_PACKAGES:
    try:
      spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
      spec = None
    if spec is not None and spec.submodule_search_locations:
      roots += [(pkg, loc) for loc in sorted(spec.submodule_search_locations)]
  return roots


def _source_files(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    out += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
  return sorted(out)


def _module_docstrings(path: str) -> str:
  """The module, class and function docstrings of one source file, in source order."""
  try:
    with open(path, "rb") as f:
      source = f.read()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # SyntaxWarnings of old escape sequences
      tree = ast.parse(source, filename=path)
  except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
    return ""
  docs, stack = [], [tree]
  while stack:
    node = stack.pop()
    doc = ast.get_docstring(node, clean=True)
    if doc and doc.strip():
      docs.append(doc.strip())
    stack += [c for c in reversed(node.body)
              if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  return "\n\n".join(docs)


def embedded_documents(max_bytes: int = DEFAULT_EMBEDDED_MAX_BYTES) -> Iterator[str]:
  """One document per source file that has docstrings, until `max_bytes` of UTF-8 text.

  Stops before the first document that would exceed the cap, so the result is a deterministic
  prefix of the same sorted list on a given installation.
  """
  total = 0
  for _, root in _embedded_roots():
    for path in _source_files(root):
      text = _module_docstrings(path)
      if not text:
        continue
      n = len(text.encode("utf-8"))
      if total + n > max_bytes:
        return
      total += n
      yield text


def _embedded_config_name(max_bytes: int) -> str:
  """Names the embedded variant by what determines its text: extraction version, Python version,
  cap, and the relative paths and sizes of every candidate source file (host independent, so
  identical installations on several hosts produce the same name)."""
  listing = [(label, os.path.relpath(p, root), os.path.getsize(p))
             for label, root in _embedded_roots() for p in _source_files(root)]
  key = _hash([EMBEDDED_FORMAT_VERSION, sys.version, int(max_bytes), listing])[:10]
  return f"py{sys.version_info[0]}{sys.version_info[1]}_{int(max_bytes)}b_{key}"


def prepare_embedded_corpus(cache_dir: str,
                            max_bytes: int = DEFAULT_EMBEDDED_MAX_BYTES) -> tuple[str, str]:
  """Prepares the embedded corpus as a tfds dataset once; returns (tfds name, data_dir).

  Reuses `<cache_dir>/tfds/deberta_jax_embedded_docstrings/<config>/1.0.0` when present (tfds
  itself skips preparation of an existing dataset directory).
  """
  if int(max_bytes) <= 0:
    raise DataError(f"config.data.embedded_max_bytes={max_bytes} must be > 0.")
  data_dir = os.path.join(cache_dir, "tfds")
  config_name = _embedded_config_name(max_bytes)
  write_tfds_text_dataset(
      EMBEDDED_DATASET, lambda: embedded_documents(max_bytes), data_dir, config_name=config_name,
      description=f"Docstrings of the Python standard library and of {', '.join(EMBEDDED_PACKAGES)}"
                  f" (sorted source files, at most {max_bytes} bytes of UTF-8).")
  return f"{EMBEDDED_DATASET}/{config_name}:1.0.0", data_dir


# --------------------------------------------------------------------------------- tfds datasets


def _lazy_tfds():
  return tfds


def _text_builder_class(name: str, version: str, configs: list[Any]):
  """A GeneratorBasedBuilder for {'text': Text()} named `name`, created without registration."""
  tfds = _lazy_tfds()

  class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)
    RELEASE_NOTES = {version: "Written by deberta_jax.data.corpus.write_tfds_text_dataset."}

    def __init__(self, *, documents: Callable[[], Iterable[str]], description: str = "", **kw):
      self._documents = documents
      self._description = description
      super().__init__(**kw)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=self._description,
          features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, text in enumerate(self._documents()):
        yield i, {"text": text}

  return types.new_class(
      "".join(p.title() for p in name.split("_")) or "TextCorpus", (_TextBuilder,),
      {"skip_registration": True},
      lambda ns: ns.update({"name": name, "BUILDER_CONFIGS": list(configs)}))


def write_tfds_text_dataset(name: str, documents: Callable[[], Iterable[str]], data_dir: str, *,
                            config_name: str | None = None, version: str = "1.0.0",
                            description: str = "") -> str:
  """Prepares a tfds dataset {'text': Text()} with one 'train' split in array_record format.

  `documents` is called (once) to produce the texts. Nothing is written if the dataset directory
  already exists. Returns that directory, `<data_dir>/<name>[/<config_name>]/<version>`; read it
  back with `tfds.data_source('<name>[/<config_name>]:<version>', split='train',
  data_dir=data_dir)` or `source='tfds'`. Useful to convert any text into a tfds dataset that
  several hosts can then read without TensorFlow.
  """
  tfds = _lazy_tfds()
  configs, kw = [], {}
  if config_name:
    configs = [tfds.core.BuilderConfig(name=config_name, description=description)]
    kw["config"] = config_name
  builder = _text_builder_class(name, version, configs)(
      documents=documents, description=description, data_dir=data_dir,
      file_format="array_record", **kw)
  builder_dir = os.fspath(builder.data_dir)
  try:
    builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
  except Exception:
    # Another process preparing the same dataset may have won the final rename; its result is
    # as good as ours.
    if not os.path.exists(os.path.join(builder_dir, "dataset_info.json")):
      raise
  return builder_dir


@functools.lru_cache(maxsize=8)  # a worker reads many parts of one dataset: open it once
def _open_tfds(name: str, split: str, data_dir: str):
  tfds = _lazy_tfds()
  where = (f"config.data.tfds_name={name!r}, config.data.tfds_split={split!r}, "
           f"config.data.tfds_data_dir={data_dir!r}")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, NotImplementedError..)
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".: ")
    raise DataError(
        f"Cannot read the tfds dataset ({where}) as a data source: {first_line}. Without "
        f"TensorFlow only datasets prepared with file_format='array_record' can be read.") from e


def _get_feature(record: Any, feature: str) -> Any:
  for key in feature.split("/"):  # 'a/b' reaches nested FeaturesDicts
    record = record[key]
  return record


def _tfds_text(value: Any, what: str) -> str:
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(f"{what} is not valid UTF-8: {e}") from e
  if isinstance(value, str):
    return value
  if hasattr(value, "tolist"):  # a Sequence(Text()) feature: one document, one line per item
    return "\n".join(_tfds_text(v, what) for v in value.tolist())
  raise DataError(f"{what} is a {type(value).__name__}, not text.")


def tfds_corpus(name: str, split: str = "train", data_dir: str = "",
                text_feature: str = "text", label: str = "") -> Corpus:
  """Documents of one text feature of a tfds dataset prepared in array_record format."""
  if not name:
    raise DataError("config.data.tfds_name is empty; set it for config.data.source='tfds', "
                    "e.g. 'wikipedia/20230601.en'.")
  source = _open_tfds(name, split, data_dir)
  info = source.dataset_info
  top = text_feature.split("/")[0]
  if top not in info.features.keys():
    raise DataError(f"config.data.tfds_text_feature={text_feature!r} is not a feature of tfds "
                    f"dataset {name!r}; it has {sorted(info.features.keys())}.")
  fingerprint = _hash(["tfds", info.full_name, split, text_feature, len(source),
                       json.loads(info.as_json)])

  def documents() -> Iterator[str]:
    n = len(source)
    for start in range(0, n, _TFDS_READ_BATCH):
      records = source.__getitems__(list(range(start, min(n, start + _TFDS_READ_BATCH))))
      for offset, record in enumerate(records):
        what = f"tfds {name!r} split {split!r} record {start + offset} feature {text_feature!r}"
        text = _tfds_text(_get_feature(record, text_feature), what)
        if text.strip():
          yield text

  def parts(part_bytes: int) -> list[Part]:
    n = len(source)
    try:
      split_info = info.splits[split.split("[")[0]]
      record_bytes = split_info.num_bytes / max(1, split_info.num_examples)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
      record_bytes = 0
    count = max(1, min(n, round(n * record_bytes / part_bytes))) if record_bytes else 1
    cuts = [n * i // count for i in range(count + 1)]
    return [Part("tfds", data_dir, a, b, text_feature, name, split, int((b - a) * record_bytes))
            for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

  return Corpus(label or f"tfds:{name}[{split}]", fingerprint, documents, parts)


# ------------------------------------------------------------------------------------ text files


def _expand_files(spec: str, field: str, example: str) -> list[str]:
  """Files named by comma-separated globs, files or directories, local or remote (gs://)."""
  if not spec:
    raise DataError(f"config.data.{field} is empty; set it to a glob such as {example!r}.")
  files: list[str] = []
  for pattern in (p.strip() for p in spec.split(",")):
    if not pattern:
      continue
    path = storage.absolute(pattern)
    if any(c in pattern for c in "*?["):
      matched = storage.glob(path)
      if not matched:
        raise DataError(f"config.data.{field}: the glob {pattern!r} matches no file.")
    elif storage.isdir(path):
      matched = storage.listdir(path)
    elif storage.exists(path):
      matched = [path]
    else:
      raise DataError(f"config.data.{field}: corpus path {pattern!r} does not exist.")
    files += [f for f in matched if storage.isfile(f)]
  if not files:
    raise DataError(f"config.data.{field}={spec!r} matches no regular file.")
  return files


def _file_documents(path: str, split_on_blank_lines: bool) -> Iterator[str]:
  block: list[str] = []
  for raw, offset in _lines_with_offsets(Part("text", path, 0, 1 << 62)):
    line = _decode(raw, path, offset, "config.data.text_files")
    if split_on_blank_lines and not line.strip():
      if block:
        yield "".join(block).strip()
        block = []
    elif line.strip() or block:
      block.append(line)
  text = "".join(block).strip()
  if text:
    yield text


def _line_file_parts(kind: str, files: list[str], sizes: list[int], field: str = ""):
  def parts(part_bytes: int) -> list[Part]:
    return [Part(kind, f, a, b, field, size=b - a)
            for f, n in zip(files, sizes) for a, b in _byte_ranges(f, n, part_bytes)]
  return parts


def text_file_corpus(spec: str, split_on_blank_lines: bool = False) -> Corpus:
  """Documents of UTF-8 text files (local or gs://), per file or per blank-line block."""
  files = _expand_files(spec, "text_files", "/data/corpus/*.txt")
  stats = [storage.fingerprint_of(f) for f in files]
  fingerprint = _hash(["text_files", bool(split_on_blank_lines), stats])

  def documents() -> Iterator[str]:
    for f in files:
      yield from _file_documents(f, split_on_blank_lines)

  return Corpus(f"text_files:{spec}", fingerprint, documents,
                _line_file_parts("text", files, [s[1] for s in stats]))


# ------------------------------------------------------------------------------- JSONL and Parquet


def _jsonl_text(raw: bytes, part: Part, offset: int) -> str:
  where = f"config.data.jsonl_files: {part.path}, the line at byte {offset}"
  try:
    record = json.loads(raw)
  except ValueError as e:
    raise DataError(f"{where} is not a JSON object: {e}") from e
  if not isinstance(record, dict) or part.field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where} has no field config.data.text_field={part.field!r} (it has "
                    f"{keys}).")
  text = record[part.field]
  if text is None:
    return ""
  if not isinstance(text, str):
    raise DataError(f"{where}: field {part.field!r} is a {type(text).__name__}, not text.")
  return text


def jsonl_corpus(spec: str, text_field: str = "text") -> Corpus:
  """The `text_field` of every JSON object of JSON-lines files (local or gs://)."""
  files = _expand_files(spec, "jsonl_files", "/data/corpus/*.jsonl")
  stats = [storage.fingerprint_of(f) for f in files]
  parts_of = _line_file_parts("jsonl", files, [s[1] for s in stats], text_field)

  def documents() -> Iterator[str]:
    for part in parts_of(1 << 62):
      for raw, offset in _lines_with_offsets(part):
        if raw.strip():
          text = _jsonl_text(raw, part, offset)
          if text.strip():
            yield text

  return Corpus(f"jsonl:{spec}[{text_field}]", _hash(["jsonl", text_field, stats]), documents,
                parts_of)


def _parquet_file(path: str):
  import pyarrow.parquet as pq  # installed with tensorflow-datasets; only this source needs it
  try:
    return pq.ParquetFile(storage.open_read(path))
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not Parquet
    raise DataError(f"config.data.parquet_files: {path} is not a Parquet file ({e}).") from e


def _parquet_texts(part: Part) -> Iterator[str]:
  pf = _parquet_file(part.path)
  if part.field not in pf.schema_arrow.names:
    raise DataError(f"config.data.parquet_files: {part.path} has no column "
                    f"config.data.text_field={part.field!r} (it has {pf.schema_arrow.names}).")
  for group in range(part.start, part.stop):
    column = pf.read_row_group(group, columns=[part.field]).column(0)
    for text in column.to_pylist():
      if isinstance(text, str) and text.strip():
        yield text


def parquet_corpus(spec: str, text_field: str = "text") -> Corpus:
  """The `text_field` column of Parquet files (local or gs://), split by row groups."""
  files = _expand_files(spec, "parquet_files", "/data/corpus/*.parquet")
  stats = [storage.fingerprint_of(f) for f in files]

  def parts(part_bytes: int) -> list[Part]:
    out = []
    for f in files:
      meta = _parquet_file(f).metadata
      sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
      start, acc = 0, 0
      for g, n in enumerate(sizes):
        acc += n
        if acc >= part_bytes or g == len(sizes) - 1:
          out.append(Part("parquet", f, start, g + 1, text_field, size=acc))
          start, acc = g + 1, 0
    return out

  def documents() -> Iterator[str]:
    for part in parts(1 << 62):
      yield from _parquet_texts(part)

  return Corpus(f"parquet:{spec}[{text_field}]", _hash(["parquet", text_field, stats]),
                documents, parts)


# ---------------------------------------------------------------------------------------- config


def corpus_from_config(config: Any) -> Corpus:
  """The corpus `config.data.source` selects (preparing the embedded one on first use)."""
  data = config.data
  source = cfg_get(data, "source", "embedded")
  if source == "embedded":
    max_bytes = cfg_get(data, "embedded_max_bytes", DEFAULT_EMBEDDED_MAX_BYTES)
    name, data_dir = prepare_embedded_corpus(caches.local_directory(config), max_bytes)
    return tfds_corpus(name, "train", data_dir, "text", label=f"embedded:{name}")
  if source == "text_files":
    return text_file_corpus(cfg_get(data, "text_files", ""),
                            bool(cfg_get(data, "split_on_blank_lines", False)))
  if source == "jsonl":
    return jsonl_corpus(cfg_get(data, "jsonl_files", ""), cfg_get(data, "text_field", "text"))
  if source == "parquet":
    return parquet_corpus(cfg_get(data, "parquet_files", ""), cfg_get(data, "text_field", "text"))
  if source == "tfds":
    return tfds_corpus(cfg_get(data, "tfds_name", ""), cfg_get(data, "tfds_split", "train"),
                       cfg_get(data, "tfds_data_dir", ""),
                       cfg_get(data, "tfds_text_feature", "text"))
  raise DataError(f"config.data.source={source!r} is not one of {SOURCES}.")

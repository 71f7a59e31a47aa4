"""Checkpoint interchange with Hugging Face transformers' DebertaV2 (and the official layout).

`load_pretrained(path) -> (model_config, params)` reads a HF DebertaV2 directory (config.json with
model.safetensors, or pytorch_model.bin when torch is installed), including the RTD head
(`mask_predictions.*`) and the MLM head (`lm_predictions.*`, or the legacy `cls.predictions.*`).
`save_pretrained(path, model_config, params)` writes the reverse. The parameter tree is ours
(`embeddings`, `encoder`, optional `lm_head` / `mask_predictions`), so the discriminator,
generator and backbone all go through the same two functions.

Linear kernels are stored transposed in torch ([out, in]); the vocabulary rows that pad the
embedding to a shardable size exist only on our side and are stripped on save, re-added on load.
A checkpoint is never cut to fit the network it is loaded into: depth, width and vocabulary are
read from its tensors (`architecture_of`; heads from its config.json) and a mismatch is a
CheckpointError. Paths may be local or gs:// (read through `data.storage`; directories written
locally, then uploaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Sequence

from flax import traverse_util
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from deberta_jax.data import storage
from deberta_jax.errors import BadInput
from deberta_jax.models import classifier
from deberta_jax.models.config import ModelConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
GENERATOR_FILE = "pytorch_model.generator.bin"  # a release's generator, beside its TORCH_FILE
SPM_FILE = "spm.model"

# (torch module path, our module path) for modules with weight/bias; `{i}` is a layer index.
_LINEAR = [
    ("encoder.layer.{i}.attention.self.query_proj", "encoder/layer_{i}/attention/query_proj"),
    ("encoder.layer.{i}.attention.self.key_proj", "encoder/layer_{i}/attention/key_proj"),
    ("encoder.layer.{i}.attention.self.value_proj", "encoder/layer_{i}/attention/value_proj"),
    ("encoder.layer.{i}.attention.output.dense", "encoder/layer_{i}/attention_output"),
    ("encoder.layer.{i}.intermediate.dense", "encoder/layer_{i}/intermediate"),
    ("encoder.layer.{i}.output.dense", "encoder/layer_{i}/output"),
]
_NORM = [
    ("embeddings.LayerNorm", "embeddings/LayerNorm"),
    ("encoder.LayerNorm", "encoder/LayerNorm"),
    ("encoder.layer.{i}.attention.output.LayerNorm", "encoder/layer_{i}/attention_LayerNorm"),
    ("encoder.layer.{i}.output.LayerNorm", "encoder/layer_{i}/output_LayerNorm"),
]
_TABLES = [
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings"),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings"),
    ("encoder.rel_embeddings.weight", "encoder/rel_embeddings"),
]
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.")
_HEADS = {
    "lm_head": ("lm_predictions.lm_head", [("dense", "dense")], [("LayerNorm", "LayerNorm")]),
    "legacy_lm_head": ("cls.predictions", [("transform.dense", "dense")],
                       [("transform.LayerNorm", "LayerNorm")]),
    "mask_predictions": ("mask_predictions", [("dense", "dense"), ("classifier", "classifier")],
                         [("LayerNorm", "LayerNorm")]),
}


class CheckpointError(BadInput):
  """A checkpoint directory that is missing, unreadable or not a DeBERTaV3 model."""


# ----------------------------------------------------------------------------------------- config

def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """ModelConfig from a HF config.json dict; refuses architectures this framework does not build."""
  pos_att = hf.get("pos_att_type") or []
  if isinstance(pos_att, str):
    pos_att = [p.strip() for p in pos_att.lower().split("|") if p.strip()]
  norm_rel = str(hf.get("norm_rel_ebd", "none")).lower()
  problems = []
  if hf.get("model_type") not in (None, "deberta-v2"):
    problems.append(f"model_type={hf.get('model_type')!r} (expected 'deberta-v2')")
  if not hf.get("relative_attention", False):
    problems.append("relative_attention is not true")
  if sorted(pos_att) != ["c2p", "p2c"]:
    problems.append(f"pos_att_type={pos_att!r} (expected c2p and p2c)")
  if not hf.get("share_att_key", False):
    problems.append("share_att_key is not true")
  if hf.get("position_biased_input", True):
    problems.append("position_biased_input is not false")
  if "layer_norm" not in norm_rel:
    problems.append(f"norm_rel_ebd={norm_rel!r} (expected 'layer_norm')")
  if hf.get("type_vocab_size", 0):
    problems.append(f"type_vocab_size={hf.get('type_vocab_size')} (expected 0)")
  if hf.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={hf.get('hidden_act')!r} (expected 'gelu')")
  if hf.get("conv_kernel_size", 0):
    problems.append("conv_kernel_size is set (DeBERTaV2 xlarge-style conv layer)")
  if hf.get("embedding_size") not in (None, hf.get("hidden_size")):
    problems.append("embedding_size differs from hidden_size")
  if hf.get("position_buckets", -1) <= 0:
    problems.append("position_buckets is not positive")
  head_size = hf.get("attention_head_size")
  if head_size is not None and head_size * hf["num_attention_heads"] != hf["hidden_size"]:
    problems.append(f"attention_head_size={head_size} * heads != hidden_size")
  if problems:
    raise CheckpointError("not a DeBERTaV3 configuration: " + "; ".join(problems))
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=int(hf["num_attention_heads"]),
      intermediate_size=int(hf["intermediate_size"]),
      max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
      position_buckets=int(hf["position_buckets"]),
      max_relative_positions=int(hf.get("max_relative_positions", -1)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-7)),
      hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
      attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
  )


def config_to_hf(config: ModelConfig, architecture: str, pad_token_id: int = 0) -> dict:
  """The config.json transformers needs to rebuild exactly this architecture.

  HF only picks up position_buckets, norm_rel_ebd, share_att_key and attention_head_size through
  getattr, and defaults relative_attention/position_biased_input to the v1 values, so every one
  of them is written explicitly.
  """
  return {
      "architectures": [architecture],
      "model_type": "deberta-v2",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "attention_head_size": config.head_size,
      "intermediate_size": config.intermediate_size,
      "hidden_act": "gelu",
      "hidden_dropout_prob": config.hidden_dropout,
      "attention_probs_dropout_prob": config.attention_dropout,
      "max_position_embeddings": config.max_position_embeddings,
      "type_vocab_size": 0,
      "initializer_range": config.initializer_range,
      "layer_norm_eps": config.layer_norm_eps,
      "relative_attention": True,
      "max_relative_positions": config.max_relative_positions,
      "position_buckets": config.position_buckets,
      "norm_rel_ebd": "layer_norm",
      "share_att_key": True,
      "pos_att_type": ["p2c", "c2p"],
      "position_biased_input": False,
      "pad_token_id": pad_token_id,
      "pooler_hidden_size": config.hidden_size,
      "pooler_dropout": 0,
      "pooler_hidden_act": "gelu",
      "legacy": False,
  }


# ------------------------------------------------------------------------------------ weight maps

def _expand(pairs, num_layers):
  for torch_name, ours in pairs:
    if "{i}" in torch_name:
      for i in range(num_layers):
        yield torch_name.format(i=i), ours.format(i=i)
    else:
      yield torch_name, ours


def _name_map(num_layers: int) -> list[tuple[str, str, str]]:
  """(torch key, our flat path, kind) for the backbone; kind says how to convert the array."""
  out = []
  for t, o in _expand(_LINEAR, num_layers):
    out += [(f"{t}.weight", f"{o}/kernel", "linear"), (f"{t}.bias", f"{o}/bias", "copy")]
  for t, o in _expand(_NORM, num_layers):
    out += [(f"{t}.weight", f"{o}/scale", "copy"), (f"{t}.bias", f"{o}/bias", "copy")]
  for t, o in _TABLES:
    out.append((t, o, "table" if "word" in t else "copy"))
  return out


def _head_map(head: str) -> list[tuple[str, str, str]]:
  prefix, linears, norms = _HEADS[head]
  ours = "lm_head" if head == "legacy_lm_head" else head
  out = []
  for t, o in linears:
    out += [(f"{prefix}.{t}.weight", f"{ours}/{o}/kernel", "linear"),
            (f"{prefix}.{t}.bias", f"{ours}/{o}/bias", "copy")]
  for t, o in norms:
    out += [(f"{prefix}.{t}.weight", f"{ours}/{o}/scale", "copy"),
            (f"{prefix}.{t}.bias", f"{ours}/{o}/bias", "copy")]
  out.append((f"{prefix}.bias", f"{ours}/bias", "vector"))
  if head == "mask_predictions":
    out.pop()  # the RTD head has no output bias vector of vocabulary size
  return out


# ----------------------------------------------------------------------------------------- reading

@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """The tensors of one weights file (keys as stored), the file they came from, and the
  config.json that describes that file, if there is one."""

  state: dict[str, np.ndarray]
  file: str
  hf_config: dict | None


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a checkpoint is: its depth, width and vocabulary rows from its tensors, its attention
  heads from its config.json (tensors do not show how the width is split into heads)."""

  num_layers: int
  hidden_size: int
  vocab_rows: int
  num_heads: int | None


def _weights_file(directory: str, generator: bool) -> str:
  """The weights file of a directory: for a generator the release's pytorch_model.generator.bin
  when there is one (the directory's pytorch_model.bin is then the discriminator), else
  model.safetensors, else pytorch_model.bin."""
  names = ([GENERATOR_FILE] if generator else []) + [SAFETENSORS_FILE, TORCH_FILE]
  for name in names:
    file = storage.join(directory, name)
    if storage.isfile(file):
      return file
  raise CheckpointError(f"{directory}: neither {SAFETENSORS_FILE} nor {TORCH_FILE} found")


def _read_json(path: str) -> dict:
  try:
    value = json.loads(storage.read_bytes(path))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: {e}") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} is not a JSON object")
  return value


@contextlib.contextmanager
def _local_copy(file: str):
  """A local path holding `file`: the file itself, or a download of an object-store URL
  (safetensors and torch read local files; the copy is streamed, never held in memory)."""
  if not storage.is_remote(file):
    yield file
    return
  with tempfile.TemporaryDirectory(prefix="deberta-hf-") as tmp:
    local = os.path.join(tmp, os.path.basename(file))
    with storage.open_read(file) as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 22)
    yield local


def _tensors(file: str) -> dict[str, np.ndarray]:
  """The float32 tensors of one .safetensors or torch state-dict file."""
  if file.endswith(".safetensors"):
    try:
      with _local_copy(file) as local, safe_open(local, framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except Exception as e:  # a corrupt or truncated file: name it
      raise CheckpointError(f"cannot read the weights in {file}: {type(e).__name__}: {e}") from e
  try:
    import torch  # pylint: disable=import-outside-toplevel  # optional: only for .bin files
  except ImportError as e:
    raise CheckpointError(
        f"{file}: reading a torch state dict needs torch; convert it to model.safetensors") from e
  try:
    with _local_copy(file) as local:
      state = torch.load(local, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  except Exception as e:  # a corrupt file or not a state dict: name it
    raise CheckpointError(f"cannot read the weights in {file}: {type(e).__name__}: {e}") from e


def read_checkpoint(path: str, generator: bool = False) -> Checkpoint:
  """The tensors of a HF directory or of one state-dict file, local or gs://.

  A directory gives its weights file (`_weights_file`; `generator` prefers the release's
  pytorch_model.generator.bin). config.json describes the directory's main weights
  (model.safetensors / pytorch_model.bin) only: in a release it is the discriminator's, so it is
  not attached to pytorch_model.generator.bin.
  """
  if storage.isdir(path):
    file = _weights_file(path, generator)
  elif storage.isfile(path):
    file = path
  else:
    raise CheckpointError(f"{path}: no such file or directory")
  directory, name = os.path.split(file)
  config_path = storage.join(directory, CONFIG_FILE)
  hf_config = None
  if name in (SAFETENSORS_FILE, TORCH_FILE) and storage.isfile(config_path):
    hf_config = _read_json(config_path)
  return Checkpoint(_tensors(file), file, hf_config)


def read_state(path: str) -> dict[str, np.ndarray]:
  """The float32 tensors of a checkpoint: a HF directory (model.safetensors or
  pytorch_model.bin) or a single state-dict file (.safetensors, or a torch .bin such as the
  official release's `pytorch_model.bin` / `pytorch_model.generator.bin`), keys as stored."""
  return read_checkpoint(path).state


def _layer_count(state: dict[str, np.ndarray]) -> int:
  """Encoder layers of a state dict (normalised keys): one more than the highest index."""
  indices = {int(m.group(1)) for m in map(_LAYER_KEY.match, state) if m}
  return max(indices) + 1 if indices else 0


def architecture_of(checkpoint: Checkpoint) -> Architecture:
  """The checkpoint's depth, width and vocabulary from its tensors, and its heads from its
  config.json; a config.json that contradicts the tensors is refused (the file beside it is
  another model's)."""
  state = _normalise_keys(checkpoint.state)
  table = state.get("embeddings.word_embeddings.weight")
  if table is None or table.ndim != 2:
    raise CheckpointError(f"{checkpoint.file}: no embeddings.word_embeddings.weight (deberta.* "
                          f"keys): not a DebertaV2 checkpoint")
  found = Architecture(_layer_count(state), int(table.shape[1]), int(table.shape[0]), None)
  hf_config = checkpoint.hf_config
  if hf_config is None:
    return found
  said = {"layers": ("num_hidden_layers", found.num_layers),
          "hidden size": ("hidden_size", found.hidden_size),
          "vocabulary rows": ("vocab_size", found.vocab_rows)}
  def number(key):
    try:
      return None if hf_config.get(key) is None else int(hf_config[key])
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{checkpoint.file}: its config.json has {key}={hf_config[key]!r}, "
                            f"not a number") from e
  for what, (key, value) in said.items():
    if number(key) not in (None, value):
      raise CheckpointError(
          f"{checkpoint.file}: its config.json says {key}={hf_config[key]} but the weights have "
          f"{value} {what}")
  return dataclasses.replace(found, num_heads=number("num_attention_heads"))


def _normalise_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips the model prefix (`deberta.`, or the official code's `bert.`) from backbone keys."""
  out = {}
  for key, value in state.items():
    key = re.sub(r"^(deberta|bert)\.", "", key)
    out[key] = value
  return out


def _pad_rows(table: np.ndarray, rows: int) -> np.ndarray:
  if table.shape[0] >= rows:
    return table
  return np.concatenate([table, np.zeros((rows - table.shape[0],) + table.shape[1:], table.dtype)])


def load_pretrained(path: str) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a HF DebertaV2 directory (local or gs://); heads included when
  present.

  The returned params apply directly to `DebertaEncoder` (the heads are ignored there), and to
  `Discriminator` / `Generator` when the respective head was in the checkpoint. Weights that
  config.json does not describe (more layers, another width or vocabulary) are refused, never
  cut to fit.
  """
  config_path = storage.join(path, CONFIG_FILE)
  if not storage.isfile(config_path):
    raise CheckpointError(f"{config_path} not found: not a Hugging Face model directory")
  config = config_from_hf(_read_json(config_path))
  checkpoint = read_checkpoint(path)
  architecture_of(checkpoint)
  state = _normalise_keys(checkpoint.state)
  config = config.replace(position_table="embeddings.position_embeddings.weight" in state)
  flat, _, _ = network_from_state(state, config.num_layers, config.padded_vocab_size,
                                  checkpoint.file)
  _check_shapes(flat, config, path)
  return config, traverse_util.unflatten_dict(flat)


def network_from_state(state: dict[str, np.ndarray], num_layers: int, padded_vocab_size: int,
                       path: str) -> tuple[dict[tuple[str, ...], np.ndarray], list[str], int]:
  """Our flat parameters from a DebertaV2 state dict (HF or official key layout), with whatever
  heads it has: (flat params, head names found, rows of its word embedding).

  The backbone must be complete (CheckpointError naming the first missing tensor); the EMD's
  absolute position table and the heads may be absent. A state with another number of encoder
  layers is refused: loading the first `num_layers` of a deeper network would look like success.
  """
  state = _normalise_keys(state)
  if "embeddings.word_embeddings.weight" not in state:
    raise CheckpointError(f"{path}: no embeddings.word_embeddings.weight (deberta.* keys): not a "
                          f"DebertaV2 checkpoint")
  rows = int(state["embeddings.word_embeddings.weight"].shape[0])
  if rows > padded_vocab_size:
    raise CheckpointError(f"{path}: embeddings.word_embeddings.weight has {rows} rows, more than "
                          f"this model's {padded_vocab_size}")
  layers = _layer_count(state)
  if layers != num_layers:
    raise CheckpointError(f"{path}: has {layers} encoder layers, the model being loaded has "
                          f"{num_layers}")
  names = _name_map(num_layers)
  heads = []
  if "mask_predictions.dense.weight" in state:
    heads.append("mask_predictions")
  if "lm_predictions.lm_head.dense.weight" in state:
    heads.append("lm_head")
  elif "cls.predictions.transform.dense.weight" in state:
    heads.append("legacy_lm_head")
  for head in heads:
    names += _head_map(head)
  flat = {}
  for torch_key, ours, kind in _present(names, lambda t, o: t in state,
                                        lambda t, o: f"{path}: weight {t!r} is missing"):
    value = state[torch_key]
    if kind == "linear":
      value = value.T
    elif kind in ("table", "vector"):
      value = _pad_rows(value, padded_vocab_size)
    flat[tuple(ours.split("/"))] = np.ascontiguousarray(value, np.float32)
  return flat, ["lm_head" if h == "legacy_lm_head" else h for h in heads], rows


def _present(names, available, missing_message):
  """The (torch key, our path, kind) entries of `names` that `available(torch_key, ours)`
  finds. Only the EMD's absolute position table may be absent (transformers' v3 models have
  none); any other missing weight raises CheckpointError(missing_message(torch_key, ours))."""
  for torch_key, ours, kind in names:
    if available(torch_key, ours):
      yield torch_key, ours, kind
    elif ours != "embeddings/position_embeddings":
      raise CheckpointError(missing_message(torch_key, ours))


def _check_shapes(flat, config: ModelConfig, path: str):
  expected = {
      ("embeddings", "word_embeddings"): (config.padded_vocab_size, config.hidden_size),
      ("encoder", "rel_embeddings"): (2 * config.position_buckets, config.hidden_size),
  }
  for key, shape in expected.items():
    if flat[key].shape != shape:
      raise CheckpointError(f"{path}: {'/'.join(key)} has shape {flat[key].shape}, config says {shape}")


# ----------------------------------------------------------------------------------------- writing

@contextlib.contextmanager
def _staged(path: str):
  """A local directory to write a model directory into: `path` itself, or, for an object-store
  URL, a temporary directory whose files are uploaded once all are written (config.json last, so
  a reader that finds config.json finds the weights beside it). A write that fails uploads
  nothing."""
  if not storage.is_remote(path):
    os.makedirs(path, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="deberta-hf-") as tmp:
    yield tmp
    for name in sorted(os.listdir(tmp), key=lambda n: (n == CONFIG_FILE, n)):
      storage.put_file(os.path.join(tmp, name), storage.join(path, name))


def save_pretrained(path: str, model_config: ModelConfig, params: Mapping[str, Any],
                    spm_model: str | None = None, mask_token_id: int | None = None) -> None:
  """Writes `params` as a HF DebertaV2 directory (config.json, model.safetensors[, spm.model]),
  local or gs://.

  A tree with `lm_head` is written as DebertaV2ForMaskedLM (non-legacy head, the official key
  layout); one with `mask_predictions` keeps the RTD head under the official key names, which
  transformers ignores when it builds a backbone. Tokenizer files are added when `spm_model`
  names a SentencePiece model (local or gs://).
  """
  with _staged(path) as local:
    _write_pretrained(local, model_config, params, spm_model, mask_token_id)


def _write_pretrained(path: str, model_config: ModelConfig, params: Mapping[str, Any],
                      spm_model: str | None, mask_token_id: int | None) -> None:
  """`save_pretrained` into an existing local directory."""
  params = {k: v for k, v in params.items()}
  flat = {"/".join(k): np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(params).items()}
  names = _name_map(model_config.num_layers)
  architecture = "DebertaV2Model"
  if "lm_head/bias" in flat:
    names += _head_map("lm_head")
    architecture = "DebertaV2ForMaskedLM"
  if "mask_predictions/dense/kernel" in flat:
    names += _head_map("mask_predictions")
  state = {}
  for torch_key, ours, kind in _present(
      names, lambda t, o: o in flat,
      lambda t, o: f"parameter {o!r} is missing from the tree being saved"):
    value = flat[ours]
    if kind == "linear":
      value = value.T
    elif kind in ("table", "vector"):
      value = value[: model_config.vocab_size]
    prefix = "" if torch_key.startswith(("lm_predictions.", "mask_predictions.")) else "deberta."
    state[prefix + torch_key] = np.ascontiguousarray(value)

  tmp = os.path.join(path, SAFETENSORS_FILE + ".tmp")
  save_file(state, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(path, SAFETENSORS_FILE))
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(model_config, architecture), f, indent=2, sort_keys=True)
  if spm_model:
    _write_tokenizer(path, spm_model, mask_token_id)


def _write_tokenizer(path: str, spm_model: str, mask_token_id: int | None) -> None:
  """spm.model plus the files DebertaV2Tokenizer reads; [MASK] is an added token after the pieces."""
  with storage.open_read(spm_model) as src, open(os.path.join(path, SPM_FILE), "wb") as dst:
    shutil.copyfileobj(src, dst)
  tokenizer_config = {
      "tokenizer_class": "DebertaV2Tokenizer",
      "vocab_type": "spm",
      "do_lower_case": False,
      "split_by_punct": False,
      "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]",
      "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
  }
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(tokenizer_config, f, indent=2)
  special = {k: v for k, v in tokenizer_config.items() if k.endswith("_token")}
  with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  if mask_token_id is not None:
    with open(os.path.join(path, "added_tokens.json"), "w") as f:
      json.dump({"[MASK]": int(mask_token_id)}, f)


def save_sequence_classifier(path: str, model_config: ModelConfig, params: Mapping[str, Any],
                    num_labels: int, label_names: Sequence[str] | None = None,
                    spm_model: str | None = None, mask_token_id: int | None = None,
                    cls_dropout: float | None = None) -> None:
  """A HF DebertaV2ForSequenceClassification directory of a fine-tuned classifier tree, local or
  gs://.

  The backbone is written as by `save_pretrained`; the pooler and classifier are added
  under their HF keys (`pooler.dense.*`, `classifier.*`, torch's [out, in] kernels) and
  config.json gets the architecture, `num_labels`/`id2label` and `cls_dropout`.
  """

  backbone = {k: params[k] for k in classifier.BACKBONE_KEYS}
  with _staged(path) as local:
    _write_pretrained(local, model_config, backbone, spm_model, mask_token_id)
    weights = os.path.join(local, SAFETENSORS_FILE)
    state = load_file(weights)
    for torch_name, module in (("pooler.dense", params["pooler"]["dense"]),
                               ("classifier", params["classifier"])):
      state[f"{torch_name}.weight"] = np.ascontiguousarray(
          np.asarray(module["kernel"], np.float32).T)
      state[f"{torch_name}.bias"] = np.ascontiguousarray(np.asarray(module["bias"], np.float32))
    save_file(state, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    config_path = os.path.join(local, CONFIG_FILE)
    with open(config_path) as f:
      config = json.load(f)
    names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(num_labels)]
    config["architectures"] = ["DebertaV2ForSequenceClassification"]
    config["num_labels"] = num_labels
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    if num_labels == 1:
      config["problem_type"] = "regression"
    if cls_dropout is not None:
      config["cls_dropout"] = cls_dropout
    with open(config_path, "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)

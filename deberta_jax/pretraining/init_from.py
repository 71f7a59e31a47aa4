"""Start pre-training from released weights: `config.init.generator` / `config.init.discriminator`.

Continued (domain-adaptive) pre-training is the most asked-for use of the released DeBERTaV3
checkpoints. Each path (local or gs://) is a Hugging Face DebertaV2 directory (model.safetensors
or pytorch_model.bin) or one state-dict file in the official release layout
(`pytorch_model.generator.bin`: `deberta.*` + `lm_predictions.*`, with the EMD's absolute position
table; `pytorch_model.bin`: `deberta.*` + `mask_predictions.*`). A release directory given as the
generator gives its `pytorch_model.generator.bin`: its `pytorch_model.bin` is the discriminator.
The log names the file each network was read from.

Each file must hold the network this run builds: its depth, width and vocabulary (from its tensors)
and, where a config.json describes it, its attention heads. Anything else is a CheckpointError
(exit 2) naming both values; a deeper file is never cut to its first layers.

Embedding sharing decides what the discriminator's word embedding becomes:

  gdes  E_delta = E_D - E_G (and P_delta = P_D - P_G for the position tables), so the
        discriminator at step 0 *is* the released one. (The official code loads the release with
        strict=False into a model whose E_delta is named `_weight`: the released E_D is dropped
        and E_delta starts at zero, i.e. the discriminator starts with the generator's table.)
  nes   the discriminator keeps its own released table.
  es    E_D = E_G by definition: the discriminator file's word table is not used (logged).

A head missing from a file (a backbone-only directory, a generator without its LM head) is
initialised as for a new run and named in one log line; a tensor whose shape does not fit the
configured model, or a vocabulary of another size, is a CheckpointError (exit 2) naming it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from deberta_jax import hf
from deberta_jax.models.rtd import DELTA

HEADS = {"generator": "lm_head", "discriminator": "mask_predictions"}


def _read(path: str, network_config, config, name: str):
  """(flat params, heads, file read) of config.init.<name>, after checking that the file holds a
  network of this run's depth, width, heads and vocabulary: a deeper file would otherwise load
  its first layers and drop the rest without a word."""
  where = f"config.init.{name}={path}"
  checkpoint = hf.read_checkpoint(path, generator=name == "generator")
  if checkpoint.file != path:
    where += f" ({checkpoint.file})"
  found = hf.architecture_of(checkpoint)
  generator_layers = config.model.get("generator_num_layers", 0)
  if name == "generator":
    depth = f"config.model.generator_num_layers={generator_layers}"
    if not generator_layers:
      depth += f" (half of config.model.num_layers={config.model.num_layers})"
  else:
    depth = f"config.model.num_layers={config.model.num_layers}"
  if found.num_layers != network_config.num_layers:
    hint = ""
    if name == "generator" and os.path.basename(checkpoint.file) == hf.TORCH_FILE:
      hint = (f"; a release's {hf.TORCH_FILE} is its discriminator, the generator is "
              f"{hf.GENERATOR_FILE}")
    raise hf.CheckpointError(f"{where}: has {found.num_layers} layers, {depth} wants "
                             f"{network_config.num_layers}{hint}")
  if found.hidden_size != network_config.hidden_size:
    raise hf.CheckpointError(f"{where}: has hidden size {found.hidden_size}, "
                             f"config.model.hidden_size wants {network_config.hidden_size}")
  if found.num_heads is not None and found.num_heads != network_config.num_heads:
    raise hf.CheckpointError(f"{where}: has {found.num_heads} attention heads (its config.json), "
                             f"config.model.num_heads wants {network_config.num_heads}")
  vocab_size = int(config.model.vocab_size)
  if found.vocab_rows != vocab_size:
    raise hf.CheckpointError(
        f"{where}: embeddings.word_embeddings.weight has {found.vocab_rows} rows but "
        f"config.model.vocab_size={vocab_size} (the released models have 128100: use their "
        f"spm.model as config.data.spm_model and config.model.vocab_size=128100)")
  flat, heads, _ = hf.network_from_state(checkpoint.state, network_config.num_layers,
                                         network_config.padded_vocab_size, checkpoint.file)
  return flat, heads, checkpoint.file


def _overlay(target: dict, loaded: dict, name: str, path: str) -> list[str]:
  """Replaces the leaves of `target` (flat) that `loaded` has; returns the keys it lacked."""
  for key, value in loaded.items():
    if key not in target:
      continue
    if target[key].shape != value.shape:
      raise hf.CheckpointError(
          f"config.init.{name}={path}: tensor {'/'.join(key)} has shape {value.shape}, this "
          f"model's is {target[key].shape} (another model size: check config.model)")
    target[key] = value
  return ["/".join(k) for k in target if k not in loaded and k[0] != DELTA]


def initial_params(config, model, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """`params` (host arrays of a fresh init) with the released weights of config.init put in;
  returns (params, notes) where notes are the lines to log."""
  notes = []
  generator = traverse_util.flatten_dict(params["generator"])
  discriminator = traverse_util.flatten_dict(params["discriminator"])
  gen_path, disc_path = config.init.generator, config.init.discriminator
  if gen_path:
    loaded, heads, file = _read(gen_path, model.generator_config, config, "generator")
    missing = _overlay(generator, loaded, "generator", gen_path)
    notes.append(f"generator from {file}" + _missing_note(missing, heads, "lm_head"))
  if disc_path:
    loaded, heads, file = _read(disc_path, model.discriminator_config, config, "discriminator")
    table = loaded.pop(("embeddings", "word_embeddings"))
    positions = loaded.pop(("embeddings", "position_embeddings"), None)
    missing = _overlay(discriminator, loaded, "discriminator", disc_path)
    missing = [m for m in missing if m != "embeddings/word_embeddings"]
    note = f"discriminator from {file}" + _missing_note(missing, heads, "mask_predictions")
    sharing = model.sharing
    if sharing == "gdes":
      discriminator[(DELTA, "word_embeddings")] = table - generator[("embeddings",
                                                                     "word_embeddings")]
      gen_positions = generator.get(("embeddings", "position_embeddings"))
      if positions is not None and gen_positions is not None:
        discriminator[(DELTA, "position_embeddings")] = positions - gen_positions
      note += "; E_delta = E_D - E_G, so the discriminator starts as the released one"
    elif sharing == "nes":
      discriminator[("embeddings", "word_embeddings")] = table
    else:
      note += ("; embedding_sharing='es' uses E_G for both networks: this file's word "
               "embedding is not used")
    notes.append(note)
  out = {"generator": traverse_util.unflatten_dict(generator),
         "discriminator": traverse_util.unflatten_dict(discriminator)}
  return out, notes


def _missing_note(missing: list[str], heads: list[str], head: str) -> str:
  parts = []
  if head not in heads:
    parts.append(f"it has no {head}, which is initialised as for a new run")
  others = [m for m in missing if not m.startswith(head + "/")]
  if others:
    parts.append(f"not in the file, initialised as for a new run: {', '.join(others)}")
  return f" ({'; '.join(parts)})" if parts else ""


def log_notes(notes: list[str]) -> None:
  for note in notes:
    logging.info("Initialised the %s", note)


def host_copy(tree):
  """Every leaf of a tree of (possibly multi-host sharded) arrays, whole, as numpy.

  A leaf sharded over devices of several processes (mesh.fsdp across hosts) has shards this
  process cannot read, so `jax.device_get` refuses it; `process_allgather` assembles it with a
  collective instead, so with several processes every one must call this at the same point.
  """
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def whole(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(whole, tree)


def place(params: dict, shardings: dict) -> dict:
  """Host arrays put on the devices with the given shardings (each host fills its shards)."""
  flat = traverse_util.flatten_dict(params)
  flat_shardings = traverse_util.flatten_dict(shardings)
  placed = {k: jax.make_array_from_callback(v.shape, flat_shardings[k],
                                            lambda index, v=v: v[index])
            for k, v in flat.items()}
  return traverse_util.unflatten_dict(placed)

"""Released weights are loaded only into the network they describe: a release directory given as
the generator gives its pytorch_model.generator.bin (not the discriminator's pytorch_model.bin),
and a file of another depth, width, head count or vocabulary is refused with exit code 2, naming
both values, whether config.json says so or only the tensors do.

The releases are tiny ones made here in the official layout (config.json of the discriminator,
pytorch_model.bin = discriminator + RTD head, pytorch_model.generator.bin = generator + LM head),
from random weights of the tiny config, so no download is needed."""

import json
import os
import shutil

from flax import traverse_util
from flax.linen import meta
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import tiny
from deberta_jax import errors
from deberta_jax import hf
from deberta_jax.hf import CheckpointError
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import init_from
from tests.overrides import apply_overrides

torch = pytest.importorskip("torch")


def _config(**overrides):
  return apply_overrides(tiny.get_config(), overrides)


def _fresh(config):
  model = RTDModel.from_config(config)
  return model, init_from.host_copy(meta.unbox(model.init(jax.random.key(0), 64)))


def _torch_state(path):
  return {k: torch.from_numpy(v.copy()) for k, v in load_file(path).items()}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """{'dir': the release directory, 'bare': the same two files without config.json,
  'generator'/'discriminator': the flat parameters written}. Tiny: 2 discriminator layers, a
  1-layer generator, hidden 64, 4 heads, 2048 rows."""
  root = tmp_path_factory.mktemp("release")
  model, params = _fresh(tiny.get_config())
  params = jax.tree.map(lambda x: x + np.float32(0.01) * np.random.default_rng(1).normal(
      size=x.shape).astype(np.float32), params)  # no table left at its init value
  staging = root / "staging"
  hf.save_pretrained(str(staging / "gen"), model.generator_config, params["generator"])
  hf.save_pretrained(str(staging / "disc"), model.discriminator_config,
                     model.export_discriminator_params(params))
  out = root / "deberta-v3-tiny"
  out.mkdir()
  torch.save(_torch_state(staging / "gen" / "model.safetensors"),
             out / "pytorch_model.generator.bin")
  torch.save(_torch_state(staging / "disc" / "model.safetensors"), out / "pytorch_model.bin")
  shutil.copy(staging / "disc" / "config.json", out / "config.json")
  bare = root / "bare"
  bare.mkdir()
  for name in ("pytorch_model.bin", "pytorch_model.generator.bin"):
    shutil.copy(out / name, bare / name)
  flat = lambda tree: traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))
  return {"dir": str(out), "bare": str(bare), "generator": flat(params["generator"]),
          "discriminator": flat(model.export_discriminator_params(params))}


def test_release_directory_as_generator_reads_the_generator_file(release, caplog):
  config = _config(**{"init.generator": release["dir"], "init.discriminator": release["dir"]})
  model, fresh = _fresh(config)
  params, notes = init_from.initial_params(config, model, fresh)
  generator = traverse_util.flatten_dict(params["generator"])
  discriminator = traverse_util.flatten_dict(params["discriminator"])
  for key in [("encoder", "layer_0", "attention", "query_proj", "kernel"),
              ("embeddings", "position_embeddings"), ("lm_head", "dense", "kernel")]:
    np.testing.assert_array_equal(generator[key], release["generator"][key], err_msg=str(key))
  for key in [("encoder", "layer_0", "attention", "query_proj", "kernel"),
              ("encoder", "layer_1", "output", "kernel"), ("mask_predictions", "dense", "kernel")]:
    np.testing.assert_array_equal(discriminator[key], release["discriminator"][key],
                                  err_msg=str(key))
  # GDES: the discriminator starts as released, E_G + E_delta = E_D.
  np.testing.assert_allclose(
      generator[("embeddings", "word_embeddings")] +
      discriminator[("gdes_delta", "word_embeddings")],
      release["discriminator"][("embeddings", "word_embeddings")], atol=1e-6)
  generator_file = os.path.join(release["dir"], "pytorch_model.generator.bin")
  assert notes[0].startswith(f"generator from {generator_file}"), notes
  assert notes[1].startswith(
      f"discriminator from {os.path.join(release['dir'], 'pytorch_model.bin')}"), notes
  with caplog.at_level("INFO"):
    init_from.log_notes(notes)
  assert f"generator from {generator_file}" in caplog.text


def _refused(config, match):
  """initial_params refuses config.init with a CheckpointError matching `match`, which an entry
  point turns into one line and exit code 2."""
  model, fresh = _fresh(config)
  with pytest.raises(CheckpointError, match=match) as raised:
    init_from.initial_params(config, model, fresh)
  assert isinstance(raised.value, errors.BadInput) and raised.value.exit_code == 2
  return str(raised.value)


def test_a_deeper_file_is_refused_naming_both_depths(release, capsys):
  # The discriminator file given as the generator: config.json beside it and tensors say 2.
  disc_file = os.path.join(release["dir"], "pytorch_model.bin")
  message = _refused(_config(**{"init.generator": disc_file}),
                     r"has 2 layers, config.model.generator_num_layers=0 \(half of "
                     r"config.model.num_layers=2\) wants 1")
  assert "pytorch_model.generator.bin" in message  # the hint: where the generator is
  # No config.json: the depth comes from the tensors (encoder.layer.N).
  _refused(_config(**{"model.num_layers": 1,
                      "init.discriminator": os.path.join(release["bare"], "pytorch_model.bin")}),
           "has 2 layers, config.model.num_layers=1 wants 1")
  _refused(_config(**{"model.generator_num_layers": 2, "init.generator": release["bare"]}),
           "has 1 layers, config.model.generator_num_layers=2 wants 2")
  # The entry point's form: one line on stderr, exit code 2.
  config = _config(**{"model.num_layers": 1, "init.discriminator": release["dir"]})
  model, fresh = _fresh(config)
  with pytest.raises(SystemExit) as exited, errors.exit_on_error():
    init_from.initial_params(config, model, fresh)
  assert exited.value.code == 2
  assert "has 2 layers, config.model.num_layers=1 wants 1" in capsys.readouterr().err


def test_width_heads_and_vocabulary_are_checked(release):
  _refused(_config(**{"model.hidden_size": 32, "init.generator": release["bare"]}),
           "has hidden size 64, config.model.hidden_size wants 32")
  _refused(_config(**{"model.num_heads": 2, "init.discriminator": release["dir"]}),
           r"has 4 attention heads \(its config.json\), config.model.num_heads wants 2")
  _refused(_config(**{"model.vocab_size": 4096, "init.discriminator": release["dir"]}),
           "has 2048 rows but config.model.vocab_size=4096")
  # Without config.json the head count cannot be told from the tensors: the file loads.
  config = _config(**{"model.num_heads": 2, "init.discriminator": release["bare"]})
  model, fresh = _fresh(config)
  _, notes = init_from.initial_params(config, model, fresh)
  assert notes[0].startswith("discriminator from ")


def test_hf_directory_whose_config_does_not_describe_its_weights_is_refused(release, tmp_path):
  path = tmp_path / "hf"
  shutil.copytree(release["dir"], path)
  with open(path / "config.json") as f:
    config = json.load(f)
  hf_config, _ = hf.load_pretrained(str(path))
  assert hf_config.num_layers == 2
  config["num_hidden_layers"] = 1
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="config.json says num_hidden_layers=1 but the "
                                            "weights have 2 layers"):
    hf.load_pretrained(str(path))
  # network_from_state itself refuses a state of another depth.
  state = hf.read_state(str(path / "pytorch_model.bin"))
  with pytest.raises(CheckpointError, match="has 2 encoder layers, the model being loaded has 1"):
    hf.network_from_state(state, 1, 2048, "state")

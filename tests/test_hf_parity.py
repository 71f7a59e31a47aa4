"""Numerical parity with transformers' DebertaV2 (PyTorch, CPU) and checkpoint interchange.

The reference is built with random weights in the exact v3 configuration, written with
transformers' own save_pretrained, read with ours, and compared on non-pad positions (transformers
>= 4.4x turns pad query rows into uniform attention, the official code zeroes them).
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from deberta_jax import hf  # pylint: disable=g-import-not-at-top
from deberta_jax.models import DebertaEncoder, Discriminator, Generator  # pylint: disable=g-import-not-at-top

V3 = dict(relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
          type_vocab_size=0, max_relative_positions=-1, layer_norm_eps=1e-7, hidden_act="gelu",
          max_position_embeddings=512)


def _reference(tmp_path_factory, **sizes):
  torch.manual_seed(0)
  config = transformers.DebertaV2Config(**{**V3, **sizes})
  model = transformers.DebertaV2Model(config).eval()
  with torch.no_grad():  # HF zero-initialises some tables; give every weight a real value
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  path = str(tmp_path_factory.mktemp("hf_ref"))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _reference(tmp_path_factory, vocab_size=300, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128)


def _batch(length, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, vocab, size=(3, length)).astype(np.int32)
  mask = np.ones((3, length), np.int32)
  mask[1, length // 2:] = 0  # padding in the batch
  mask[2, max(1, length - 3):] = 0
  ids[mask == 0] = 0
  return ids, mask


def _torch_hidden(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.last_hidden_state.numpy()


def _max_diff_non_pad(a, b, mask):
  sel = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(a, np.float32)[sel] - np.asarray(b, np.float32)[sel])))


@pytest.mark.parametrize("impl", ["gather", "skew", "flash"])
@pytest.mark.parametrize("length", [8, 130, 512])
def test_float32_parity(reference, length, impl):
  model, path = reference
  config, params = hf.load_pretrained(path)
  config = config.replace(attention_impl=impl)
  ids, mask = _batch(length, config.vocab_size)
  ours = DebertaEncoder(config).apply({"params": params}, ids, mask, deterministic=True)
  chex.assert_shape(ours, (3, length, config.hidden_size))
  chex.assert_type(ours, jnp.float32)
  diff = _max_diff_non_pad(ours, _torch_hidden(model, ids, mask), mask)
  print(f"parity float32 impl={impl} L={length}: max|diff|={diff:.3e}")
  assert diff <= 1e-5


@pytest.mark.parametrize("impl", ["gather", "skew", "flash"])
@pytest.mark.parametrize("length", [8, 130, 512])
def test_bfloat16_close_to_float32(reference, length, impl):
  _, path = reference
  config, params = hf.load_pretrained(path)
  config = config.replace(attention_impl=impl)
  ids, mask = _batch(length, config.vocab_size, seed=1)
  f32 = DebertaEncoder(config).apply({"params": params}, ids, mask)
  bf16 = DebertaEncoder(config.replace(dtype="bfloat16")).apply({"params": params}, ids, mask)
  chex.assert_type(bf16, jnp.bfloat16)
  sel = mask.astype(bool)
  a, b = np.asarray(f32)[sel], np.asarray(bf16, np.float32)[sel]
  rel = float(np.linalg.norm(a - b) / np.linalg.norm(a))
  print(f"bfloat16 vs float32 impl={impl} L={length}: relative error {rel:.3e}, max|diff| "
        f"{np.max(np.abs(a - b)):.3e}")
  assert rel <= 2e-2


def test_save_pretrained_loads_in_transformers(reference, tmp_path):
  model, path = reference
  config, params = hf.load_pretrained(path)
  out = str(tmp_path / "ours")
  hf.save_pretrained(out, config, params)
  reloaded, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"], info
  assert not info["unexpected_keys"], info
  ids, mask = _batch(40, config.vocab_size, seed=2)
  ours = DebertaEncoder(config).apply({"params": params}, ids, mask)
  assert _max_diff_non_pad(ours, _torch_hidden(reloaded.eval(), ids, mask), mask) <= 1e-5
  assert _max_diff_non_pad(_torch_hidden(model, ids, mask),
                           _torch_hidden(reloaded.eval(), ids, mask), mask) == 0.0


def test_generator_round_trip_through_masked_lm(tmp_path):
  """Our generator (EMD, tied LM head) -> save -> DebertaV2ForMaskedLM loads it -> load back."""
  from deberta_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  from flax.linen import meta  # pylint: disable=g-import-not-at-top
  config = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2,
                       intermediate_size=64, position_table=True)
  ids, mask = _batch(16, config.vocab_size, seed=3)
  params = meta.unbox(Generator(config).init(jax.random.key(0), ids, mask)["params"])
  out = str(tmp_path / "gen")
  hf.save_pretrained(out, config, params)
  mlm, info = transformers.DebertaV2ForMaskedLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  # HF has no EMD: compare what both compute, the backbone and the head on the backbone output.
  with torch.no_grad():
    logits = mlm.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  hidden = DebertaEncoder(config).apply({"params": params}, ids, mask)
  from deberta_jax.models.heads import LMHead  # pylint: disable=g-import-not-at-top
  ours = LMHead(config).apply({"params": params["lm_head"]}, hidden,
                              params["embeddings"]["word_embeddings"])
  assert _max_diff_non_pad(np.asarray(ours)[..., :config.vocab_size], logits, mask) <= 1e-4
  config2, params2 = hf.load_pretrained(out)
  assert config2.position_table
  chex.assert_trees_all_close(params2, jax.tree.map(np.asarray, params), atol=0, rtol=0)


def test_rtd_head_round_trip(tmp_path):
  from deberta_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  from flax.linen import meta  # pylint: disable=g-import-not-at-top
  config = ModelConfig(vocab_size=200, hidden_size=32, num_layers=1, num_heads=2,
                       intermediate_size=64, position_table=False)
  ids, mask = _batch(12, config.vocab_size, seed=4)
  params = meta.unbox(Discriminator(config).init(jax.random.key(1), ids, mask)["params"])
  hf.save_pretrained(str(tmp_path), config, params)
  config2, params2 = hf.load_pretrained(str(tmp_path))
  a = Discriminator(config).apply({"params": params}, ids, mask)
  b = Discriminator(config2).apply({"params": params2}, ids, mask)
  chex.assert_trees_all_close(a, b, atol=0, rtol=0)


def test_refuses_non_v3_config(tmp_path):
  config = dict(model_type="deberta-v2", relative_attention=False, vocab_size=10, hidden_size=8,
                num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf.CheckpointError, match="relative_attention"):
    hf.load_pretrained(str(tmp_path))


def test_corrupt_weights_are_named(reference, tmp_path):
  _, path = reference
  for name in os.listdir(path):
    data = open(os.path.join(path, name), "rb").read()
    (tmp_path / name).write_bytes(data[: len(data) // 2] if name.endswith("safetensors") else data)
  with pytest.raises(hf.CheckpointError, match="cannot read"):
    hf.load_pretrained(str(tmp_path))

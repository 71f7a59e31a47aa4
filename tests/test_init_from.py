"""Continued pre-training from released weights (config.init.*), on a release-layout pair built
here from random weights with transformers: `pytorch_model.generator.bin` (DebertaV2ForMaskedLM,
plus the EMD's absolute position table the official code always saves) and `pytorch_model.bin`
(DebertaV2Model + the official RTD head).

Started from and exported with zero effective training (one step at learning rate 0, the
warmup's first value), the export equals the inputs; the step-0 held-out RTD loss equals a
transformers forward of the released discriminator on the same replaced batch."""

import json
import os

from flax.linen import meta
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import tiny
from deberta_jax import export
from deberta_jax import hf
from deberta_jax.data import pipeline as pipeline_lib
from deberta_jax.hf import CheckpointError
from deberta_jax.models.rtd import RTDModel
from deberta_jax.pretraining import evaluation
from deberta_jax.pretraining import init_from
from deberta_jax.pretraining import train
from deberta_jax.pretraining import train_step as ts
from tests.overrides import apply_overrides

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _config(cache_dir, **overrides):
  c = tiny.get_config()
  c.data.cache_dir = cache_dir
  c.mesh.num_devices = 1
  base = {"num_train_steps": 1, "optim.warmup_steps": 10, "eval.every_steps": 1,
          "eval.num_batches": 2, "ckpt.async_save": False, "log.every_steps": 1}
  return apply_overrides(c, {**base, **overrides})


def _random_state(shape, scale=0.02):
  return torch.randn(*shape) * scale


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """(directory, generator state, discriminator state) in the official release layout."""
  root = tmp_path_factory.mktemp("release")
  model = RTDModel.from_config(tiny.get_config())
  torch.manual_seed(0)
  gen_cfg = transformers.DebertaV2Config(
      **hf.config_to_hf(model.generator_config, "DebertaV2ForMaskedLM"))
  generator = transformers.DebertaV2ForMaskedLM(gen_cfg).eval()
  gen_state = {k: v.detach().clone() for k, v in generator.state_dict().items()}
  hidden = gen_cfg.hidden_size
  gen_state["deberta.embeddings.position_embeddings.weight"] = _random_state((512, hidden))
  torch.save(gen_state, root / "pytorch_model.generator.bin")
  disc_cfg = transformers.DebertaV2Config(
      **hf.config_to_hf(model.discriminator_config, "DebertaV2Model"))
  backbone = transformers.DebertaV2Model(disc_cfg).eval()
  disc_state = {f"deberta.{k}": v.detach().clone() for k, v in backbone.state_dict().items()}
  disc_state.update({
      "deberta.embeddings.position_embeddings.weight": _random_state((512, hidden)),
      "mask_predictions.dense.weight": _random_state((hidden, hidden)),
      "mask_predictions.dense.bias": _random_state((hidden,)),
      "mask_predictions.LayerNorm.weight": 1 + _random_state((hidden,)),
      "mask_predictions.LayerNorm.bias": _random_state((hidden,)),
      "mask_predictions.classifier.weight": _random_state((1, hidden), 0.5),
      "mask_predictions.classifier.bias": _random_state((1,)),
  })
  torch.save(disc_state, root / "pytorch_model.bin")
  return root, gen_state, disc_state, disc_cfg


def _rtd_loss_torch(disc_cfg, disc_state, replaced, is_replaced, attention) -> float:
  """The released discriminator in transformers + the official RTD head in torch ops."""
  backbone = transformers.DebertaV2Model(disc_cfg).eval()
  backbone.load_state_dict({k[len("deberta."):]: v for k, v in disc_state.items()
                            if k.startswith("deberta.") and "position_embeddings" not in k})
  with torch.no_grad():
    h = backbone(torch.tensor(replaced), attention_mask=torch.tensor(attention))[0]
    u = torch.nn.functional.layer_norm(
        h + h[:, :1], (h.shape[-1],), disc_state["mask_predictions.LayerNorm.weight"],
        disc_state["mask_predictions.LayerNorm.bias"], eps=disc_cfg.layer_norm_eps)
    u = torch.nn.functional.gelu(u @ disc_state["mask_predictions.dense.weight"].T
                                 + disc_state["mask_predictions.dense.bias"])
    logits = (u @ disc_state["mask_predictions.classifier.weight"].T
              + disc_state["mask_predictions.classifier.bias"])[..., 0]
    losses = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.as_tensor(is_replaced, dtype=torch.float32), reduction="none")
    weights = torch.as_tensor(attention, dtype=torch.float32)
  return float((losses * weights).sum()), float(weights.sum())


@pytest.mark.slow
def test_start_from_release_then_export_equals_the_release(cache_dir, tmp_path, release):
  root, gen_state, disc_state, disc_cfg = release
  config = _config(cache_dir, **{"init.generator": str(root / "pytorch_model.generator.bin"),
                                 "init.discriminator": str(root / "pytorch_model.bin")})
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert records[0]["step"] == 0 and records[1]["learning_rate"] == 0.0
  paths = export.export(workdir, str(tmp_path / "hf"))
  for name, state in (("generator", gen_state), ("discriminator", disc_state)):
    exported = load_file(os.path.join(paths[name], "model.safetensors"))
    worst = max(float(np.abs(exported[k] - v.numpy()).max()) for k, v in state.items())
    assert set(state) <= set(exported), sorted(set(state) - set(exported))
    print(f"{name}: {len(state)} tensors, max |export - release| = {worst:.2e}")
    assert worst <= 1e-6, name

  # Step-0 evaluation = transformers on the same replaced batches (the RTD loss over all
  # non-pad tokens of the held-out batches).
  model = RTDModel.from_config(config)
  pipeline = pipeline_lib.make_pipeline(config)
  tok = pipeline.tokenizer
  tokens = ts.SpecialTokens.of(tok)
  host = init_from.host_copy(meta.unbox(model.init(jax.random.key(0), config.seq_len)))
  params, _ = init_from.initial_params(config, model, host)
  total, count = 0.0, 0.0
  for i in range(config.eval.num_batches):
    batch = evaluation.held_out_batch(pipeline, i, config.global_batch_size)
    _, _, replaced, is_replaced = evaluation.corrupt(
        model, config, tokens, params, batch, evaluation.eval_key(config.seed))
    s, n = _rtd_loss_torch(disc_cfg, disc_state, np.asarray(replaced), np.asarray(is_replaced),
                           batch["attention_mask"])
    total, count = total + s, count + n
  print(f"step-0 eval_rtd_loss {records[0]['eval_rtd_loss']:.7f}, transformers "
        f"{total / count:.7f}")
  np.testing.assert_allclose(records[0]["eval_rtd_loss"], total / count, rtol=1e-5)


def test_wrong_vocabulary_and_shapes_are_named(cache_dir, tmp_path, release):
  root, gen_state, _, _ = release
  model = RTDModel.from_config(_config(cache_dir))
  host = init_from.host_copy(meta.unbox(model.init(jax.random.key(0), 64)))
  other_vocab = _config(cache_dir, **{"model.vocab_size": 4096,
                                      "init.generator": str(root / "pytorch_model.generator.bin")})
  with pytest.raises(CheckpointError, match="2048 rows but config.model.vocab_size=4096"):
    init_from.initial_params(other_vocab, RTDModel.from_config(other_vocab), host)
  wider = dict(gen_state)
  wider["deberta.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(512, 64)
  torch.save(wider, tmp_path / "wide.bin")
  config = _config(cache_dir, **{"init.generator": str(tmp_path / "wide.bin")})
  with pytest.raises(CheckpointError, match="encoder/layer_0/intermediate/kernel"):
    init_from.initial_params(config, model, host)
  # A backbone-only generator (no LM head): the head is initialised and named, not an error.
  backbone = {k: v for k, v in gen_state.items() if k.startswith("deberta.")}
  torch.save(backbone, tmp_path / "backbone.bin")
  config = _config(cache_dir, **{"init.generator": str(tmp_path / "backbone.bin")})
  _, notes = init_from.initial_params(config, model, host)
  assert "has no lm_head" in notes[0]

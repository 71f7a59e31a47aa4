"""RTD pieces: masking statistics, sampling, embedding-sharing gradients, accumulation, optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax.linen import meta

from configs import tiny
from deberta_jax import config as config_lib
from deberta_jax.pretraining import masking
from deberta_jax.pretraining import optim
from deberta_jax.pretraining import train_step as ts
from deberta_jax.models.rtd import DELTA, RTDModel
from tests.overrides import apply_overrides

TOKENS = ts.SpecialTokens(pad_id=0, cls_id=1, sep_id=2, unk_id=3, mask_id=2000)


def _config(sharing="gdes", **overrides):
  """configs/tiny.py at seq 32 x 8, with dropout on (tiny trains without) so that the tests
  here cover the dropout paths."""
  c = tiny.get_config()
  c.model.embedding_sharing = sharing
  c.model.hidden_dropout = c.model.attention_dropout = 0.1
  c.seq_len = 32
  c.global_batch_size = 8
  return apply_overrides(c, overrides)


def _batch(batch=8, length=32, seed=0, pad_from=None):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, 2000, size=(batch, length)).astype(np.int32)
  ids[:, 0] = TOKENS.cls_id
  mask = np.ones_like(ids)
  if pad_from:
    mask[1, pad_from:] = 0
    ids[1, pad_from:] = 0
  ids[np.arange(batch), mask.sum(1) - 1] = TOKENS.sep_id
  ids[2, 5] = TOKENS.unk_id
  return {"input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------------- masking

@pytest.mark.parametrize("jit", [True, False])
def test_masking_rate_and_special_tokens(jit):
  batch = _batch(batch=64, length=128, pad_from=70)
  fn = lambda k, i, m: masking.mask_tokens(k, i, m, TOKENS.never_masked, TOKENS.mask_id, 0.15)
  fn = jax.jit(fn) if jit else fn
  out = jax.tree.map(np.asarray, fn(jax.random.key(1), batch["input_ids"],
                                    batch["attention_mask"]))
  ids, mask = batch["input_ids"], batch["attention_mask"]
  candidates = (mask == 1) & ~np.isin(ids, TOKENS.never_masked)
  selected = out.input_ids == TOKENS.mask_id
  # Exactly round(15%) of each row's candidates, never a special or pad token.
  np.testing.assert_array_equal(selected.sum(1), np.round(0.15 * candidates.sum(1)))
  assert not np.any(selected & ~candidates)
  assert abs(selected.sum() / candidates.sum() - 0.15) < 0.005
  # Labels are the original ids at the listed positions; weights mark the used slots.
  rows = np.arange(ids.shape[0])[:, None]
  np.testing.assert_array_equal(out.labels, ids[rows, out.positions])
  used = out.weights > 0
  assert np.all(selected[rows, out.positions] | ~used)
  np.testing.assert_array_equal(used.sum(1), selected.sum(1))
  chex.assert_shape(out.positions, (64, masking.max_predictions(128, 0.15)))


def test_masking_is_uniform_over_positions():
  batch = _batch(batch=512, length=40, seed=3)
  out = masking.mask_tokens(jax.random.key(0), batch["input_ids"], batch["attention_mask"],
                            TOKENS.never_masked, TOKENS.mask_id, 0.15)
  freq = (np.asarray(out.input_ids) == TOKENS.mask_id)[:, 3:-3].mean(0)
  assert freq.min() > 0.09 and freq.max() < 0.21, freq


def test_replacement_labels_only_where_sample_differs():
  ids = jnp.array([[1, 10, 11, 12, 2]], jnp.int32)
  positions = jnp.array([[1, 3]], jnp.int32)
  weights = jnp.array([[1.0, 1.0]])
  replaced, is_replaced = masking.replace_tokens(ids, positions, weights, jnp.array([[10, 99]]))
  np.testing.assert_array_equal(replaced, [[1, 10, 11, 99, 2]])
  np.testing.assert_array_equal(is_replaced, [[False, False, False, True, False]])


def test_sampling_never_draws_padded_vocabulary_rows():
  logits = jnp.zeros((4, 2048)).at[:, 2001:].set(jnp.finfo(jnp.float32).min)
  samples = masking.sample_replacements(jax.random.key(0), logits, 1.0)
  assert int(samples.max()) <= 2000


# ------------------------------------------------------------------------ embedding sharing

def _state(sharing):
  config = _config(sharing, **{"model.hidden_dropout": 0.0, "model.attention_dropout": 0.0})
  model = RTDModel.from_config(config)
  params = meta.unbox(model.init(jax.random.key(0), config.seq_len))
  return config, model, params


def _rtd_grads(model, params, batch, sampled_pads=0):
  """Gradient of the RTD loss; the first `sampled_pads` samples are [PAD] (id 0)."""
  masked = masking.mask_tokens(jax.random.key(2), batch["input_ids"], batch["attention_mask"],
                               TOKENS.never_masked, TOKENS.mask_id, 0.15)
  sampled = jax.random.randint(jax.random.key(3), masked.labels.shape, 4, 2000)
  sampled = sampled.at[:, :sampled_pads].set(TOKENS.pad_id)
  replaced, is_replaced = masking.replace_tokens(batch["input_ids"], masked.positions,
                                                 masked.weights, sampled)
  if sampled_pads:  # real (unmasked) positions that now hold [PAD]
    assert np.sum((np.asarray(replaced) == TOKENS.pad_id) & (batch["attention_mask"] == 1)) > 0
  loss = lambda p: ts.rtd_loss(model, p, replaced, is_replaced, batch["attention_mask"],
                               jax.random.key(4), 100.0, 50.0, deterministic=True)[0]
  return jax.grad(loss)(params)


# The table each mode's discriminator reads its word embedding from.
DISCRIMINATOR_TABLE = {"gdes": ("discriminator", DELTA, "word_embeddings"),
                       "es": ("generator", "embeddings", "word_embeddings"),
                       "nes": ("discriminator", "embeddings", "word_embeddings")}


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_sampled_pad_replacements_leave_the_pad_row_untrained(sharing):
  """As the official embedding's padding_idx: a [PAD] drawn as a replacement is looked up but its
  row gets no gradient (E_delta, E_G or E_D), while the other replaced rows do."""
  _, model, params = _state(sharing)
  grads = _rtd_grads(model, params, _batch(), sampled_pads=2)
  table = grads
  for key in DISCRIMINATOR_TABLE[sharing]:
    table = table[key]
  table = np.asarray(table)
  np.testing.assert_array_equal(table[TOKENS.pad_id], 0.0)
  assert np.count_nonzero(np.abs(table).sum(axis=1)) > 10


def test_pad_lookup_passes_no_gradient():
  """The lookup every table goes through (E_G in the generator, E_D, and E_G + E_delta)."""
  from deberta_jax.models.encoder import lookup  # pylint: disable=import-outside-toplevel
  table = jax.random.normal(jax.random.key(0), (6, 3))
  ids = jnp.array([[1, 0, 2], [0, 5, 0]])
  rows, pullback = jax.vjp(lambda t: lookup(t, ids, 0), table)
  chex.assert_trees_all_equal(rows, table[ids])  # the forward still reads the [PAD] row
  (grad,) = pullback(jnp.ones_like(rows))
  np.testing.assert_array_equal(grad[0], 0.0)
  np.testing.assert_array_equal(np.asarray(grad)[[1, 2, 5]], 1.0)


def _nonzero(tree):
  return {"/".join(k): bool(np.any(np.asarray(v) != 0))
          for k, v in traverse_util.flatten_dict(tree).items()}


def test_gdes_rtd_gradient_reaches_delta_not_generator():
  _, model, params = _state("gdes")
  grads = _rtd_grads(model, params, _batch())
  gen = _nonzero(grads["generator"])
  assert not any(gen.values()), [k for k, v in gen.items() if v]
  assert _nonzero(grads["discriminator"])[f"{DELTA}/word_embeddings"]
  np.testing.assert_array_equal(grads["generator"]["embeddings"]["word_embeddings"], 0.0)
  # E_delta starts at zero, so E_D = E_G at initialisation.
  np.testing.assert_array_equal(params["discriminator"][DELTA]["word_embeddings"], 0.0)
  assert "word_embeddings" not in params["discriminator"]["embeddings"]


def test_es_rtd_gradient_reaches_the_shared_embedding_only():
  _, model, params = _state("es")
  gen = _nonzero(_rtd_grads(model, params, _batch())["generator"])
  assert gen.pop("embeddings/word_embeddings")
  assert not any(gen.values()), [k for k, v in gen.items() if v]


def test_nes_embeddings_are_independent():
  _, model, params = _state("nes")
  grads = _rtd_grads(model, params, _batch())
  assert not any(_nonzero(grads["generator"]).values())
  assert _nonzero(grads["discriminator"])["embeddings/word_embeddings"]
  assert not jnp.array_equal(params["generator"]["embeddings"]["word_embeddings"],
                             params["discriminator"]["embeddings"]["word_embeddings"])


@pytest.mark.parametrize("sharing", ["gdes", "es", "nes"])
def test_mlm_gradient_never_reaches_the_discriminator(sharing):
  _, model, params = _state(sharing)
  batch = _batch()
  masked = masking.mask_tokens(jax.random.key(2), batch["input_ids"], batch["attention_mask"],
                               TOKENS.never_masked, TOKENS.mask_id, 0.15)

  def loss(p):
    return ts.mlm_loss(model, p["generator"], masked.input_ids, batch["attention_mask"],
                       masked.positions, masked.labels, masked.weights, None, 10.0, True)[0]
  grads = jax.grad(loss)(params)
  assert not any(_nonzero(grads["discriminator"]).values())
  assert _nonzero(grads["generator"])["embeddings/word_embeddings"]


def test_gdes_discriminator_update_uses_the_updated_generator_embedding():
  """Two-stage: after one step E_D = E_G(new) + E_delta(new), and E_delta moved."""
  config = _config("gdes")
  model = RTDModel.from_config(config)
  optimizers = ts.make_optimizers(config)
  state = meta.unbox(ts.init_state(model, optimizers, config, jax.random.key(0)))
  step = jax.jit(ts.make_train_step(model, optimizers, config, TOKENS, 1))
  new, metrics = step(state, _batch())  # the first update has learning rate 0 (warmup)
  new, metrics = step(new, _batch(seed=1))
  # first_nonfinite_step is +inf by design when the step was finite.
  assert float(metrics.pop("first_nonfinite_step")) == float("inf")
  assert float(metrics.pop("skipped")) == 0.0
  chex.assert_tree_all_finite(metrics)
  delta = new.params["discriminator"][DELTA]["word_embeddings"]
  assert float(jnp.abs(delta).max()) > 0
  gen_table = new.params["generator"]["embeddings"]["word_embeddings"]
  assert not jnp.array_equal(gen_table, state.params["generator"]["embeddings"]["word_embeddings"])
  exported = model.export_discriminator_params(new.params)["embeddings"]["word_embeddings"]
  np.testing.assert_allclose(exported, gen_table + delta, rtol=0, atol=0)


# ------------------------------------------------------------------------------ accumulation

@pytest.mark.parametrize("sharing", ["gdes", "es"])
def test_gradient_accumulation_equals_one_batch(sharing):
  """With every dropout on (0.1): 1 and 4 micro-batches give the same step, since a row's
  dropout masks follow its global row, not its place in a micro-batch (of the 4, micro-batch i
  holds rows i and i+4: every row moves, and the padded row 1 shares a micro-batch with row 5)."""
  config = _config(sharing)
  assert config.model.hidden_dropout > 0 and config.model.attention_dropout > 0
  model = RTDModel.from_config(config)
  optimizers = ts.make_optimizers(config)
  state = meta.unbox(ts.init_state(model, optimizers, config, jax.random.key(0)))
  batch = _batch(pad_from=20)
  one, m1 = jax.jit(ts.make_train_step(model, optimizers, config, TOKENS, 1))(state, batch)
  many, m = jax.jit(ts.make_train_step(model, optimizers, config, TOKENS, 4))(state, batch)
  chex.assert_trees_all_close(m1, m, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(one.params, many.params, rtol=1e-5, atol=1e-6)


def test_micro_batches_draw_different_dropout_masks():
  """Eight copies of one sequence through the discriminator with dropout on, run as the step
  runs 4 micro-batches (micro-batch i = rows i, i+4): all eight outputs differ (each row has its
  own masks), and put back in order they are the one-batch output."""
  config = _config("nes")
  model = RTDModel.from_config(config)
  params = meta.unbox(model.init(jax.random.key(0), config.seq_len))
  batch = _batch()
  ids = np.repeat(batch["input_ids"][:1], 8, axis=0)
  mask = np.ones_like(ids)
  key = jax.random.key(5)
  logits = jax.jit(lambda i, m, rows: model.discriminator_logits(params, i, m, key, False, rows))
  whole = np.asarray(logits(ids, mask, ts.micro_rows(0, 1)))
  micro = [np.asarray(logits(ids[i::4], mask[i::4], ts.micro_rows(i, 4))) for i in range(4)]
  merged = np.asarray(ts.merge_micro(jnp.stack(micro)))
  np.testing.assert_allclose(merged, whole, rtol=1e-6, atol=1e-6)
  distinct = {tuple(np.round(row, 4)) for row in merged}
  assert len(distinct) == 8, f"{len(distinct)} different dropout draws for 8 rows"
  deterministic = np.asarray(model.discriminator_logits(params, ids, mask, key, True))
  assert np.all(deterministic == deterministic[:1])  # the rows differ only by their masks


# --------------------------------------------------------------------------------- optimizer

def test_learning_rate_schedule_warmup_then_linear_decay():
  schedule = optim.learning_rate_schedule(1e-3, 10, 110)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10, 60, 110)],
                             [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_weight_decay_mask_excludes_biases_and_layer_norms():
  _, _, params = _state("gdes")
  mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(optim.decay_mask(params)).items()}
  assert mask["generator/encoder/layer_0/attention/query_proj/kernel"]
  assert not mask["generator/encoder/layer_0/attention/query_proj/bias"]
  assert not mask["generator/encoder/layer_0/output_LayerNorm/scale"]
  assert not mask["discriminator/embeddings/LayerNorm/bias"]
  assert mask[f"discriminator/{DELTA}/word_embeddings"]
  assert mask["generator/encoder/rel_embeddings"]


def test_two_stage_has_separate_optimizer_states():
  assert set(ts.make_optimizers(_config("gdes"))) == {"generator", "discriminator"}
  assert set(ts.make_optimizers(_config("es"))) == {"joint"}
  assert set(ts.make_optimizers(_config("nes", **{"rtd.update_mode": "joint"}))) == {"joint"}


# ------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("field,value,needle", [
    ("model.num_heads", 3, "model.num_heads"),
    ("model.embedding_sharing", "shared", "model.embedding_sharing"),
    ("rtd.mask_prob", 1.5, "rtd.mask_prob"),
    ("optim.warmup_steps", -1, "optim.warmup_steps"),
    ("seq_len", 1024, "seq_len"),
    ("data.source", "web", "data.source"),
    ("model.dtype", "float16", "loss scaling"),
    ("dry_run_devices", 8, "config.dry_run"),
    ("eval.num_batches", -1, "eval.num_batches"),
])
def test_config_validation_names_the_field(field, value, needle):
  with pytest.raises(config_lib.ConfigError, match=needle.replace(".", r"\.")):
    config_lib.validate(_config(**{field: value}))


@pytest.mark.parametrize("source,field,value", [
    ("embedded", "text_files", "/data/*.txt"),
    ("embedded", "split_on_blank_lines", True),
    ("text_files", "tfds_name", "wikipedia/20230601.en"),
    ("text_files", "tfds_data_dir", "/data/tfds"),
    ("tfds", "embedded_max_bytes", 1000),
    ("tfds", "text_files", "/data/*.txt"),
    ("jsonl", "parquet_files", "/data/*.parquet"),
    ("text_files", "text_field", "body"),
    ("prepared", "text_files", "/data/*.txt"),
    ("embedded", "prepared_dir", "/data/prepared"),
])
def test_a_data_field_the_source_does_not_read_is_refused(source, field, value):
  """One line naming both fields: the run must never train on another corpus than the named one."""
  overrides = {"data.source": source, f"data.{field}": value}
  if source == "text_files":
    overrides["data.text_files"] = "/data/*.txt"
  if source == "tfds":
    overrides["data.tfds_name"] = "wikipedia/20230601.en"
  if source == "jsonl":
    overrides["data.jsonl_files"] = "/data/*.jsonl"
  if source == "prepared":
    overrides["data.prepared_dir"] = "/data/prepared"
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(_config(**overrides))
  message = str(error.value)
  assert message.startswith(f"config.data.{field}:") and f"config.data.source={source!r}" in message
  assert "\n" not in message


def test_each_source_accepts_its_own_fields():
  config_lib.validate(_config(**{"data.source": "text_files", "data.text_files": "/d/*.txt",
                                 "data.split_on_blank_lines": True}))
  config_lib.validate(_config(**{"data.source": "tfds", "data.tfds_name": "c4/en",
                                 "data.tfds_split": "validation", "data.tfds_data_dir": "/t"}))
  config_lib.validate(_config(**{"data.embedded_max_bytes": 1000}))
  for source in ("jsonl", "parquet"):
    config_lib.validate(_config(**{"data.source": source, f"data.{source}_files": "/d/*",
                                   "data.text_field": "body"}))
  config_lib.validate(_config(**{"data.source": "prepared", "data.prepared_dir": "gs://b/p"}))


def test_source_fields_unset_values_are_the_config_defaults():
  from configs import common  # pylint: disable=import-outside-toplevel
  data = common.base_config().data
  for fields in config_lib.SOURCE_FIELDS.values():
    for field, unset in fields.items():
      assert data[field] == unset, field
  every = {f for fields in config_lib.SOURCE_FIELDS.values() for f in fields}
  shared = {"source", "spm_model", "spm_vocab_size", "spm_max_sentences", "cache_dir",
            "part_mb", "read_threads", "prefetch_batches",
            "prepare_wait_minutes", "read_block_rows", "shuffle_window_blocks",
            "read_connections", "read_retry_minutes"}  # every source
  assert set(data.keys()) == every | shared


def test_discriminator_learning_rate_needs_two_optimizers():
  config_lib.validate(_config("gdes", **{"optim.discriminator_learning_rate": 1e-4}))
  with pytest.raises(config_lib.ConfigError, match=r"optim\.discriminator_learning_rate"):
    config_lib.validate(_config("es", **{"optim.discriminator_learning_rate": 1e-4}))


def test_warmup_longer_than_the_run_is_allowed_with_one_warning():
  config = _config(**{"num_train_steps": 20, "optim.warmup_steps": 30})
  config_lib.validate(config)
  notes = config_lib.warnings(config)
  assert len(notes) == 1 and "optim.warmup_steps=30" in notes[0] and "67%" in notes[0]
  assert config_lib.warnings(_config()) == []
  schedule = optim.learning_rate_schedule(1e-3, 30, 20)
  np.testing.assert_allclose([schedule(s) for s in (0, 15, 20)], [0.0, 5e-4, 2e-3 / 3], rtol=1e-6)


def test_es_refuses_two_stage_update():
  with pytest.raises(config_lib.ConfigError, match="rtd.update_mode"):
    config_lib.validate(_config("es", **{"rtd.update_mode": "two_stage"}))


@pytest.mark.parametrize("name", ["tiny", "mini", "xsmall", "small", "base", "large",
                                  "base_analysis"])
def test_shipped_configs_validate(name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config()
  config_lib.validate(config)
  if name not in ("tiny", "mini"):
    assert config.model.vocab_size == 128100
    assert config_lib.discriminator_config(config).head_size == 64


def test_tiny_is_well_under_a_million_parameters():
  config = tiny.get_config()
  params = meta.unbox(jax.eval_shape(lambda k: RTDModel.from_config(config).init(k, 8), jax.random.key(0)))
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in params.items()}
  disc = counts["discriminator"] - sum(int(np.prod(x.shape)) for x in
                                       jax.tree.leaves(params["discriminator"][DELTA]))
  assert counts["generator"] + disc < 1_000_000, counts


@pytest.mark.parametrize("vocab", [7, 256, 300, 2048])
def test_sampling_follows_the_softmax(vocab):
  """200k draws per distribution against softmax(logits / T): every entry's frequency lies
  within 5 standard deviations, and zero-weight entries are never drawn."""
  draws = 200_000
  logits = jax.random.normal(jax.random.key(vocab), (vocab,)) * 3.0
  logits = logits.at[vocab // 2].set(jnp.finfo(jnp.float32).min)   # a padded-like entry
  temperature = 1.5
  samples = masking.sample_replacements(jax.random.key(1), jnp.broadcast_to(logits, (draws, vocab)),
                                        temperature)
  counts = np.bincount(np.asarray(samples), minlength=vocab)
  chex.assert_shape(counts, (vocab,))
  probs = np.asarray(jax.nn.softmax(logits / temperature))
  assert counts[vocab // 2] == 0
  sd = np.sqrt(draws * probs * (1 - probs)) + 1.0
  z_scores = np.abs(counts - draws * probs) / sd
  assert np.all(z_scores < 5), z_scores.max()


def test_sampling_shapes_and_keys():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 600))
  a = masking.sample_replacements(jax.random.key(1), logits, 1.0)
  b = masking.sample_replacements(jax.random.key(2), logits, 1.0)
  chex.assert_shape(a, (3, 5))
  chex.assert_type(a, jnp.int32)
  assert int(a.min()) >= 0 and int(a.max()) < 600
  assert not np.array_equal(np.asarray(a), np.asarray(b))
  # A near-one-hot distribution is drawn (almost) deterministically.
  peaked = jnp.zeros((4, 600)).at[:, 123].set(60.0)
  np.testing.assert_array_equal(masking.sample_replacements(jax.random.key(3), peaked, 1.0), 123)


def test_sampling_skips_zero_weight_entries_at_block_starts():
  """Entries whose probability underflows to 0 are never drawn, wherever they sit in a block."""
  vocab = 1024
  logits = jnp.full((vocab,), -200.0).at[jnp.array([255, 257, 700])].set(0.0)
  logits = jnp.broadcast_to(logits, (50_000, vocab))
  samples = masking.sample_replacements(jax.random.key(5), logits, 1.0)
  assert set(np.unique(np.asarray(samples)).tolist()) == {255, 257, 700}

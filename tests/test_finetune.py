"""GLUE fine-tuning: metrics against hand-computed values, TSV reading and encoding, the classifier
against transformers, and the loop learning a task the test makes itself (no ../shared needed)."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax.linen import meta

from configs import finetune as finetune_config
from deberta_jax import workdir as workdir_lib
from deberta_jax.finetune import train as finetune
from deberta_jax.finetune import glue
from deberta_jax.finetune import glue_metrics as gm
from deberta_jax import hf
from deberta_jax.data import DataError
from deberta_jax.data import spm as tokenizer_lib
from deberta_jax.models import DebertaEncoder, ModelConfig
from deberta_jax.models import classifier as classifier_lib
from tests.overrides import apply_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

POSITIVE = ("good", "great")
NEGATIVE = ("bad", "awful")
FILLER = ("the movie was", "a film about", "this story", "the actors", "music", "plot", "very",
          "really", "quite", "scene", "ending", "and", "of", "in", "it", "is", "to", "camera")


# ---------------------------------------------------------------------------------------- metrics

def test_accuracy_and_f1_by_hand():
  p = np.array([1, 0, 1, 1, 0, 1])
  y = np.array([1, 0, 0, 1, 1, 1])
  # 4 of 6 right; TP=3, FP=1, FN=1 -> F1 = 6 / 8.
  chex.assert_trees_all_close(gm.accuracy(p, y), 4 / 6)
  chex.assert_trees_all_close(gm.f1(p, y), 0.75)
  assert gm.f1(np.zeros(4, int), np.zeros(4, int)) == 0.0


def test_matthews_by_hand():
  p = np.array([1, 0, 1, 1, 0, 1])
  y = np.array([1, 0, 0, 1, 1, 1])
  tp, tn, fp, fn = 3, 1, 1, 1
  expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  chex.assert_trees_all_close(gm.matthews_corrcoef(p, y), expected)
  assert gm.matthews_corrcoef(y, y) == pytest.approx(1.0)
  assert gm.matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)
  assert gm.matthews_corrcoef(np.ones(6, int), y) == 0.0   # constant prediction (CoLA baseline)
  # Three classes: a confusion matrix whose R_K is worked out by hand.
  y3 = np.array([0, 0, 1, 1, 2, 2])
  p3 = np.array([0, 1, 1, 1, 2, 0])
  # C = 4 correct, s = 6, t = (2,2,2), q = (2,3,1): (4*6 - 12) / sqrt((36-14)(36-12)).
  chex.assert_trees_all_close(gm.matthews_corrcoef(p3, y3), 12 / np.sqrt(22 * 24))


def test_pearson_spearman_by_hand():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  chex.assert_trees_all_close(gm.pearson(x, 2 * x + 1), 1.0)
  chex.assert_trees_all_close(gm.pearson(x, -x), -1.0)
  y = np.array([1.0, 3.0, 2.0, 5.0])
  # mean-centred x = (-1.5, -.5, .5, 1.5), y = (-1.75, .25, -.75, 2.25).
  cov = 1.5 * 1.75 - 0.5 * 0.25 - 0.5 * 0.75 + 1.5 * 2.25
  expected = cov / np.sqrt(5.0 * (1.75**2 + 0.25**2 + 0.75**2 + 2.25**2))
  chex.assert_trees_all_close(gm.pearson(x, y), expected)
  # Monotone but non-linear: Spearman 1, Pearson < 1; ties get average ranks.
  assert gm.spearman(x, np.exp(x)) == pytest.approx(1.0)
  np.testing.assert_allclose(gm.rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])
  # 1 - 6 sum d^2 / (n(n^2-1)) with d = (0, 1, -1, 0): 1 - 12/60.
  chex.assert_trees_all_close(gm.spearman(x, y), 0.8)
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)
  chex.assert_trees_all_close(gm.spearman(a, b), scipy_stats.spearmanr(a, b)[0], rtol=1e-10)


def test_compute_and_score():
  scores = gm.compute(glue.get_task("mrpc").metrics, np.array([1, 1, 0]), np.array([1, 0, 0]))
  assert set(scores) == {"f1", "accuracy"}
  assert gm.task_score(scores, ("f1", "accuracy")) == pytest.approx((2 / 3 + 2 / 3) / 2)


# ------------------------------------------------------------------------------------ tasks, TSV

def test_task_table():
  assert set(glue.TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
  assert glue.get_task("SST-2").name == "sst2"
  assert glue.get_task("stsb").is_regression and glue.get_task("stsb").num_labels == 1
  assert glue.get_task("mnli").eval_splits == ("dev_matched", "dev_mismatched")
  assert glue.get_task("cola").metrics == ("matthews_corrcoef",)
  with pytest.raises(DataError, match="not a GLUE task"):
    glue.get_task("squad")


def _write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join("\t".join(r) + "\n" for r in rows))


def test_read_tsv_formats(tmp_path):
  root = str(tmp_path)
  _write(f"{root}/CoLA/train.tsv",
         [["gj04", "1", "", "Good one ."], ["gj04", "0", "*", "One bad ."]])
  _write(f"{root}/RTE/train.tsv", [["index", "sentence1", "sentence2", "label"],
                                   ["0", "A \"quoted", "B", "not_entailment"],
                                   ["1", "C", "D", "entailment"], ["2", "short row"]])
  _write(f"{root}/STS-B/train.tsv",
         [["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
           "sentence2", "score"], ["0", "g", "f", "y", "o", "s", "s", "x y", "x z", "3.8"]])
  cola = glue.read_tsv(glue.get_task("cola"), f"{root}/CoLA/train.tsv")
  assert cola.text_a == ["Good one .", "One bad ."] and cola.text_b is None
  np.testing.assert_array_equal(cola.labels, [1, 0])
  rte = glue.read_tsv(glue.get_task("rte"), f"{root}/RTE/train.tsv")
  assert rte.text_a == ['A "quoted', "C"] and rte.text_b == ["B", "D"]
  np.testing.assert_array_equal(rte.labels, [1, 0])   # tfds order: entailment = 0
  stsb = glue.read_tsv(glue.get_task("stsb"), f"{root}/STS-B/train.tsv")
  assert stsb.labels.dtype == np.float32 and stsb.labels[0] == pytest.approx(3.8)
  _write(f"{root}/bad/train.tsv", [["sentence", "label"], ["x", "7"]])
  with pytest.raises(DataError, match="line 2"):
    glue.read_tsv(glue.get_task("sst2"), f"{root}/bad/train.tsv")
  with pytest.raises(DataError, match="no SST-2/"):
    glue.task_dir(glue.get_task("sst2"), root)


def test_read_tfds_with_a_fake_source():
  records = {"train": [{"premise": b"p", "hypothesis": b"h", "label": 2}],
             "validation_matched": [{"premise": b"m", "hypothesis": b"n", "label": 0}],
             "validation_mismatched": [{"premise": b"x", "hypothesis": b"y", "label": 1}]}
  seen = []

  def source(name, split, data_dir):
    seen.append((name, split, data_dir))
    return records[split]

  splits = glue.read_tfds(glue.get_task("mnli"), "/tfds", source_fn=source)
  assert seen[0] == ("glue/mnli", "train", "/tfds")
  assert set(splits) == {"train", "dev_matched", "dev_mismatched"}
  assert splits["dev_mismatched"].text_b == ["y"] and int(splits["train"].labels[0]) == 2


def test_truncate_pair_matches_the_longest_first_loop():
  def loop(la, lb, budget):
    while la + lb > budget:
      if la > lb:
        la -= 1
      else:
        lb -= 1
    return la, lb
  for la in range(0, 12):
    for lb in range(0, 12):
      for budget in range(0, 14):
        assert glue.truncate_pair(la, lb, budget) == loop(la, lb, budget), (la, lb, budget)


class _FakeTokenizer:
  def encode_batch(self, texts):
    return [np.arange(10, 10 + len(t.split()), dtype=np.int32) for t in texts]


def test_encode_layout():
  split = glue.Split(["a b c", "a"], ["x y", "z z z z z z z z"], np.array([0, 1]))
  f = glue.encode(split, _FakeTokenizer(), max_seq_length=8, pad_multiple=4)
  assert f.seq_len == 8 and f.truncated == 1
  np.testing.assert_array_equal(f.input_ids[0], [1, 10, 11, 12, 2, 10, 11, 2])
  np.testing.assert_array_equal(f.token_type_ids[0], [0, 0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(f.input_ids[1], [1, 10, 2, 10, 11, 12, 13, 2])
  single = glue.encode(glue.Split(["a b", "a"], None, np.array([0, 1])), _FakeTokenizer(), 16, 4)
  assert single.seq_len == 4
  np.testing.assert_array_equal(single.input_ids, [[1, 10, 11, 2], [1, 10, 2, 0]])
  np.testing.assert_array_equal(single.attention_mask, [[1, 1, 1, 1], [1, 1, 1, 0]])


# ------------------------------------------------------------------------ a tiny model and a task

def _sentence(rng, label):
  words = list(rng.choice(FILLER, rng.integers(3, 8)))
  words.insert(rng.integers(0, len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
  return " ".join(words)


def write_sst2(root, train: int, dev: int) -> str:
  """SST-2-format files under `root`: label 1 iff the sentence holds 'good'/'great'."""
  rng = np.random.default_rng(0)
  for name, n in (("train", train), ("dev", dev)):
    labels = rng.integers(0, 2, n)
    _write(str(root / "SST-2" / f"{name}.tsv"),
           [["sentence", "label"]] + [[_sentence(rng, y), str(y)] for y in labels])
  return str(root)


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  return write_sst2(tmp_path_factory.mktemp("glue"), 480, 120)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, glue_dir):
  with open(os.path.join(glue_dir, "SST-2", "train.tsv")) as f:
    text = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
  prefix = tmp_path_factory.mktemp("spm") / "spm"
  return tokenizer_lib.train_spm(text, 40, str(prefix))


def tiny_model_config(num_pieces):
  return ModelConfig(vocab_size=tokenizer_lib.recommended_vocab_size(num_pieces), hidden_size=32,
                     num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64,
                     position_buckets=32, position_table=False, hidden_dropout=0.0,
                     attention_dropout=0.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, spm_model):
  """A randomly initialised tiny DebertaV2 written in the HF layout with its spm.model."""
  tok = tokenizer_lib.Tokenizer(spm_model)
  cfg = tiny_model_config(tok.num_pieces)
  ids = np.ones((1, 8), np.int32)
  params = meta.unbox(DebertaEncoder(cfg).init(jax.random.key(0), ids)["params"])
  path = str(tmp_path_factory.mktemp("hf") / "tiny")
  hf.save_pretrained(path, cfg, jax.device_get(params), spm_model, tok.mask_id)
  return path


def ft_config(**overrides):
  c = finetune_config.get_config()
  c.mesh.num_devices = 1
  return apply_overrides(c, overrides)


def test_finetune_learns_a_synthetic_task(hf_dir, glue_dir, tmp_path):
  out = str(tmp_path / "ft")
  config = ft_config(**{"task": "sst2", "init": hf_dir, "glue_dir": glue_dir, "num_epochs": 4,
                        "batch_size": 16, "learning_rate": 2e-3, "log_every_steps": 10,
                        "max_seq_length": 32, "cls_dropout": 0.0, "export_best": True})
  results = finetune.run(config, out)
  records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
  train = [r for r in records if "loss" in r]
  dev = [r for r in records if "dev/accuracy" in r]
  print("loss:", [round(r["loss"], 3) for r in train],
        "dev accuracy:", [round(r["dev/accuracy"], 3) for r in dev])
  assert train[-1]["loss"] < train[0]["loss"] - 0.2
  assert len(dev) == 4 and [e["epoch"] for e in results["epochs"]] == [1, 2, 3, 4]
  assert results["best"]["dev"]["accuracy"] >= 0.85          # chance is ~0.5
  on_disk = json.load(open(os.path.join(out, "results.json")))
  assert on_disk["best"] == results["best"] and on_disk["steps_per_epoch"] == 30
  assert on_disk["best"]["dev"]["score"] == on_disk["best"]["dev"]["accuracy"]
  # The exported best model is a HF DebertaV2ForSequenceClassification giving the same logits.
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  best = os.path.join(out, "best_model")
  model, info = transformers.DebertaV2ForSequenceClassification.from_pretrained(
      best, output_loading_info=True)
  assert not info["missing_keys"], info
  cfg, backbone = hf.load_pretrained(best)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  state = load_file(os.path.join(best, "model.safetensors"))
  params = {**backbone,
            "pooler": {"dense": {"kernel": state["pooler.dense.weight"].T,
                                 "bias": state["pooler.dense.bias"]}},
            "classifier": {"kernel": state["classifier.weight"].T,
                           "bias": state["classifier.bias"]}}
  ids = np.array([[1, 5, 9, 12, 2, 0, 0], [1, 7, 8, 2, 0, 0, 0]], np.int32)
  mask = (ids > 0).astype(np.int32)
  mask[:, 0] = 1
  ours = classifier_lib.SequenceClassifier(cfg, 2).apply({"params": params}, ids, mask)
  with torch.no_grad():
    ref = model.eval()(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  print("classifier logits, ours vs transformers: max|diff| =",
        float(np.abs(np.asarray(ours) - ref).max()))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)


def test_init_from_pretraining_workdir_uses_the_gdes_embedding(tmp_path):
  """A GDES workdir gives its discriminator with E_D = E_G + E_delta, ready for the classifier."""
  from tests.test_analyze import make_workdir  # pylint: disable=g-import-not-at-top

  def edit(params):
    delta = params["discriminator"]["gdes_delta"]["word_embeddings"]
    delta[:] = np.random.default_rng(0).normal(size=delta.shape)
    return params

  workdir = make_workdir(str(tmp_path / "run"), "gdes", edit, step=5)
  open(os.path.join(workdir, "spm.model"), "wb").close()  # only its presence is checked here
  assert finetune.init_kind(workdir) == "pretraining_workdir"
  init = finetune.load_init(workdir)
  assert init.kind == "pretraining_workdir" and init.step == 5
  assert init.embedding_sharing == "gdes" and init.spm_model.endswith("spm.model")
  _, _, params, _ = workdir_lib.load(workdir)
  expected = (params["generator"]["embeddings"]["word_embeddings"] +
              params["discriminator"]["gdes_delta"]["word_embeddings"])
  np.testing.assert_allclose(init.params["embeddings"]["word_embeddings"], expected, rtol=1e-6)
  assert "gdes_delta" not in init.params
  # The classifier takes every backbone parameter from it and keeps its fresh heads.
  cfg = init.model_config
  ids = np.ones((1, 8), np.int32)
  model = classifier_lib.SequenceClassifier(cfg, 3)
  fresh = meta.unbox(model.init(jax.random.key(0), ids)["params"])
  merged = classifier_lib.merge_backbone(jax.device_get(fresh), init.params)
  np.testing.assert_array_equal(merged["embeddings"]["word_embeddings"],
                                init.params["embeddings"]["word_embeddings"])
  np.testing.assert_array_equal(merged["encoder"]["layer_1"]["output"]["kernel"],
                                init.params["encoder"]["layer_1"]["output"]["kernel"])
  assert merged["classifier"]["kernel"].shape == (cfg.hidden_size, 3)
  assert np.asarray(model.apply({"params": merged}, ids)).shape == (1, 3)


def test_init_step_0_is_the_initialisation_the_run_started_from(tmp_path):
  """`init_step=0` recomputes the parameters of the run's step 0 from its config: the checkpoint
  here holds them with one layer shifted by 1, and step 0 must give them back unshifted."""
  from tests.test_analyze import make_workdir  # pylint: disable=g-import-not-at-top

  def shift(params):
    params["discriminator"]["encoder"]["layer_1"]["output"]["kernel"] += 1.0
    return params

  workdir = make_workdir(str(tmp_path / "run"), "gdes", shift, step=5)
  open(os.path.join(workdir, "spm.model"), "wb").close()
  trained, initial = finetune.load_init(workdir), finetune.load_init(workdir, 0)
  assert (trained.step, initial.step) == (5, 0)
  assert initial.spm_model == trained.spm_model
  kernel = lambda init: init.params["encoder"]["layer_1"]["output"]["kernel"]
  np.testing.assert_allclose(kernel(initial), kernel(trained) - 1.0, atol=1e-6)
  chex.assert_trees_all_equal(
      {k: v for k, v in initial.params.items() if k != "encoder"},
      {k: v for k, v in trained.params.items() if k != "encoder"})


# ------------------------------------------------------------------------------------- bad input

def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-m", "deberta_jax.finetune",
                         "--config=configs/finetune.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case,needle", [
    ("task", "not a GLUE task"),
    ("neither", "neither a pre-training workdir"),
    ("glue_dir", "no SST-2/ directory"),
])
def test_cli_bad_input_exits_2(case, needle, hf_dir, glue_dir, tmp_path):
  args = {"task": ["--config.task=squad", f"--config.init={hf_dir}"],
          "neither": [f"--config.init={tmp_path}"],
          "glue_dir": [f"--config.init={hf_dir}", f"--config.glue_dir={tmp_path}"]}[case]
  proc = _cli(*args, f"--workdir={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and needle in last, last


# ------------------------------------------------------------- pooling, re-init, per-group rates

def test_mean_pooling_reads_only_the_real_tokens():
  cfg = tiny_model_config(40)
  ids = np.array([[1, 5, 6, 7, 2, 0, 0, 0]], np.int32)
  mask = (ids != 0).astype(np.int32)
  model = classifier_lib.SequenceClassifier(cfg, 2, cls_dropout=0.0, pooling="mean")
  params = meta.unbox(model.init(jax.random.key(0), ids, mask)["params"])
  # Padding more positions changes nothing; the [CLS] pooler of the same parameters differs.
  longer = np.pad(ids, ((0, 0), (0, 8)))
  got = model.apply({"params": params}, ids, mask)
  chex.assert_trees_all_close(model.apply({"params": params}, longer, (longer != 0).astype(
      np.int32)), got, atol=1e-5)
  cls = classifier_lib.SequenceClassifier(cfg, 2, cls_dropout=0.0).apply({"params": params},
                                                                           ids, mask)
  assert not np.allclose(cls, got)
  # By hand: the masked mean of the encoder's last hidden state through the pooler's dense.
  hidden = DebertaEncoder(cfg).apply({"params": {k: params[k] for k in ("embeddings",
                                                                        "encoder")}}, ids, mask)
  hidden = np.asarray(hidden[0] if isinstance(hidden, tuple) else hidden)
  pooled = hidden[0, :5].mean(0)
  dense = params["pooler"]["dense"]
  h = jax.nn.gelu(pooled @ dense["kernel"] + dense["bias"], approximate=False)
  expected = h @ params["classifier"]["kernel"] + params["classifier"]["bias"]
  chex.assert_trees_all_close(np.asarray(got)[0], np.asarray(expected), atol=1e-5)


def test_reinit_top_layers_keeps_the_fresh_top_of_the_stack():
  cfg = tiny_model_config(40)
  ids = np.ones((1, 8), np.int32)
  model = classifier_lib.SequenceClassifier(cfg, 2)
  fresh = jax.device_get(meta.unbox(model.init(jax.random.key(0), ids)["params"]))
  backbone = jax.tree.map(lambda x: x + 1.0, {k: fresh[k] for k in ("embeddings", "encoder")})
  merged = classifier_lib.merge_backbone(fresh, backbone, reinit_top_layers=1)
  chex.assert_trees_all_equal(merged["encoder"]["layer_1"], fresh["encoder"]["layer_1"])
  chex.assert_trees_all_equal(merged["encoder"]["layer_0"], backbone["encoder"]["layer_0"])
  chex.assert_trees_all_equal(merged["embeddings"], backbone["embeddings"])
  chex.assert_trees_all_equal(merged["encoder"]["rel_embeddings"],
                              backbone["encoder"]["rel_embeddings"])
  every = classifier_lib.merge_backbone(fresh, backbone, reinit_top_layers=2)
  chex.assert_trees_all_equal(every["encoder"]["layer_0"], fresh["encoder"]["layer_0"])


def test_layer_lr_decay_and_head_scale_set_each_groups_rate():
  scale = lambda *path: finetune.learning_rate_scale(path, 2, 0.5, 3.0)  # noqa: E731
  chex.assert_equal(scale("classifier", "kernel"), 3.0)
  chex.assert_equal(scale("pooler", "dense", "bias"), 3.0)
  chex.assert_equal(scale("encoder", "layer_1", "output", "kernel"), 0.5)
  chex.assert_equal(scale("encoder", "layer_0", "output", "kernel"), 0.25)
  chex.assert_equal(scale("encoder", "rel_embeddings"), 0.125)
  chex.assert_equal(scale("embeddings", "word_embeddings"), 0.125)
  # In the optimizer: one SGD-like step of each group moves it by its own rate.
  config = ft_config(**{"learning_rate": 1.0, "layer_lr_decay": 0.5, "head_lr_scale": 3.0,
                        "weight_decay": 0.0, "clip_norm": 0.0, "warmup_steps": 1})
  tx, _, _ = finetune.make_optimizer(config, total_steps=10, num_layers=2)
  params = {"classifier": {"kernel": np.zeros(2)}, "embeddings": {"word_embeddings": np.zeros(2)},
            "encoder": {"layer_0": {"w": np.zeros(2)}, "layer_1": {"w": np.zeros(2)}}}
  grads = jax.tree.map(np.ones_like, params)
  state = tx.init(params)
  for _ in range(2):  # step 0 has rate 0 (warmup), step 1 the peak
    updates, state = tx.update(grads, state, params)
  moved = jax.tree.map(lambda u: float(-u[0]), updates)
  ratio = {k: v / moved["classifier"]["kernel"] for k, v in
           {"layer_1": moved["encoder"]["layer_1"]["w"], "layer_0": moved["encoder"]["layer_0"]["w"],
            "embeddings": moved["embeddings"]["word_embeddings"]}.items()}
  chex.assert_trees_all_close(ratio, {"layer_1": 0.5 / 3, "layer_0": 0.25 / 3,
                                      "embeddings": 0.125 / 3}, rtol=1e-5)


@pytest.mark.parametrize("overrides,needle", [
    ({"pooling": "max"}, "config.pooling: 'max' is not one of"),
    ({"pooling": "mean"}, "set config.export_best=False"),
    ({"layer_lr_decay": 0.0}, "config.layer_lr_decay"),
    ({"head_lr_scale": -1.0}, "config.head_lr_scale"),
    ({"reinit_top_layers": -1}, "config.reinit_top_layers"),
])
def test_validate_refuses_bad_pooling_and_rates(overrides, needle):
  with pytest.raises(finetune.FinetuneError, match=needle.replace(".", r"\.").replace("(", r"\(")):
    finetune.validate(ft_config(**{"init": "/x", **overrides}))
  finetune.validate(ft_config(**{"init": "/x", "pooling": "mean", "export_best": False}))

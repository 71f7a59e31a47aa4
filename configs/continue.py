"""Continued (domain-adaptive) pre-training from a released DeBERTaV3: the official recipe.

The official `experiments/language_model/rtd.sh` `deberta-v3-*-continue` rows: learning rate 5e-5,
global batch 256, 100k steps with 10k warmup, decoupled (two-stage) generator/discriminator
updates, sequences of 512, RTD weight 10 (the official code's; the paper's 50 is for training
from scratch), starting from `--init_generator pytorch_model.generator.bin --init_discriminator
pytorch_model.bin`. The size comes after the colon (default base): xsmall, small, base, large.

Download by hand from the Hugging Face model pages microsoft/deberta-v3-{xsmall,small,base,large}
(files tab): `pytorch_model.bin` (the discriminator) and `spm.model` (128000 pieces; [MASK] =
128000, 128100 embedding rows); for xsmall and large also `pytorch_model.generator.bin`. Prepare
your corpus with the released tokenizer, then train:

  python -m deberta_jax.prepare --config=configs/continue.py:base --out=/data/prepared \
      --config.data.source=text_files --config.data.text_files='/data/domain/*.txt' \
      --config.data.spm_model=/models/deberta-v3-base/spm.model --num_workers=8

  # xsmall (384 hidden, 12 layers; generator released)
  python -m deberta_jax.main --config=configs/continue.py:xsmall --workdir=/runs/xsmall-cont \
      --config.data.source=prepared --config.data.prepared_dir=/data/prepared \
      --config.init.discriminator=/models/deberta-v3-xsmall/pytorch_model.bin \
      --config.init.generator=/models/deberta-v3-xsmall/pytorch_model.generator.bin
  # small (768 hidden, 6 layers; no generator released: it starts from a random init)
  python -m deberta_jax.main --config=configs/continue.py:small --workdir=/runs/small-cont \
      --config.data.source=prepared --config.data.prepared_dir=/data/prepared \
      --config.init.discriminator=/models/deberta-v3-small/pytorch_model.bin
  # base (768 hidden, 12 layers; no generator released)
  python -m deberta_jax.main --config=configs/continue.py:base --workdir=/runs/base-cont \
      --config.data.source=prepared --config.data.prepared_dir=/data/prepared \
      --config.init.discriminator=/models/deberta-v3-base/pytorch_model.bin
  # large (1024 hidden, 24 layers; generator released)
  python -m deberta_jax.main --config=configs/continue.py:large --workdir=gs://BUCKET/large-cont \
      --config.data.source=prepared --config.data.prepared_dir=gs://BUCKET/prepared \
      --config.init.discriminator=/models/deberta-v3-large/pytorch_model.bin \
      --config.init.generator=/models/deberta-v3-large/pytorch_model.generator.bin

Under GDES (the default, as in the releases) the discriminator starts exactly as released:
E_delta = E_D - E_G is computed from the two files (deberta_jax/pretraining/init_from.py). The
held-out evaluation runs at step 0, so the first `eval_*` line is the released model's.
"""

import importlib

SIZES = ("xsmall", "small", "base", "large")


def get_config(size: str = "base"):
  if size not in SIZES:
    raise ValueError(f"configs/continue.py:{size}: the size must be one of {SIZES}")
  c = importlib.import_module(f"configs.{size}").get_config()
  c.num_train_steps = 100_000
  c.global_batch_size = 256
  c.seq_len = 512
  c.model.vocab_size = 128100          # the released embedding rows (128000 pieces + [MASK] + 99)
  c.optim.learning_rate = 5e-5
  c.optim.warmup_steps = 10_000
  c.rtd.rtd_lambda = 10.0
  c.rtd.update_mode = "auto"           # two-stage (decoupled) under GDES
  c.eval.every_steps = 2000
  return c

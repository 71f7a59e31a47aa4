"""Tiny DeBERTaV3 (~0.5M parameters) for laptop CPUs, tests and smoke runs; no download.

  python -m deberta_jax.main --config=configs/tiny.py --workdir=/tmp/deberta_tiny

Trains on the embedded corpus (standard-library docstrings) with a 2000-piece SentencePiece
model trained on it. On 2 CPU cores the 300 steps take about a minute: the MLM loss falls from
~7.6 to the corpus's unigram entropy (~6.2) and the RTD loss from ~0.69 to its base rate (~0.42).
Getting below those plateaus takes ~1000+ steps at this size (e.g. --config.seq_len=64
--config.num_train_steps=1000 --config.optim.learning_rate=5e-3 and dropout 0: MLM 6.23 -> 5.36).
"""

from configs import common


def get_config():
  c = common.base_config()
  c.num_train_steps = 300
  c.global_batch_size = 16
  c.seq_len = 128
  c.model.vocab_size = 2048
  c.model.hidden_size = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.intermediate_size = 256
  c.model.dtype = "float32"
  c.mesh.cpu_devices = 0               # one device per core (see configs/common.py)
  c.data.spm_vocab_size = 2000
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 30
  c.ckpt.every_steps = 100
  c.ckpt.keep = 2
  c.log.every_steps = 10
  return c

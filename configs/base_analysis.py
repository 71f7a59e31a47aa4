"""DeBERTaV3-base-analysis: the paper's ablation setting (Table 10, last column).

Base architecture, batch 2048, 125k steps, lr 5e-4, Adam b2 0.999; used for the ES/NES/GDES
comparisons of section 3 (Wikipedia + BookCorpus in the paper).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.global_batch_size = 2048
  c.num_train_steps = 125_000
  c.optim.learning_rate = 5e-4
  c.optim.b2 = 0.999
  return c

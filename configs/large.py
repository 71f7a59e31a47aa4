"""DeBERTaV3-large: 1024 hidden, 24 layers, 16 heads of 64 (generator 12 layers); paper Table 10.

Table 10 prints 12 attention heads for large; the released checkpoint and the official
rtd_large.json have 16 heads of size 64 (1024 = 16 x 64), which is what is used here.
Batch 8192 x 512, 500k steps, lr 3e-4, 10k warmup, linear decay.

  python -m deberta_jax.main --config=configs/large.py --workdir=gs://BUCKET/runs/large \
      --config.data.source=tfds --config.data.tfds_name=wikipedia/20230601.en \
      --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.spm_model=/path/spm.model
"""

from configs import common


def get_config():
  c = common.base_config()
  c.model.hidden_size = 1024
  c.model.num_layers = 24
  c.model.num_heads = 16
  c.model.intermediate_size = 4096
  c.optim.learning_rate = 3e-4
  return c

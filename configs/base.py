"""DeBERTaV3-base: 768 hidden, 12 layers, 12 heads (generator 6 layers); paper Table 10.

Batch 8192 x 512 tokens, 500k steps, lr 6e-4 with 10k warmup and linear decay, AdamW
(0.9, 0.98, 1e-6), weight decay 0.01, clip 1.0, GDES, lambda 50.

  python -m deberta_jax.main --config=configs/base.py --workdir=gs://BUCKET/runs/base \
      --config.data.source=tfds --config.data.tfds_name=wikipedia/20230601.en \
      --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.spm_model=/path/spm.model
"""

from configs import common


def get_config():
  return common.base_config()

"""DeBERTaV3-small: 768 hidden, 6 layers, 12 heads (generator 3 layers); paper Table 10.

  python -m deberta_jax.main --config=configs/small.py --workdir=gs://BUCKET/runs/small \
      --config.data.source=tfds --config.data.tfds_name=wikipedia/20230601.en \
      --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.spm_model=/path/spm.model
"""

from configs import common


def get_config():
  c = common.base_config()
  c.model.num_layers = 6
  return c

"""DeBERTaV3-xsmall: 384 hidden, 12 layers, 6 heads (generator 6 layers); 22M backbone.

  python -m deberta_jax.main --config=configs/xsmall.py --workdir=gs://BUCKET/runs/xsmall \
      --config.data.source=tfds --config.data.tfds_name=wikipedia/20230601.en \
      --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.spm_model=/path/spm.model

The paper's Table 10 has no xsmall column; the base/small recipe (8k batch, 500k steps, lr 6e-4)
is used.
"""

from configs import common


def get_config():
  c = common.base_config()
  c.model.hidden_size = 384
  c.model.num_layers = 12
  c.model.num_heads = 6
  c.model.intermediate_size = 1536
  return c

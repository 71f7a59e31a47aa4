"""`python -m deberta_jax.finetune --config=configs/finetune.py --workdir=OUT ...`."""

from deberta_jax.finetune import train

if __name__ == "__main__":
  train.run_main()

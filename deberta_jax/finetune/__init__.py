"""GLUE fine-tuning of a pre-trained discriminator: `python -m deberta_jax.finetune`.

`train` is the loop, `glue` reads the task files, `glue_metrics` scores them.
"""

"""deberta_jax: pre-training DeBERTaV3 (RTD + GDES) in JAX/Flax, from a laptop CPU to a TPU pod.

Nothing is imported or configured here on purpose: importing the package must not touch jax's
global state (device count flags, platforms), which tests and launchers set before the first use.
"""

__version__ = "0.1.0"

"""Fused disentangled-attention kernels (Pallas): `model.attention_impl='flash'`.

`flash_attention` is the entry point (custom VJP, padding, the plain-jnp reference used by the
tests); `gpu` holds the Triton kernels, `tpu` the Mosaic ones.

Status: both kernel sets pass the parity tests on CPU through Pallas' interpreter, and both are
lowered for their targets in the tests (Triton IR for CUDA, Mosaic for TPU);
experiments/triton_compile_check.py and experiments/tpu_aot_check.py compile them further (sm_90
cubins, a v5p executable) without an accelerator. Neither has run on a GPU or a TPU yet
(docs/benchmarks.md); `attention_impl='skew'` is the measured default.
"""

# A finite "minus infinity" for masked scores, shared by both kernel sets: exp(MASKED_SCORE - m)
# underflows to exactly 0 for any real row maximum m, and MASKED_SCORE - MASKED_SCORE = 0 keeps
# fully masked rows finite.
MASKED_SCORE = -1e30

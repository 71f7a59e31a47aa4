"""What the GPU and TPU fused-attention kernels share besides the dropout hash (hash_dropout.py)."""

from __future__ import annotations

# A finite "minus infinity" for masked scores: exp(NEG - m) underflows to exactly 0 for any
# real row maximum m, and NEG - NEG = 0 keeps fully masked rows finite.
NEG = -1e30

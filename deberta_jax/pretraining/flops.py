"""Analytic model FLOPs of one RTD training step, and peak FLOP/s by device, for MFU.

The count is the formula of the performance spec (shared/spec/performance_anchors.md, section
2.2), generalised to any intermediate size. Per *input token*, training = 3 x forward, a
multiply-add = 2 FLOPs:

  f_layer = 8 H^2 + 4 H I        Q, K, V, output projections and the FFN (24 H^2 when I = 4H)
          + 4 L H                content scores Q K^T and the context P V
          + 4 R H                the disentangled terms: c2p Q . Kr^T and p2c K . Qr^T
  F_token = 3 [ (N_d + N_g + E) f_layer           discriminator, generator, EMD passes
                + 2 H^2 + 2 H                      RTD head (dense H x H, classifier H x 1)
                + p (2 H^2 + 2 H V) ]              generator LM head on the masked tokens only

with N_d / N_g the discriminator / generator depths (N_g from `model.generator_num_layers`, 0 =
half of N_d), E = 2 Enhanced-Mask-Decoder passes, L the sequence length, p the mask rate, V the
real vocabulary (the rows that only pad the table are not counted) and

  R = min(2 * position_buckets, 2L - 1)

the relative slots a query can actually reach (512 for the v3 configs at L >= 257, which is what
HF always uses). Not counted (as in the spec): the per-step projections of the relative table
(4 R H^2 per layer, batch independent), softmax, LayerNorms, gathers, the optimizer.

Two variants of N_g:

  * "spec" (the default, `flops_per_token`): N_d + N_g + E layer passes, the spec's formula. It
    reproduces the spec's worked numbers (base 1.131 GFLOP/token, large 3.472) and so is the one
    to compare against the spec's anchors (e.g. "40% MFU on H100 = 350k tokens/s for base").
  * "executed": N_d + (N_g - 1) + E. The official generator computes its last layer once more and
    discards it (the EMD re-runs that layer on the position-augmented query); this implementation
    skips the discarded pass (models/pretraining.py), so it does one layer pass fewer. MFU from
    this count never credits work that is not done (base, L=512: 4.6% lower than "spec").

Implementation work beyond model FLOPs is never credited: the skew and flash attention forms
multiply against all 2L - 1 distances (1023 rows at L=512, twice R), the gather form against the
band of the table the length reaches, the flash backward recomputes the score tiles and the
per-distance tables, and the generator head runs on ceil(p L) slots, padded ones included.
"""

from __future__ import annotations

import dataclasses
import re

GFLOP = 1e9


@dataclasses.dataclass(frozen=True)
class FlopBreakdown:
  """Training FLOPs per input token (3 x forward), split as in the spec's worked table."""
  dense: float        # projections + FFN of every layer pass, plus the RTD head
  scores: float       # QK^T and PV
  relative: float     # c2p + p2c
  mlm_head: float     # generator LM head on the masked tokens
  layer_passes: int   # N_d + N_g (+ E) layer passes counted
  relative_slots: int  # R

  @property
  def total(self) -> float:
    return self.dense + self.scores + self.relative + self.mlm_head


def relative_slots(position_buckets: int, seq_len: int) -> int:
  """R = min(2 * position_buckets, 2L - 1): the relative-table rows a length-L sequence reaches."""
  return min(2 * int(position_buckets), 2 * int(seq_len) - 1)


def generator_layers(model) -> int:
  """The generator depth as the model builds it: model.generator_num_layers, 0 = half (>= 1)."""
  layers = int(model.get("generator_num_layers", 0) or 0)
  return layers or max(1, int(model.num_layers) // 2)


def breakdown(config, seq_len: int | None = None, *, emd_passes: int = 2,
              count: str = "spec") -> FlopBreakdown:
  """The per-token training FLOPs of the RTD step of `config` (a run config) at `seq_len`.

  count: "spec" (N_d + N_g + E passes, the spec formula) or "executed" (N_d + N_g - 1 + E, what
  this implementation runs; see the module docstring).
  """
  if count not in ("spec", "executed"):
    raise ValueError(f"count={count!r} is not 'spec' or 'executed'")
  m = config.model
  h, inter, vocab = int(m.hidden_size), int(m.intermediate_size), int(m.vocab_size)
  length = int(seq_len if seq_len is not None else config.seq_len)
  r = relative_slots(m.position_buckets, length)
  p = float(config.rtd.mask_prob)
  n_gen = generator_layers(m)
  if count == "executed" and emd_passes > 0:
    n_gen -= 1  # the EMD replaces the generator's own pass through its last layer
  passes = int(m.num_layers) + n_gen + int(emd_passes)
  dense = passes * (8 * h * h + 4 * h * inter) + (2 * h * h + 2 * h)
  scores = passes * 4 * length * h
  relative = passes * 4 * r * h
  mlm = p * (2 * h * h + 2 * h * vocab)
  return FlopBreakdown(dense=3 * dense, scores=3 * scores, relative=3 * relative,
                       mlm_head=3 * mlm, layer_passes=passes, relative_slots=r)


def flops_per_token(config, seq_len: int | None = None, *, emd_passes: int = 2,
                    count: str = "spec") -> float:
  """Training FLOPs per input token of one RTD step (spec section 2.2); see `breakdown`."""
  return breakdown(config, seq_len, emd_passes=emd_passes, count=count).total


# --------------------------------------------------------------------------------- peak FLOP/s

# Dense bf16 peak FLOP/s per device (no sparsity), the spec's table; first match wins, so the
# more specific patterns come first. Matched case-insensitively against jax's device_kind
# ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    (r"h100.*pcie", 756e12),        # H100 PCIe (not in the spec; NVIDIA data sheet, dense)
    (r"h100|h200|gh200", 989e12),   # H100 SXM / H200
    (r"a100", 312e12),
    (r"tpu v5 ?lite|tpu v5e", 197e12),
    (r"tpu v5p|tpu v5$", 459e12),   # v5p reports itself as "TPU v5"
    (r"tpu v6 ?lite|tpu v6e|trillium", 918e12),
    (r"tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind; None when unknown (CPU included).

  The bf16 peak is used whatever the compute dtype: a float32 config on a GPU gets a (much) lower
  MFU than its own dtype's peak would give, which is the honest comparison across configs.
  """
  kind = (device_kind or "").strip().lower()
  for pattern, peak in PEAK_BF16:
    if re.search(pattern, kind):
      return peak
  return None


def mfu(flops_per_token_: float, tokens_per_second: float, device_kind: str,
        num_devices: int = 1) -> float | None:
  """Model FLOPs utilisation: F_token x tokens/s / (peak x devices); None without a known peak."""
  peak = peak_flops(device_kind)
  if peak is None or num_devices <= 0:
    return None
  return flops_per_token_ * tokens_per_second / (peak * num_devices)

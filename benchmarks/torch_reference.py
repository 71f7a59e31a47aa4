"""The PyTorch reference of `benchmarks.bench --reference=torch`: the same RTD step built from
transformers' DebertaV2 on the same device, for a side-by-side speed ratio.

Generator (`DebertaV2ForMaskedLM`, the generator depth, LM head on the masked positions only)
forward + MLM loss + backward + AdamW; multinomial sampling of the replacements; discriminator
(`DebertaV2Model` fed GDES embeddings stop_grad(E_G) + E_delta, then the RTD head
LN(h + h_CLS) -> dense -> gelu -> dense(1)) forward + lambda * BCE + backward + AdamW. Both
optimizers clip the global norm like ours and follow the same warmup/decay schedule. bf16
autocast when model.dtype is bfloat16; float32 otherwise (TF32 matmuls on GPU, XLA's default
precision). The reference has no Enhanced Mask Decoder (transformers has none): it runs N_g
generator layers where ours runs N_g + 1 layer passes.

torch and transformers are test-only dependencies: this module is imported only for the
reference.
"""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

from deberta_jax import config as config_lib
from deberta_jax import hf
from deberta_jax.models.config import generator_config


class TorchRTD:
  """The two networks, their optimizers and schedules, and `step(ids, attention)`."""

  def __init__(self, config, device: str, special_ids, compile_backbones: bool = False):
    torch.manual_seed(config.seed)
    self.dev = torch.device(device)
    self.cuda = self.dev.type == "cuda"
    if self.cuda:
      torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default f32 dot precision on GPU
      torch.backends.cudnn.allow_tf32 = True
    disc_cfg = config_lib.discriminator_config(config)
    as_hf = lambda c, arch: transformers.DebertaV2Config.from_dict(hf.config_to_hf(c, arch))
    self.gen = transformers.DebertaV2ForMaskedLM(
        as_hf(generator_config(config.model), "DebertaV2ForMaskedLM")).to(self.dev).train()
    self.disc = transformers.DebertaV2Model(as_hf(disc_cfg, "DebertaV2Model")).to(self.dev).train()
    hidden, self.vocab = disc_cfg.hidden_size, disc_cfg.vocab_size
    self.head = torch.nn.ModuleDict({
        "LayerNorm": torch.nn.LayerNorm(hidden, eps=disc_cfg.layer_norm_eps),
        "dense": torch.nn.Linear(hidden, hidden),
        "classifier": torch.nn.Linear(hidden, 1)}).to(self.dev).train()
    self.delta = torch.nn.Parameter(torch.zeros(self.vocab, hidden, device=self.dev))  # E_delta
    if compile_backbones:
      self.gen.deberta.compile()
      self.disc.compile()
    self.word_table = self.gen.deberta.embeddings.word_embeddings
    self._optimizers(config)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.model.dtype)
    self.autocast_dtype = dtype
    self.p_mask, self.temperature = float(config.rtd.mask_prob), float(config.rtd.temperature)
    self.rtd_lambda, self.clip = float(config.rtd.rtd_lambda), float(config.optim.clip_norm)
    self.mask_id = special_ids[-1]
    self.never = torch.tensor(list(special_ids), device=self.dev)

  def _optimizers(self, config):
    """AdamW for each network on the linear warmup / linear decay of optim.py."""
    o = config.optim
    adamw = lambda params: torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.b1, o.b2),
                                             eps=o.eps, weight_decay=o.weight_decay,
                                             fused=self.cuda)
    self.gen_params = list(self.gen.parameters())
    # The discriminator's own word table is unused under GDES (E_D = stop_grad(E_G) + E_delta).
    self.disc_params = ([p for n, p in self.disc.named_parameters() if "word_embeddings" not in n]
                        + list(self.head.parameters()) + [self.delta])
    self.gen_opt, self.disc_opt = adamw(self.gen_params), adamw(self.disc_params)
    warm, total = max(1, o.warmup_steps), max(1, config.num_train_steps)
    end = o.end_learning_rate / o.learning_rate
    factor = lambda s: (s / warm if s < warm else
                        1.0 + (end - 1.0) * min(1.0, (s - warm) / max(1, total - warm)))
    self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor)
                       for opt in (self.gen_opt, self.disc_opt)]

  def _autocast(self):
    return torch.autocast(self.dev.type, dtype=self.autocast_dtype,
                          enabled=self.autocast_dtype is not None)

  def _update(self, loss, params, optimizer):
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(params, self.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  def _mask(self, ids, attention):
    """round(p * candidates) positions per row, uniformly without replacement (masking.py)."""
    slots = max(1, math.ceil(self.p_mask * ids.shape[1]))  # = masking.max_predictions
    candidate = attention.bool() & ~torch.isin(ids, self.never)
    count = candidate.sum(-1)
    n_mask = torch.maximum(torch.round(self.p_mask * count).clamp(max=slots),
                           (count > 0).long())
    keys = torch.where(candidate, torch.rand(ids.shape, device=self.dev), -1.0)
    positions = keys.topk(slots, dim=-1).indices
    weights = torch.arange(slots, device=self.dev)[None, :] < n_mask[:, None]
    positions = torch.where(weights, positions, 0)
    labels = ids.gather(1, positions)
    masked = ids.scatter(1, positions, torch.where(weights, self.mask_id, labels))
    return masked, positions, weights, labels

  def _generator(self, masked, attention, positions, weights, labels):
    """MLM loss at the masked positions, backward, AdamW; returns (loss, logits)."""
    rows, slots = positions.shape
    with self._autocast():
      states = self.gen.deberta(input_ids=masked, attention_mask=attention).last_hidden_state
      at_masks = states.gather(1, positions[..., None].expand(rows, slots, states.shape[-1]))
      logits = self.gen.lm_predictions(at_masks, self.word_table)
    logits = logits.float()
    w = weights.float().reshape(-1)
    nll = F.cross_entropy(logits.reshape(-1, self.vocab), labels.reshape(-1), reduction="none")
    loss = (nll * w).sum() / w.sum().clamp(min=1.0)
    self._update(loss, self.gen_params, self.gen_opt)
    return loss, logits

  def _discriminator(self, replaced, is_replaced, attention):
    """lambda * BCE on the GDES table of the *updated* generator, backward, AdamW."""
    with self._autocast():
      table = self.word_table.weight.detach() + self.delta
      h = self.disc(inputs_embeds=F.embedding(replaced, table),
                    attention_mask=attention).last_hidden_state
      u = self.head["LayerNorm"](h + h[:, :1, :])
      u = F.gelu(self.head["dense"](u))
      logits = self.head["classifier"](u)[..., 0]
    am = attention.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), is_replaced, reduction="none")
    loss = self.rtd_lambda * (bce * am).sum() / am.sum().clamp(min=1.0)
    self._update(loss, self.disc_params, self.disc_opt)
    return loss

  def step(self, ids, attention):
    """One RTD step; returns (MLM loss, RTD loss without lambda)."""
    masked, positions, weights, labels = self._mask(ids, attention)
    mlm_loss, logits = self._generator(masked, attention, positions, weights, labels)
    with torch.no_grad():
      probs = torch.softmax(logits.detach() / self.temperature, dim=-1)
      sampled = torch.multinomial(probs.reshape(-1, self.vocab), 1).reshape(positions.shape)
      replaced = ids.scatter(1, positions, torch.where(weights, sampled, labels))
      is_replaced = (replaced != ids).float()
    rtd_loss = self._discriminator(replaced, is_replaced, attention)
    for scheduler in self.schedulers:
      scheduler.step()
    return mlm_loss.detach(), rtd_loss.detach() / max(self.rtd_lambda, 1e-12)


def bench_torch(config, batches, special_ids, steps: int, warmup: int, device: str,
                compile_backbones: bool = False, repeats: int = 1, threads: int = 0) -> dict:
  """Times TorchRTD.step like bench_jax times ours: warmup, then `repeats` windows of `steps`."""
  if threads > 0:
    torch.set_num_threads(threads)
  ref = TorchRTD(config, device, special_ids, compile_backbones)
  on_device = [{k: torch.as_tensor(v, dtype=torch.long, device=ref.dev) for k, v in b.items()}
               for b in batches]
  sync = torch.cuda.synchronize if ref.cuda else (lambda: None)
  if ref.cuda:
    torch.cuda.reset_peak_memory_stats(ref.dev)
  losses = None
  for i in range(warmup):
    b = on_device[i % len(on_device)]
    losses = ref.step(b["input_ids"], b["attention_mask"])
  sync()
  windows = []
  for r in range(repeats):
    t0 = time.perf_counter()
    for i in range(steps):
      b = on_device[(r * steps + i) % len(on_device)]
      losses = ref.step(b["input_ids"], b["attention_mask"])
    sync()
    windows.append((time.perf_counter() - t0) / steps)
  step_seconds = statistics.median(windows)
  length = batches[0]["input_ids"].shape[1]
  result = {
      "reference_step_seconds": step_seconds,
      "reference_window_step_seconds": windows,
      "reference_tokens_per_second": config.global_batch_size * length / step_seconds,
      "reference_peak_memory_bytes": (int(torch.cuda.max_memory_allocated(ref.dev))
                                      if ref.cuda else None),
      "reference_device": (torch.cuda.get_device_name(ref.dev) if ref.cuda else "cpu"),
      "reference_final_metrics": ({"mlm_loss": float(losses[0]), "rtd_loss": float(losses[1])}
                                  if losses is not None else {}),
      "reference_autocast": (str(ref.autocast_dtype).replace("torch.", "")
                             if ref.autocast_dtype else None),
      "reference_torch_compile": bool(compile_backbones),
      "reference_threads": torch.get_num_threads(),
      "torch_version": torch.__version__,
      "transformers_version": transformers.__version__,
  }
  del ref, on_device
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()
  return result

"""The RTD training step: mask, generator update, sample, discriminator update, in one jit.

Two-stage (NES, GDES; paper Fig. 1b/1c): the generator is updated on L_MLM first, then the
discriminator on lambda * L_RTD over the replaced batch, with E_D formed from the *updated* E_G.
Joint (ES, Fig. 1a): one backward of L_MLM + lambda * L_RTD through both networks.

The global batch may be split into micro-batches (gradient accumulation). Losses are sums divided
by the token counts of the whole global batch, and every random draw is a function of the global
row, never of the split: masking runs on the whole batch, each row's sample has its own key, and
each dropout site draws one seed per step that every micro-batch shares, its masks hashed with the
row's global index (hash_dropout.RowLayout). Any split, and any mesh, gives the gradient of one
big batch, dropout included.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from deberta_jax import config as config_lib
from deberta_jax.pretraining import losses
from deberta_jax.pretraining import masking
from deberta_jax.pretraining import optim
from deberta_jax.models.hash_dropout import RowLayout
from deberta_jax.models.rtd import RTDModel


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied
  params: Any              # {'generator': ..., 'discriminator': ...}
  opt_state: Any           # {'generator', 'discriminator'} (two-stage) or {'joint'}
  rng: jax.Array           # raw key data of the run's base key (checkpoint-friendly uint32)


class SpecialTokens(NamedTuple):
  pad_id: int
  cls_id: int
  sep_id: int
  unk_id: int
  mask_id: int

  @classmethod
  def of(cls, tokenizer) -> "SpecialTokens":
    """The ids of a tokenizer (data/spm.Tokenizer) that masking and sampling treat specially."""
    return cls(tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.unk_id,
               tokenizer.mask_id)

  @property
  def never_masked(self) -> tuple[int, ...]:
    return (self.pad_id, self.cls_id, self.sep_id, self.unk_id, self.mask_id)


def make_optimizers(config) -> dict[str, optax.GradientTransformation]:
  gen_lr, disc_lr = optim.peak_learning_rates(config)
  if config_lib.two_stage(config):
    return {"generator": _optimizer(config, gen_lr), "discriminator": _optimizer(config, disc_lr)}
  return {"joint": _optimizer(config, gen_lr)}


def _optimizer(config, peak_learning_rate: float) -> optax.GradientTransformation:
  o = config.optim
  return optim.make_optimizer(o, peak_learning_rate, o.warmup_steps, config.num_train_steps,
                              o.end_learning_rate)[0]


def _state_rngs(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(the parameters' key, the run's key): the one split of config.seed's key."""
  params_rng, run_rng = jax.random.split(rng)
  return params_rng, run_rng


def initial_params(model: RTDModel, config) -> dict:
  """The parameters (boxed) a run of `config` starts from, exactly as `init_state` draws them
  from config.seed: what fine-tuning 'step 0' of a run means, the no-pre-training control with
  the run's own config and tokenizer."""
  params_rng, _ = _state_rngs(jax.random.key(config.seed))
  return jax.jit(model.init, static_argnums=1)(params_rng, config.seq_len)


def init_state(model: RTDModel, optimizers, config, rng: jax.Array) -> TrainState:
  """A fresh state (parameters boxed with logical axis names; unbox before use)."""
  init_rng, run_rng = _state_rngs(rng)
  params = model.init(init_rng, config.seq_len)
  if "joint" in optimizers:
    opt_state = {"joint": optimizers["joint"].init(params)}
  else:
    opt_state = {name: optimizers[name].init(params[name]) for name in optimizers}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    rng=jax.random.key_data(run_rng))


# ------------------------------------------------------------------------------ micro-batching

def split_micro(x: jax.Array, num_micro: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...] with micro-batch i = rows i, i+M, ...

  Interleaving keeps every micro-batch spread over all data-parallel devices when the batch axis
  is block-sharded (device d holds a contiguous block of rows).
  """
  return x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)


def merge_micro(x: jax.Array) -> jax.Array:
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def micro_rows(index, num_micro: int) -> RowLayout:
  """Micro-batch `index` of `num_micro` holds global rows index, index + M, ... (split_micro)."""
  return RowLayout(jnp.asarray(index, jnp.int32), num_micro)


def accumulate(loss_fn: Callable, params, inputs: dict, num_micro: int):
  """Sum of gradients and aux outputs of loss_fn over micro-batches (lax.scan when M > 1).

  loss_fn(params, micro_inputs, rows: RowLayout) -> (loss, (sums: dict of scalars, outputs:
  dict of [b, ...])); `rows` says which global rows the micro-batch holds.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  micro = jax.tree.map(lambda x: split_micro(x, num_micro), inputs)
  if num_micro == 1:
    grads, (sums, outputs) = grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                     micro_rows(0, 1))
    return grads, sums, outputs

  def body(grad_sum, indexed):
    index, one = indexed
    grads, (sums, outputs) = grad_fn(params, one, micro_rows(index, num_micro))
    return jax.tree.map(jnp.add, grad_sum, grads), (sums, outputs)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (sums, outputs) = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
  sums = jax.tree.map(lambda s: jnp.sum(s, axis=0), sums)
  outputs = jax.tree.map(merge_micro, outputs)
  return grads, sums, outputs


def row_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
  """One key per row number: draws that do not depend on how the rows are batched."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)


def sample_rows(key, rows, logits, temperature):
  """Per-row sampling keys: the draw for a sequence does not depend on the micro-batch split."""
  return jax.vmap(lambda k, l: masking.sample_from_blocks(k, l, temperature))(
      row_keys(key, rows), logits)


# ------------------------------------------------------------------------------------- losses

def rtd_loss(model: RTDModel, params, replaced_ids, is_replaced, attention_mask, rng,
             rtd_count, rtd_lambda: float, deterministic: bool = False,
             rows: RowLayout | None = None):
  """lambda * mean BCE of the discriminator over non-pad tokens of the global batch."""
  logits = model.discriminator_logits(params, replaced_ids, attention_mask, rng, deterministic,
                                      rows)
  sums = losses.rtd_sums(logits, is_replaced, attention_mask)
  return rtd_lambda * sums["rtd_loss_sum"] / rtd_count, sums


def mlm_loss(model: RTDModel, generator_params, masked_ids, attention_mask, positions, labels,
             weights, rng, mlm_count, deterministic: bool = False, rows: RowLayout | None = None):
  logits = model.generator_logits(generator_params, masked_ids, attention_mask, positions, rng,
                                  deterministic, rows)
  sums = losses.mlm_sums(logits, labels, weights)
  return sums["mlm_loss_sum"] / mlm_count, (sums, logits)


# ---------------------------------------------------------------------------------- the step

def make_train_step(model: RTDModel, optimizers, config, tokens: SpecialTokens, num_micro: int):
  """Returns train_step(state, batch) -> (state, metrics); batch: input_ids, attention_mask."""
  rtd_lambda = float(config.rtd.rtd_lambda)
  temperature = float(config.rtd.temperature)
  mask_prob = float(config.rtd.mask_prob)
  deterministic = config.model.hidden_dropout == 0 and config.model.attention_dropout == 0
  skip_nonfinite = config.nonfinite == "skip"

  def update(name, grads, params, opt_state, ok):
    """(params, opt_state) after optimizer `name`'s update; with nonfinite='skip' an update
    whose loss or gradient is not finite (`ok` False) is dropped."""
    updates, new_opt_state = optimizers[name].update(grads, opt_state, params)
    new = (optax.apply_updates(params, updates), new_opt_state)
    if not skip_nonfinite:
      return new
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, (params, opt_state))

  def train_network(name, loss_fn, params, opt_state, inputs, loss_sum):
    """One network's update in a two-stage step: gradients accumulated over the micro-batches,
    then its optimizer. Returns (params, opt_state, sums, outputs, grad norm, finite)."""
    grads, sums, outputs = accumulate(loss_fn, params, inputs, num_micro)
    norm = optax.tree_utils.tree_norm(grads)
    ok = _finite(sums[loss_sum], norm)
    params, opt_state = update(name, grads, params, opt_state, ok)
    return params, opt_state, sums, outputs, norm, ok

  def prepare(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_mask, k_gen, k_sample, k_disc = jax.random.split(key, 4)
    ids, attention = batch["input_ids"], batch["attention_mask"]
    masked = masking.mask_tokens(k_mask, ids, attention, tokens.never_masked, tokens.mask_id,
                                 mask_prob)
    inputs = dict(ids=ids, attention_mask=attention, masked_ids=masked.input_ids,
                  positions=masked.positions, labels=masked.labels, weights=masked.weights,
                  rows=jnp.arange(ids.shape[0]))
    counts = (jnp.maximum(masked.weights.sum(), 1.0),
              jnp.maximum(attention.astype(jnp.float32).sum(), 1.0))
    return inputs, counts, (k_gen, k_sample, k_disc)

  def two_stage_step(state, batch):
    inputs, (mlm_count, rtd_count), (k_gen, k_sample, k_disc) = prepare(state, batch)

    def generator_loss(gen_params, mb, rows):
      loss, (sums, logits) = mlm_loss(
          model, gen_params, mb["masked_ids"], mb["attention_mask"], mb["positions"],
          mb["labels"], mb["weights"], k_gen, mlm_count, deterministic, rows)
      return loss, (sums, {"sampled": sample_rows(k_sample, mb["rows"], logits, temperature)})

    gen_params, gen_opt, gen_sums, outputs, gen_norm, gen_ok = train_network(
        "generator", generator_loss, state.params["generator"], state.opt_state["generator"],
        inputs, "mlm_loss_sum")

    replaced, is_replaced = masking.replace_tokens(
        inputs["ids"], inputs["positions"], inputs["weights"], outputs["sampled"])
    disc_inputs = dict(replaced=replaced, is_replaced=is_replaced,
                       attention_mask=inputs["attention_mask"])

    def discriminator_loss(disc_params, mb, rows):
      params = {"generator": gen_params, "discriminator": disc_params}
      loss, sums = rtd_loss(model, params, mb["replaced"], mb["is_replaced"],
                            mb["attention_mask"], k_disc, rtd_count, rtd_lambda, deterministic,
                            rows)
      return loss, (sums, {})

    disc_params, disc_opt, disc_sums, _, disc_norm, disc_ok = train_network(
        "discriminator", discriminator_loss, state.params["discriminator"],
        state.opt_state["discriminator"], disc_inputs, "rtd_loss_sum")

    new_state = state.replace(
        step=state.step + 1,
        params={"generator": gen_params, "discriminator": disc_params},
        opt_state={"generator": gen_opt, "discriminator": disc_opt})
    metrics = _metrics({**gen_sums, **disc_sums}, mlm_count, rtd_count, gen_norm, disc_norm)
    return new_state, _health(metrics, gen_ok & disc_ok, new_state.step)

  def joint_step(state, batch):
    inputs, (mlm_count, rtd_count), (k_gen, k_sample, k_disc) = prepare(state, batch)

    def joint_loss(params, mb, rows):
      gen_loss, (gen_sums, logits) = mlm_loss(
          model, params["generator"], mb["masked_ids"], mb["attention_mask"], mb["positions"],
          mb["labels"], mb["weights"], k_gen, mlm_count, deterministic, rows)
      sampled = sample_rows(k_sample, mb["rows"], logits, temperature)
      replaced, is_replaced = masking.replace_tokens(mb["ids"], mb["positions"], mb["weights"],
                                                     sampled)
      disc_loss, disc_sums = rtd_loss(model, params, replaced, is_replaced, mb["attention_mask"],
                                      k_disc, rtd_count, rtd_lambda, deterministic, rows)
      return gen_loss + disc_loss, ({**gen_sums, **disc_sums}, {})

    grads, sums, _ = accumulate(joint_loss, state.params, inputs, num_micro)
    gen_norm = optax.tree_utils.tree_norm(grads["generator"])
    disc_norm = optax.tree_utils.tree_norm(grads["discriminator"])
    ok = _finite(sums["mlm_loss_sum"], sums["rtd_loss_sum"], gen_norm, disc_norm)
    params, opt = update("joint", grads, state.params, state.opt_state["joint"], ok)
    new_state = state.replace(step=state.step + 1, params=params, opt_state={"joint": opt})
    metrics = _metrics(sums, mlm_count, rtd_count, gen_norm, disc_norm)
    return new_state, _health(metrics, ok, new_state.step)

  return two_stage_step if "joint" not in optimizers else joint_step


def _finite(*values) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(v) for v in values]))


def _health(metrics: dict, ok: jax.Array, step: jax.Array) -> dict:
  """Adds `skipped` (1 when the step's loss or gradient was not finite) and
  `first_nonfinite_step` (that step's number, +inf when finite; reduced with min over steps).
  The other metrics of a non-finite step are zeroed so that averages over the finite ones stay
  readable when such steps are skipped."""
  out = {k: jnp.where(ok, v, 0.0) for k, v in metrics.items()}
  out["skipped"] = 1.0 - ok.astype(jnp.float32)
  out["first_nonfinite_step"] = jnp.where(ok, jnp.inf, step.astype(jnp.float32))
  return out


def _metrics(sums, mlm_count, rtd_count, generator_grad_norm, discriminator_grad_norm) -> dict:
  return {
      "generator_grad_norm": generator_grad_norm,
      "discriminator_grad_norm": discriminator_grad_norm,
      "mlm_loss": sums["mlm_loss_sum"] / mlm_count,
      "mlm_accuracy": sums["mlm_correct"] / mlm_count,
      "rtd_loss": sums["rtd_loss_sum"] / rtd_count,
      "rtd_accuracy": sums["rtd_correct"] / rtd_count,
      "replaced_fraction": sums["replaced_sum"] / mlm_count,
  }

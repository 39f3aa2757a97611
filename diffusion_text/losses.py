"""Training objectives for embedding diffusion.

Each loss has the signature `loss(model, params, schedule, tokens_bt, mask_bt, rng, *,
self_cond_prob, train, cond_drop_prob=0.0) -> (loss, terms)` where `terms` maps names to
scalars that the trainer logs (every term of the objective, plus the loss split by diffusion
time). Losses are looked up by name (`loss.name`); register your own with
`registry.register("loss", name)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusion_text import registry
from diffusion_text import samplers
from diffusion_text import sde as sde_lib
from diffusion_text.data.tokenizer import BOS_ID
from diffusion_text.models.autoregressive import shift_right

NUM_TIME_BINS = 4  # Loss is also reported for t in [0, 1/4), [1/4, 1/2), ...
_CONDITION_STREAM = 0x636F6E64  # fold_in tag for the random conditions of a conditional model


def stratified_times(rng: jax.Array, batch: int, t_min: float) -> jax.Array:
  """Times in [t_min, 1], one per example, from a single uniform shifted over batch strata.

  t_i = t_min + (1 - t_min) ((u + i / batch) mod 1): each is uniform, and together they cover
  [t_min, 1] evenly, which lowers the variance of the batch loss (VDM's low-discrepancy sampler).
  """
  u = jax.random.uniform(rng, ())
  return t_min + (1.0 - t_min) * jnp.mod(u + jnp.arange(batch) / batch, 1.0)


def masked_mean(values_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  return jnp.sum(values_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def loss_by_time(values_bt, mask_bt, t_b) -> dict[str, jax.Array]:
  """Masked mean of values_bt within each time bin (NaN where a bin is empty)."""
  bin_b = jnp.minimum((t_b * NUM_TIME_BINS).astype(jnp.int32), NUM_TIME_BINS - 1)
  per_example_b = jnp.sum(values_bt * mask_bt, axis=1)
  count_b = jnp.sum(mask_bt, axis=1)
  out = {}
  for k in range(NUM_TIME_BINS):
    in_bin = bin_b == k
    total = jnp.sum(jnp.where(in_bin, per_example_b, 0.0))
    count = jnp.sum(jnp.where(in_bin, count_b, 0.0))
    out[f"loss_by_t/{k / NUM_TIME_BINS:.2f}"] = jnp.where(count > 0, total / count, jnp.nan)
  return out


def random_condition(rng, x0_btl, drop_prob: float) -> jax.Array:
  """Condition features (`samplers.condition_features`) of random fixed tokens per example.

  Half of the examples fix a prefix of uniform length in [0, length), the other half fix each
  position with a probability drawn uniformly from [0, 1). With probability `drop_prob` an
  example's condition is dropped (all zeros), which trains the unconditional model that
  classifier-free guidance needs.
  """
  batch, length = x0_btl.shape[:2]
  rng_kind, rng_len, rng_rate, rng_pos, rng_drop = jax.random.split(rng, 5)
  prefix_len_b = jax.random.randint(rng_len, (batch, 1), 0, length)
  prefix_bt = jnp.arange(length)[None, :] < prefix_len_b
  rate_b1 = jax.random.uniform(rng_rate, (batch, 1))
  scattered_bt = jax.random.uniform(rng_pos, (batch, length)) < rate_b1
  use_prefix_b1 = jax.random.bernoulli(rng_kind, 0.5, (batch, 1))
  keep_b1 = ~jax.random.bernoulli(rng_drop, drop_prob, (batch, 1))
  fixed_bt = jnp.where(use_prefix_b1, prefix_bt, scattered_bt) & keep_b1
  return samplers.condition_features(x0_btl, fixed_bt)


def noisy_logits(model, params, schedule, x0_btl, t_b, rng, *, self_cond_prob, mask_bt, train,
                 cond_btc=None):
  """Noise x0 to time t and return the network's logits.

  With probability `self_cond_prob` (one draw per batch) a first pass's stop-gradient x0_hat is
  fed back, as at sampling time. `cond_btc` is the condition input of a conditional model
  (None: no condition).
  """
  rng_eps, rng_self, rng_drop1, rng_drop2 = jax.random.split(rng, 4)
  eps_btl = jax.random.normal(rng_eps, x0_btl.shape, x0_btl.dtype)
  z_btl = sde_lib.sample_marginal(schedule, x0_btl, t_b, eps_btl)
  log_snr_b = schedule.log_snr(t_b)

  def denoise(x0_self_btl, rng_drop):
    return model.apply({"params": params}, z_btl, log_snr_b, x0_self_btl, mask_bt, not train,
                       cond_btc, method=model.denoise, rngs={"dropout": rng_drop})

  zeros_btl = jnp.zeros_like(x0_btl)
  if self_cond_prob <= 0.0:
    return denoise(zeros_btl, rng_drop2)

  def with_self_cond():
    first_btv = denoise(zeros_btl, rng_drop1)
    return jax.lax.stop_gradient(model.apply({"params": params}, first_btv, method=model.interpolate))

  use_self = jax.random.bernoulli(rng_self, self_cond_prob)
  x0_self_btl = jax.lax.cond(use_self, with_self_cond, lambda: zeros_btl)
  return denoise(x0_self_btl, rng_drop2)


def _training_condition(model, rng, x0_btl, cond_drop_prob):
  """Random condition for a conditional model; None (no condition input) otherwise.

  The condition's stream is folded out of `rng`, so unconditional models draw exactly the
  random numbers they drew before conditioning existed.
  """
  if not getattr(getattr(model, "cfg", None), "conditional", False):
    return None
  rng_cond = jax.random.fold_in(rng, _CONDITION_STREAM)
  return random_condition(rng_cond, jax.lax.stop_gradient(x0_btl), cond_drop_prob)


@registry.register("loss", "ce")
def cross_entropy_loss(model, params, schedule, tokens_bt, mask_bt, rng, *, self_cond_prob,
                       train, cond_drop_prob=0.0):
  """Cross-entropy of the clean token given z_t, with t uniform (score interpolation, CDCD).

  loss = E_t E_{z_t ~ q(z_t | x0)} [ -log p_theta(w | z_t) ], averaged over real positions.
  """
  rng_t, rng_noise = jax.random.split(rng)
  t_b = stratified_times(rng_t, tokens_bt.shape[0], schedule.t_min)
  x0_btl = model.apply({"params": params}, tokens_bt, method=model.embed)
  cond_btc = _training_condition(model, rng, x0_btl, cond_drop_prob)
  logits_btv = noisy_logits(model, params, schedule, x0_btl, t_b, rng_noise,
                            self_cond_prob=self_cond_prob, mask_bt=mask_bt, train=train,
                            cond_btc=cond_btc)
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt)
  loss = masked_mean(ce_bt, mask_bt)
  terms = {"ce": loss, **loss_by_time(ce_bt, mask_bt, t_b)}
  return loss, terms


@registry.register("loss", "x0_mse")
def x0_mse_loss(model, params, schedule, tokens_bt, mask_bt, rng, *, self_cond_prob, train,
                cond_drop_prob=0.0):
  """Diffusion-LM style: ||x0_hat - x0||^2 per dimension at uniform t, plus a rounding term.

  The rounding term is the cross-entropy of the clean token given z at t_min, the same quantity
  as the reconstruction term of the likelihood bound. It keeps the embeddings decodable.
  """
  rng_t, rng_noise, rng_round = jax.random.split(rng, 3)
  batch = tokens_bt.shape[0]
  t_b = stratified_times(rng_t, batch, schedule.t_min)
  x0_btl = model.apply({"params": params}, tokens_bt, method=model.embed)
  cond_btc = _training_condition(model, rng, x0_btl, cond_drop_prob)
  logits_btv = noisy_logits(model, params, schedule, x0_btl, t_b, rng_noise,
                            self_cond_prob=self_cond_prob, mask_bt=mask_bt, train=train,
                            cond_btc=cond_btc)
  x0_hat_btl = model.apply({"params": params}, logits_btv, method=model.interpolate)
  mse_bt = jnp.mean((x0_hat_btl - x0_btl) ** 2, axis=-1)

  t_min_b = jnp.full((batch,), schedule.t_min)
  round_logits_btv = noisy_logits(model, params, schedule, x0_btl, t_min_b, rng_round,
                                  self_cond_prob=0.0, mask_bt=mask_bt, train=train,
                                  cond_btc=cond_btc)
  rounding_bt = optax.softmax_cross_entropy_with_integer_labels(round_logits_btv, tokens_bt)

  mse, rounding = masked_mean(mse_bt, mask_bt), masked_mean(rounding_bt, mask_bt)
  terms = {"x0_mse": mse, "rounding": rounding, **loss_by_time(mse_bt, mask_bt, t_b)}
  return mse + rounding, terms


@registry.register("loss", "next_token")
def next_token_loss(model, params, schedule, tokens_bt, mask_bt, rng, *, self_cond_prob, train,
                    cond_drop_prob=0.0):
  """Autoregressive baseline: cross-entropy of each token given the tokens before it.

  The diffusion arguments (`schedule`, `self_cond_prob`, `cond_drop_prob`) are accepted so that
  the trainer calls every loss alike, and ignored.
  """
  del schedule, self_cond_prob, cond_drop_prob
  logits_btv = model.apply({"params": params}, shift_right(tokens_bt, BOS_ID), mask_bt, not train,
                           rngs={"dropout": rng})
  nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt)
  loss = masked_mean(nll_bt, mask_bt)
  return loss, {"nll": loss}


next_token_loss.model_kind = "ar"  # Experiment checks that the model is autoregressive.

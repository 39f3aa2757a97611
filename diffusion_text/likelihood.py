"""Continuous-time variational bound on the negative log-likelihood, in bits per token.

For tokens w with clean latent x0 = E[w] and q(z_t | x0) = N(alpha_t x0, sigma_t^2 I),

    -log p(w) <= KL(q(z_1 | x0) || N(0, I))                                       prior
               + 1/2 int_{t_min}^1 (-dlambda/dt) exp(lambda_t) E ||x0 - x0_hat(z_t, t)||^2 dt
                                                                                  diffusion
               + E_{z ~ q(z_{t_min} | x0)} [-log p(w | z)]                        reconstruction

(VDM's bound written for x0-prediction: ||eps - eps_hat||^2 = exp(lambda) ||x0 - x0_hat||^2).
The diffusion integral is estimated with one t per sequence, t uniform on [t_min, 1], the times
of a batch spread by one shared uniform draw (the low-discrepancy sampler of `losses`), so
its integrand is multiplied by (1 - t_min). The network runs without self-conditioning (its
self-conditioning input is zeros); docs/math.md explains why that is the model that is bounded.

`elbo_terms` returns per-sequence sums in nats, and `summarize` turns many of them into bits per
token with standard errors.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_text import losses
from diffusion_text import sde as sde_lib

Array = jax.Array
TERMS = ("prior", "diffusion", "reconstruction")


def diffusion_weight(schedule, t: Array) -> Array:
  """Weight of ||x0 - x0_hat||^2 in the diffusion integrand: 1/2 (-dlambda/dt) exp(lambda_t)."""
  return 0.5 * -schedule.dlog_snr_dt(t) * jnp.exp(schedule.log_snr(t))


def elbo_terms(denoise: Callable[[Array, Array], Array], interpolate: Callable[[Array], Array],
               schedule, x0_btl: Array, tokens_bt: Array, mask_bt: Array,
               rng: Array) -> dict[str, Array]:
  """Estimate each term of the bound once (Monte Carlo), summed over each sequence's tokens.

  `denoise(z [b, l, d], t [b]) -> logits [b, l, v]` is the network without self-conditioning.
  Returns a dict of [batch] arrays in nats: "prior", "diffusion", "reconstruction", and
  "tokens", the number of real (mask = 1) tokens of each sequence.
  """
  batch = x0_btl.shape[0]
  rng_t, rng_eps, rng_eps_min = jax.random.split(rng, 3)
  mask_bt = mask_bt.astype(x0_btl.dtype)

  prior_bt = sde_lib.prior_kl(x0_btl, schedule)

  t_b = losses.stratified_times(rng_t, batch, schedule.t_min).astype(x0_btl.dtype)
  eps_btl = jax.random.normal(rng_eps, x0_btl.shape, x0_btl.dtype)
  z_btl = sde_lib.sample_marginal(schedule, x0_btl, t_b, eps_btl)
  x0_hat_btl = interpolate(denoise(z_btl, t_b))
  error_bt = jnp.sum((x0_btl - x0_hat_btl) ** 2, axis=-1)
  weight_b = (1.0 - schedule.t_min) * diffusion_weight(schedule, t_b)
  diffusion_bt = weight_b[:, None] * error_bt

  t_min_b = jnp.full((batch,), schedule.t_min, x0_btl.dtype)
  eps_min_btl = jax.random.normal(rng_eps_min, x0_btl.shape, x0_btl.dtype)
  z_min_btl = sde_lib.sample_marginal(schedule, x0_btl, t_min_b, eps_min_btl)
  reconstruction_bt = optax.softmax_cross_entropy_with_integer_labels(
      denoise(z_min_btl, t_min_b), tokens_bt)

  per_sequence = lambda values_bt: jnp.sum(values_bt * mask_bt, axis=1)
  return {"prior": per_sequence(prior_bt), "diffusion": per_sequence(diffusion_bt),
          "reconstruction": per_sequence(reconstruction_bt), "tokens": jnp.sum(mask_bt, axis=1)}


def summarize(per_sequence: dict[str, np.ndarray],
              terms: tuple[str, ...] = TERMS) -> dict[str, float]:
  """Bits per token of each term and of their sum, each with its standard error.

  `per_sequence` contains 1-D arrays, one entry per sequence, of summed nats (several estimates
  of one sequence may be averaged first). Each figure is a ratio sum(nats) / sum(tokens). Its
  standard error is the usual ratio-estimator one, treating sequences as independent draws.
  NOTE: the times of a batch are stratified, so this error slightly overstates the true one.
  """
  tokens = np.asarray(per_sequence["tokens"], np.float64)
  n = tokens.size
  if n < 2:
    raise ValueError(f"a standard error needs at least 2 sequences, got {n}")
  values = {term: np.asarray(per_sequence[term], np.float64) for term in terms}
  values["total"] = sum(values[term] for term in terms)

  out: dict[str, float] = {"sequences": n, "tokens": float(tokens.sum())}
  for name, nats in values.items():
    ratio = nats.sum() / tokens.sum()
    residual = nats - ratio * tokens
    stderr = math.sqrt(np.sum(residual**2) / (n * (n - 1))) / tokens.mean()
    out[f"{name}_bits_per_token"] = ratio / math.log(2.0)
    out[f"{name}_stderr"] = stderr / math.log(2.0)
  return out

"""Variance-preserving SDE and its noise schedules.

The forward process is dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW on t in [t_min, 1], whose
marginal is q(z_t | x0) = N(alpha_t x0, sigma_t^2 I) with

    alpha_t = exp(-1/2 int_0^t beta(s) ds),   sigma_t^2 = 1 - alpha_t^2,
    lambda_t = log(alpha_t^2 / sigma_t^2)     (log signal-to-noise ratio, decreasing in t).

Every schedule is written in terms of lambda(t), from which the rest follows:
alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t) and
beta(t) = -d/dt log alpha_t^2 = -sigmoid(-lambda_t) * dlambda/dt.
Each schedule also inverts lambda -> t, which samplers that step in log-SNR need.

Schedules are small frozen dataclasses of floats, so they are static under `jax.jit` and can be
looked up by name from the config (`sde.schedule`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Protocol

import jax
import jax.numpy as jnp

from diffusion_text import registry

Array = jax.Array


class Schedule(Protocol):
  """Interface shared by all noise schedules; `t` and `lam` are arrays of any shape."""

  t_min: float

  def log_snr(self, t: Array) -> Array: ...

  def dlog_snr_dt(self, t: Array) -> Array: ...

  def t_from_log_snr(self, lam: Array) -> Array: ...


def alpha(schedule: Schedule, t: Array) -> Array:
  """Signal scale alpha_t = sqrt(sigmoid(lambda_t))."""
  return jnp.sqrt(jax.nn.sigmoid(schedule.log_snr(t)))


def sigma(schedule: Schedule, t: Array) -> Array:
  """Noise scale sigma_t = sqrt(sigmoid(-lambda_t)), so alpha_t^2 + sigma_t^2 = 1."""
  return jnp.sqrt(jax.nn.sigmoid(-schedule.log_snr(t)))


def beta(schedule: Schedule, t: Array) -> Array:
  """Diffusion rate beta(t) = -sigmoid(-lambda_t) * dlambda/dt (>= 0)."""
  return -jax.nn.sigmoid(-schedule.log_snr(t)) * schedule.dlog_snr_dt(t)


def marginal(schedule: Schedule, x0: Array, t: Array) -> tuple[Array, Array]:
  """Return (alpha_t, sigma_t) broadcast against x0 [batch, ...] for t [batch]."""
  shape = (-1,) + (1,) * (x0.ndim - 1)
  return alpha(schedule, t).reshape(shape), sigma(schedule, t).reshape(shape)


def sample_marginal(schedule: Schedule, x0: Array, t: Array, eps: Array) -> Array:
  """Draw z_t = alpha_t x0 + sigma_t eps from q(z_t | x0), for given standard normal eps."""
  a, s = marginal(schedule, x0, t)
  return a * x0 + s * eps


@dataclasses.dataclass(frozen=True)
class LinearBeta:
  """beta(t) = beta_min + t (beta_max - beta_min), as in DDPM and score_sde.

  With B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2, alpha_t^2 = exp(-B(t))
  and lambda_t = -log(expm1(B(t))).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = 1e-4

  def integral(self, t: Array) -> Array:
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

  def log_snr(self, t: Array) -> Array:
    return -_log_expm1(self.integral(t))

  def dlog_snr_dt(self, t: Array) -> Array:
    # d/dt [-log(expm1(B))] = -beta(t) / (1 - exp(-B)).
    rate = self.beta_min + (self.beta_max - self.beta_min) * t
    return -rate / -jnp.expm1(-self.integral(t))

  def t_from_log_snr(self, lam: Array) -> Array:
    # Solve B(t) = log(1 + exp(-lambda)) = softplus(-lambda) for t >= 0.
    b = jax.nn.softplus(-lam)
    slope = self.beta_max - self.beta_min
    if slope == 0.0:
      return b / self.beta_min
    # Written to avoid cancellation: t = 2b / (beta_min + sqrt(beta_min^2 + 2 slope b)).
    return 2.0 * b / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * slope * b))


@dataclasses.dataclass(frozen=True)
class Cosine:
  """Cosine schedule written in log-SNR: lambda(t) = -2 log tan(a t + b).

  a and b are chosen so that lambda(0) = log_snr_max and lambda(1) = log_snr_min; with the
  defaults alpha_1^2 = sigmoid(-10) ~ 4.5e-5, so the prior N(0, I) is nearly exact at t = 1,
  and beta(t) stays finite on [0, 1] (the unclipped cosine schedule has beta(1) = infinity).
  Since alpha_0^2 = sigmoid(log_snr_max) < 1, the marginals are those of the SDE started at t = 0
  from x0 already noised to that level (VDM truncates its schedules the same way).
  """

  log_snr_min: float = -10.0
  log_snr_max: float = 10.0
  t_min: float = 1e-4

  @property
  def _b(self) -> float:
    return math.atan(math.exp(-0.5 * self.log_snr_max))

  @property
  def _a(self) -> float:
    return math.atan(math.exp(-0.5 * self.log_snr_min)) - self._b

  def log_snr(self, t: Array) -> Array:
    return -2.0 * jnp.log(jnp.tan(self._a * t + self._b))

  def dlog_snr_dt(self, t: Array) -> Array:
    # d/dt [-2 log tan(u)] = -2 a / (sin u cos u) = -4 a / sin(2u).
    return -4.0 * self._a / jnp.sin(2.0 * (self._a * t + self._b))

  def t_from_log_snr(self, lam: Array) -> Array:
    return (jnp.arctan(jnp.exp(-0.5 * lam)) - self._b) / self._a


@dataclasses.dataclass(frozen=True)
class LogLinear:
  """lambda(t) falls linearly from log_snr_max at t = 0 to log_snr_min at t = 1.

  Uniform t then means uniform log-SNR, so training time is spread evenly over noise levels
  instead of piling up at both ends as under the cosine schedule. beta(t) =
  sigmoid(-lambda_t) (log_snr_max - log_snr_min) is bounded, which keeps few-step samplers
  stable near t = 1.
  """

  log_snr_min: float = -12.0
  log_snr_max: float = 3.0
  t_min: float = 1e-4

  def log_snr(self, t: Array) -> Array:
    return self.log_snr_max + (self.log_snr_min - self.log_snr_max) * t

  def dlog_snr_dt(self, t: Array) -> Array:
    return jnp.full_like(t, self.log_snr_min - self.log_snr_max)

  def t_from_log_snr(self, lam: Array) -> Array:
    return (lam - self.log_snr_max) / (self.log_snr_min - self.log_snr_max)


def _log_expm1(x: Array) -> Array:
  """log(exp(x) - 1), accurate for small and large x."""
  return jnp.where(x > 20.0, x, jnp.log(jnp.expm1(jnp.minimum(x, 20.0))))


registry.register("schedule", "linear")(LinearBeta)
registry.register("schedule", "cosine")(Cosine)
registry.register("schedule", "log_linear")(LogLinear)


def make_schedule(sde_config) -> Schedule:
  """Build the schedule named by `sde_config.schedule` (see `diffusion_text.registry`).

  The factory receives the fields of `sde_config` that its signature names.
  """
  factory = registry.get("schedule", sde_config.schedule)
  fields = {f.name for f in dataclasses.fields(factory)} if dataclasses.is_dataclass(factory) \
      else set(inspect.signature(factory).parameters)
  return factory(**{k: v for k, v in sde_config.items() if k in fields})


def prior_kl(x0: Array, schedule: Schedule) -> Array:
  """KL(q(z_1 | x0) || N(0, I)) in nats, summed over the last axis; x0 [..., dim]."""
  lam_1 = schedule.log_snr(jnp.ones((), x0.dtype))
  a2 = jax.nn.sigmoid(lam_1)
  # sigma^2 - 1 - log(sigma^2) = -alpha^2 - log(1 - alpha^2), written without cancellation.
  per_dim = -a2 + jax.nn.softplus(lam_1)
  return 0.5 * jnp.sum(a2 * x0**2, axis=-1) + 0.5 * x0.shape[-1] * per_dim

"""Samplers for the reverse process, built on x0_hat, eps_hat and score_hat only.

A sampler is a `Sampler` registered by name (`sample.sampler`). Its step function

    step(schedule, z, t, t_next, x0_hat, rng, is_last, history, predict) -> (z_next, history)

moves z [batch, length, embed_dim] from time t to t_next < t, given the denoiser's x0_hat at
(z, t). `history` is a fixed-shape record of earlier predictions for multistep solvers, and
`predict(z, t, x0_self) -> x0_hat` runs the denoiser once more for solvers that need a second
evaluation per step (Heun).

`integrate` runs the steps inside `lax.scan` on a time grid from exactly t = 1 to exactly t_min,
feeding each x0_hat back for self-conditioning. It also keeps fixed (conditioning) positions on
their noised clean embeddings, applies classifier-free guidance and optionally clamps x0_hat to
the nearest embedding row. `generate` then rounds the final latent to tokens with one more
network call at t_min. `nfe` counts the network evaluations of a run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from diffusion_text import registry
from diffusion_text import sde as sde_lib

Array = jax.Array

GRIDS = ("t", "log_snr")
ROUNDINGS = ("argmax", "sample")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A step function with its cost and the number of earlier x0_hat it keeps."""

  step: Callable[..., tuple[Array, dict]]
  evals_per_step: int = 1
  history_size: int = 0


def register_sampler(name: str, *, evals_per_step: int = 1, history_size: int = 0):
  """Decorator: register a step function as sampler `name`."""
  def add(step):
    registry.register("sampler", name)(Sampler(step, evals_per_step, history_size))
    return step
  return add


def nfe(sampler: str, steps: int, guided: bool = False) -> int:
  """Network evaluations of `generate`: every step, plus the rounding pass at t_min.

  Guidance runs the network with and without the condition, which doubles the count.
  """
  spec = registry.get("sampler", sampler)
  calls = steps * spec.evals_per_step + 1
  return 2 * calls if guided else calls


# -- time grids ---------------------------------------------------------------------------------

def time_grid(steps: int, t_min: float, schedule=None, grid: str = "t",
              dtype=jnp.float32) -> Array:
  """Return steps + 1 decreasing times, exactly 1 first and exactly t_min last.

  `grid="t"` spaces the times evenly in t; `grid="log_snr"` spaces them evenly in lambda_t,
  which needs the schedule's inverse `t_from_log_snr`.
  """
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  if grid not in GRIDS:
    raise ValueError(f"grid={grid!r} is not one of {GRIDS}")
  fraction = jnp.arange(steps, -1, -1, dtype=dtype) / steps  # 1, ..., 0
  if grid == "t":
    times = t_min + (1.0 - t_min) * fraction
  else:
    if schedule is None:
      raise ValueError("grid='log_snr' needs the schedule")
    lam_end = schedule.log_snr(jnp.asarray([1.0, t_min], dtype))
    lam = lam_end[1] + (lam_end[0] - lam_end[1]) * fraction
    times = schedule.t_from_log_snr(lam)
  return times.at[0].set(1.0).at[-1].set(t_min)


# -- single steps -------------------------------------------------------------------------------

def eps_and_score(schedule, z, t, x0_hat) -> tuple[Array, Array]:
  """eps_hat = (z - alpha_t x0_hat) / sigma_t and score_hat = -eps_hat / sigma_t."""
  a, s = sde_lib.alpha(schedule, t), sde_lib.sigma(schedule, t)
  eps_hat = (z - a * x0_hat) / s
  return eps_hat, -eps_hat / s


def _ode_drift(schedule, z, t, x0_hat):
  """Probability-flow ODE velocity dz/dt = -1/2 beta(t) (z + score_hat)."""
  _, score = eps_and_score(schedule, z, t, x0_hat)
  return -0.5 * sde_lib.beta(schedule, t) * (z + score)


@register_sampler("euler_maruyama")
def euler_maruyama_step(schedule, z, t, t_next, x0_hat, rng, is_last, history, predict):
  """Reverse SDE dz = [-1/2 beta z - beta score] dt + sqrt(beta) dW, stepped backwards.

  The last step adds no noise, so the final latent is the drift's prediction (score_sde's
  "noise removal"), which the rounding pass at t_min then decodes.
  """
  del predict
  dt = t - t_next
  b = sde_lib.beta(schedule, t)
  _, score = eps_and_score(schedule, z, t, x0_hat)
  mean = z + (0.5 * b * z + b * score) * dt
  noise = jax.random.normal(rng, z.shape, z.dtype) * jnp.sqrt(b * dt)
  return jnp.where(is_last, mean, mean + noise), history


@register_sampler("ode_euler")
def ode_euler_step(schedule, z, t, t_next, x0_hat, rng, is_last, history, predict):
  """Probability-flow ODE dz/dt = -1/2 beta (z + score), one Euler step backwards."""
  del rng, is_last, predict
  return z + (t_next - t) * _ode_drift(schedule, z, t, x0_hat), history


@register_sampler("ode_heun", evals_per_step=2)
def ode_heun_step(schedule, z, t, t_next, x0_hat, rng, is_last, history, predict):
  """Probability-flow ODE, Heun's second-order step: an Euler predictor at t_next, then the
  trapezoidal rule on the two velocities. Costs a second network call at (z_euler, t_next)."""
  del rng, is_last
  dt = t_next - t
  velocity = _ode_drift(schedule, z, t, x0_hat)
  z_euler = z + dt * velocity
  x0_euler = predict(z_euler, t_next, x0_hat)
  velocity_next = _ode_drift(schedule, z_euler, t_next, x0_euler)
  return z + 0.5 * dt * (velocity + velocity_next), history


@register_sampler("ddpm")
def ddpm_step(schedule, z, t, t_next, x0_hat, rng, is_last, history, predict):
  """Ancestral step: draw z_s from the exact Gaussian posterior q(z_s | z_t, x0 = x0_hat), s < t.

  With r = exp(lambda_t - lambda_s) = SNR_t / SNR_s < 1:
      mean = r (alpha_s / alpha_t) z_t + alpha_s (1 - r) x0_hat,   var = (1 - r) sigma_s^2.
  The last step returns the mean.
  """
  del predict
  lam_t, lam_s = schedule.log_snr(t), schedule.log_snr(t_next)
  ratio = jnp.exp(lam_t - lam_s)
  one_minus_ratio = -jnp.expm1(lam_t - lam_s)
  a_t, a_s = sde_lib.alpha(schedule, t), sde_lib.alpha(schedule, t_next)
  mean = ratio * (a_s / a_t) * z + a_s * one_minus_ratio * x0_hat
  std = jnp.sqrt(one_minus_ratio) * sde_lib.sigma(schedule, t_next)
  noise = jax.random.normal(rng, z.shape, z.dtype) * std
  return jnp.where(is_last, mean, mean + noise), history


def _dpm_solver_pp_step(order: int):
  """DPM-Solver++ multistep of the given order (Lu et al. 2022, data prediction).

  Time is the half log-SNR l = lambda / 2 = log(alpha / sigma) and h = l_next - l > 0. With
  phi_1 = expm1(-h), phi_2 = phi_1 / h + 1 and phi_3 = phi_2 / h - 1/2, the update is

      z_next = (sigma_next / sigma) z - alpha_next phi_1 D0 + alpha_next phi_2 D1
               - alpha_next phi_3 D2,

  where D0 = x0_hat and D1, D2 are divided differences of the last x0_hat. Order 2 uses
  D1 = (D0 - x0_prev) / r0 / 2 folded into the phi_1 term, as the published 2M solver does.
  The first steps use the highest order their history allows (1, then 2, then 3).
  """

  def step(schedule, z, t, t_next, x0_hat, rng, is_last, history, predict):
    del rng, is_last, predict
    l_t, l_next = 0.5 * schedule.log_snr(t), 0.5 * schedule.log_snr(t_next)
    h = l_next - l_t
    scale = sde_lib.sigma(schedule, t_next) / sde_lib.sigma(schedule, t)
    a_next = sde_lib.alpha(schedule, t_next)
    phi_1 = jnp.expm1(-h)
    x0_prev, l_prev = history["x0"], history["half_log_snr"]

    def first():
      return scale * z - a_next * phi_1 * x0_hat

    def second():
      r0 = (l_t - l_prev[0]) / h
      d1 = (x0_hat - x0_prev[0]) / r0
      return scale * z - a_next * phi_1 * (x0_hat + 0.5 * d1)

    def third():
      r0 = (l_t - l_prev[0]) / h
      r1 = (l_prev[0] - l_prev[1]) / h
      d1_0 = (x0_hat - x0_prev[0]) / r0
      d1_1 = (x0_prev[0] - x0_prev[1]) / r1
      d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi_2 = phi_1 / h + 1.0
      phi_3 = phi_2 / h - 0.5
      return scale * z - a_next * phi_1 * x0_hat + a_next * phi_2 * d1 - a_next * phi_3 * d2

    branches = [first, second, third][:order]
    z_next = jax.lax.switch(jnp.minimum(history["count"], order - 1), branches)

    if order > 1:
      history = {"x0": jnp.concatenate([x0_hat[None], x0_prev[:-1]], axis=0),
                 "half_log_snr": jnp.concatenate([l_t[None], l_prev[:-1]]),
                 "count": history["count"] + 1}
    return z_next, history

  return step


for _order in (1, 2, 3):
  register_sampler(f"dpm_solver_pp_{_order}", history_size=_order - 1)(_dpm_solver_pp_step(_order))


# -- the driver ---------------------------------------------------------------------------------

# (z [b, l, d], t [b], x0_self [b, l, d]) -> logits [b, l, v]; a conditional model also takes
# cond [b, l, d + 1] as a fourth argument (see `condition_features`).
DenoiseFn = Callable[..., Array]
# logits [b, l, v] -> x0_hat [b, l, d]
InterpolateFn = Callable[[Array], Array]


class Condition(NamedTuple):
  """Positions the user fixes: `tokens` [batch, length] where `mask` [batch, length] is True."""

  tokens: Array
  mask: Array


def condition_features(x0_btl: Array, mask_bt: Array) -> Array:
  """Network input for a condition: [mask * x0, mask] [batch, length, embed_dim + 1].

  All zeros means "no condition", which is how the condition is dropped for guidance.
  """
  mask_bl1 = mask_bt[..., None].astype(x0_btl.dtype)
  return jnp.concatenate([x0_btl * mask_bl1, mask_bl1], axis=-1)


def clamp_to_table(x0_btl: Array, table_vd: Array) -> Array:
  """Replace every vector by its nearest row of the embedding table (Diffusion-LM's clamping)."""
  dist_btv = (jnp.sum(x0_btl**2, -1, keepdims=True) - 2.0 * x0_btl @ table_vd.T
              + jnp.sum(table_vd**2, -1))
  return jnp.take(table_vd, jnp.argmin(dist_btv, axis=-1), axis=0)


class Latent(NamedTuple):
  z: Array  # final latent at t_min [b, l, d]
  x0_hat: Array  # the last step's x0_hat [b, l, d], fed to the rounding pass


def integrate(denoise: DenoiseFn, interpolate: InterpolateFn, schedule, rng: Array, *,
              shape: tuple[int, int, int], sampler: str, steps: int, **options) -> Latent:
  """Run the reverse process from N(0, I) at t = 1 down to t_min; see `_reverse`."""
  latent, _ = _reverse(denoise, interpolate, schedule, rng, shape=shape, sampler=sampler,
                       steps=steps, **options)
  return latent


def _reverse(denoise: DenoiseFn, interpolate: InterpolateFn, schedule, rng: Array, *,
             shape: tuple[int, int, int], sampler: str, steps: int, grid: str = "t",
             table: Array | None = None, clamp: bool = False,
             condition: Condition | None = None, guidance: float | None = None,
             dtype=jnp.float32) -> tuple[Latent, Callable[[Array, Array, Array], Array]]:
  """Run the reverse process; return the final `Latent` and the network call it used,
  `predict_logits(z, t, x0_self) -> logits`, for the rounding pass.

  `condition` fixes tokens: at every network call their positions hold
  alpha_t E[token] + sigma_t eps, where eps is the initial noise of that position, so a fixed
  position follows the forward process's own path. `guidance` (None: no guidance) mixes the
  network's log-probabilities with and without the condition, log p_u + w (log p_c - log p_u),
  so w = 0 is the unconditional network and w = 1 the conditional one. `table` [vocab, d] is
  needed for `condition` and `clamp`.
  """
  spec = registry.get("sampler", sampler)
  batch = shape[0]
  times = time_grid(steps, schedule.t_min, schedule, grid, dtype)
  rng_init, rng_steps = jax.random.split(rng)
  z_init = jax.random.normal(rng_init, shape, dtype)
  if (condition is not None or clamp) and table is None:
    raise ValueError("conditioning and clamping need the embedding table")

  if condition is not None:
    x0_fixed = jnp.take(table, condition.tokens, axis=0).astype(dtype)
    mask_bl1 = condition.mask[..., None].astype(bool)
    cond_on = condition_features(x0_fixed, condition.mask)
    cond_off = jnp.zeros_like(cond_on)

  def hold_fixed(z, t):
    if condition is None:
      return z
    noised = sde_lib.alpha(schedule, t) * x0_fixed + sde_lib.sigma(schedule, t) * z_init
    return jnp.where(mask_bl1, noised, z)

  def predict_logits(z, t, x0_self):
    t_b = jnp.full((batch,), t, dtype)
    z = hold_fixed(z, t)
    if condition is None:
      return denoise(z, t_b, x0_self)
    if guidance is None:
      return denoise(z, t_b, x0_self, cond_on)
    log_p_on = jax.nn.log_softmax(denoise(z, t_b, x0_self, cond_on), axis=-1)
    log_p_off = jax.nn.log_softmax(denoise(z, t_b, x0_self, cond_off), axis=-1)
    return log_p_off + guidance * (log_p_on - log_p_off)

  def predict(z, t, x0_self):
    x0_hat = interpolate(predict_logits(z, t, x0_self)).astype(dtype)
    return clamp_to_table(x0_hat, table.astype(dtype)) if clamp else x0_hat

  def body(carry, inputs):
    z, x0_prev, history = carry
    t, t_next, rng_step, is_last = inputs
    x0_hat = predict(z, t, x0_prev)
    z_next, history = spec.step(schedule, hold_fixed(z, t), t, t_next, x0_hat, rng_step,
                                is_last, history, predict)
    return (z_next, x0_hat, history), None

  history = {"x0": jnp.zeros((spec.history_size,) + shape, dtype),
             "half_log_snr": jnp.zeros((spec.history_size,), dtype),
             "count": jnp.zeros((), jnp.int32)}
  carry = (hold_fixed(z_init, times[0]), jnp.zeros(shape, dtype), history)
  inputs = (times[:-1], times[1:], jax.random.split(rng_steps, steps),
            jnp.arange(steps) == steps - 1)
  (z, x0_hat, _), _ = jax.lax.scan(body, carry, inputs)
  return Latent(hold_fixed(z, times[-1]), x0_hat), predict_logits


def generate(denoise: DenoiseFn, interpolate: InterpolateFn, schedule, rng: Array, *,
             shape: tuple[int, int, int], sampler: str, steps: int,
             rounding: str = "argmax", rounding_dtype: Any = jnp.float32,
             **options) -> tuple[Array, Array]:
  """Run the reverse process and return (tokens [b, l], final logits [b, l, v]).

  The tokens come from the logits of one more network call at t_min: their argmax, or with
  `rounding="sample"` a draw from softmax(logits) by the Gumbel-max trick in `rounding_dtype`.
  float32 Gumbel noise cannot exceed about 17, which cuts off tokens of probability below
  roughly exp(-17) relative to the top one, so float64 (which needs `jax_enable_x64`) gives the
  exact categorical. Fixed positions of `options["condition"]` always output their fixed token.
  `options` go to `_reverse`. Call inside `jax.jit` with every option but `condition` static.
  """
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding={rounding!r} is not one of {ROUNDINGS}")
  if jnp.dtype(rounding_dtype) == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("float64 rounding needs 64-bit floats; set JAX_ENABLE_X64=1 or call "
                     "jax.config.update('jax_enable_x64', True) before sampling.")
  rng, rng_round = jax.random.split(rng)
  latent, predict_logits = _reverse(denoise, interpolate, schedule, rng, shape=shape,
                                    sampler=sampler, steps=steps, **options)
  t_min = jnp.asarray(schedule.t_min, latent.z.dtype)
  logits = predict_logits(latent.z, t_min, latent.x0_hat)

  if rounding == "argmax":
    tokens = jnp.argmax(logits, axis=-1)
  else:
    gumbel = jax.random.gumbel(rng_round, logits.shape, rounding_dtype)
    tokens = jnp.argmax(logits.astype(rounding_dtype) + gumbel, axis=-1)
  condition = options.get("condition")
  if condition is not None:
    tokens = jnp.where(condition.mask, condition.tokens, tokens)
  return tokens.astype(jnp.int32), logits

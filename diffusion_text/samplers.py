"""Samplers for the reverse process, built on x0_hat, eps_hat and score_hat only.

A sampler is a step function registered by name (`sample.sampler`):

    step(schedule, z, t, t_next, x0_hat, rng, is_last) -> z_next

which moves z [batch, length, embed_dim] from time t to t_next < t given the denoiser's x0_hat at
(z, t). The driver `generate` runs the steps inside `lax.scan` on a time grid that starts at
t = 1 and ends at t_min, feeds each step's x0_hat back for self-conditioning, and rounds the
final latent to tokens with the network's logits at t_min. It costs steps + 1 network calls.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_text import registry
from diffusion_text import sde as sde_lib

Array = jax.Array


def time_grid(steps: int, t_min: float) -> Array:
  """Return steps + 1 decreasing times, exactly 1 first and exactly t_min last."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1, got {steps}")
  fraction = jnp.arange(steps, -1, -1, dtype=jnp.float32) / steps  # 1, ..., 0
  grid = t_min + (1.0 - t_min) * fraction
  return grid.at[0].set(1.0).at[-1].set(t_min)


def eps_and_score(schedule, z, t, x0_hat) -> tuple[Array, Array]:
  """eps_hat = (z - alpha_t x0_hat) / sigma_t and score_hat = -eps_hat / sigma_t."""
  a, s = sde_lib.alpha(schedule, t), sde_lib.sigma(schedule, t)
  eps_hat = (z - a * x0_hat) / s
  return eps_hat, -eps_hat / s


@registry.register("sampler", "euler_maruyama")
def euler_maruyama_step(schedule, z, t, t_next, x0_hat, rng, is_last):
  """Reverse SDE dz = [-1/2 beta z - beta score] dt + sqrt(beta) dW, stepped backwards.

  The last step adds no noise, so the final latent is the drift's prediction (score_sde's
  "noise removal"), which the rounding pass at t_min then decodes.
  """
  dt = t - t_next
  b = sde_lib.beta(schedule, t)
  _, score = eps_and_score(schedule, z, t, x0_hat)
  mean = z + (0.5 * b * z + b * score) * dt
  noise = jax.random.normal(rng, z.shape, z.dtype) * jnp.sqrt(b * dt)
  return jnp.where(is_last, mean, mean + noise)


@registry.register("sampler", "ode_euler")
def ode_euler_step(schedule, z, t, t_next, x0_hat, rng, is_last):
  """Probability-flow ODE dz/dt = -1/2 beta (z + score), one Euler step backwards."""
  del rng, is_last
  dt = t - t_next
  b = sde_lib.beta(schedule, t)
  _, score = eps_and_score(schedule, z, t, x0_hat)
  return z + 0.5 * b * (z + score) * dt


# (z [b, l, d], t [b], x0_self [b, l, d]) -> logits [b, l, v]
DenoiseFn = Callable[[Array, Array, Array], Array]
# logits [b, l, v] -> x0_hat [b, l, d]
InterpolateFn = Callable[[Array], Array]


def generate(denoise: DenoiseFn, interpolate: InterpolateFn, schedule, rng: Array, *,
             shape: tuple[int, int, int], sampler: str, steps: int) -> tuple[Array, Array]:
  """Run the reverse process from N(0, I) and return (tokens [b, l], final logits [b, l, v]).

  `denoise` and `interpolate` close over the parameters; `shape` is (batch, length, embed_dim).
  Call inside `jax.jit` with `sampler` and `steps` static.
  """
  step_fn = registry.get("sampler", sampler)
  batch = shape[0]
  grid = time_grid(steps, schedule.t_min)
  rng_init, rng_steps = jax.random.split(rng)
  z = jax.random.normal(rng_init, shape, jnp.float32)
  x0_hat = jnp.zeros(shape, jnp.float32)

  def body(carry, inputs):
    z, x0_prev = carry
    t, t_next, rng_step, is_last = inputs
    t_b = jnp.full((batch,), t)
    x0_hat = interpolate(denoise(z, t_b, x0_prev))
    z_next = step_fn(schedule, z, t, t_next, x0_hat, rng_step, is_last)
    return (z_next, x0_hat), None

  is_last = jnp.arange(steps) == steps - 1
  rngs = jax.random.split(rng_steps, steps)
  (z, x0_hat), _ = jax.lax.scan(body, (z, x0_hat), (grid[:-1], grid[1:], rngs, is_last))

  logits = denoise(z, jnp.full((batch,), grid[-1]), x0_hat)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

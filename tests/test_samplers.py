"""Sampler time grids, and samplers driven by the exact denoiser of a two-point data set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text import samplers
from diffusion_text import sde


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 128, 1000])
@pytest.mark.parametrize("t_min", [1e-4, 1e-3, 0.05])
def test_time_grid_starts_at_one_ends_at_t_min(steps, t_min):
  grid = np.asarray(samplers.time_grid(steps, t_min))
  assert grid.shape == (steps + 1,)
  assert grid[0] == np.float32(1.0)
  assert grid[-1] == np.float32(t_min)
  assert np.all(np.diff(grid) < 0)
  np.testing.assert_allclose(np.diff(grid), -(1 - t_min) / steps, rtol=1e-3)


def test_time_grid_rejects_zero_steps():
  with pytest.raises(ValueError, match="at least 1"):
    samplers.time_grid(0, 1e-4)


# Two tokens whose embeddings are the points +e and -e in 4 dimensions, equally likely. Given z_t
# the exact posterior over the clean token has logits -||z - alpha_t e_w||^2 / (2 sigma_t^2).
EMBED = jnp.array([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])


def exact_denoiser(schedule):
  def denoise(z_bld, t_b, x0_self):
    del x0_self
    a = sde.alpha(schedule, t_b)[:, None, None, None]
    s = sde.sigma(schedule, t_b)[:, None, None, None]
    dist_blv = jnp.sum((z_bld[:, :, None, :] - a * EMBED[None, None]) ** 2, axis=-1)
    return -dist_blv / (2 * s[..., 0] ** 2)
  interpolate = lambda logits: jax.nn.softmax(logits, axis=-1) @ EMBED
  return denoise, interpolate


@pytest.mark.parametrize("sampler", ["euler_maruyama", "ode_euler"])
@pytest.mark.parametrize("schedule", [sde.Cosine(), sde.LinearBeta()], ids=repr)
def test_samplers_reach_the_data_points(sampler, schedule):
  denoise, interpolate = exact_denoiser(schedule)
  tokens, logits = jax.jit(
      lambda rng: samplers.generate(denoise, interpolate, schedule, rng, shape=(400, 5, 4),
                                    sampler=sampler, steps=200))(jax.random.key(0))
  # Every position ends confidently on one of the two points, and both are equally likely.
  probs = jax.nn.softmax(logits, axis=-1)
  assert float(jnp.min(jnp.max(probs, axis=-1))) > 0.999
  share = float(jnp.mean(tokens == 0))
  assert 0.45 < share < 0.55, share


def test_ode_sampler_converges_with_more_steps():
  """The ODE's final latent approaches the exact limit alpha(t_min) * (+-e) as steps grow."""
  schedule = sde.Cosine()
  denoise, interpolate = exact_denoiser(schedule)
  errors = []
  for steps in (10, 40, 160):
    def run(rng):
      shape = (256, 1, 4)
      step_fn = lambda *a: samplers.ode_euler_step(*a)
      grid = samplers.time_grid(steps, schedule.t_min)
      z = jax.random.normal(rng, shape)
      def body(z, ts):
        t, t_next = ts
        x0_hat = interpolate(denoise(z, jnp.full((shape[0],), t), None))
        return step_fn(schedule, z, t, t_next, x0_hat, None, False), None
      z, _ = jax.lax.scan(body, z, (grid[:-1], grid[1:]))
      return z
    z = jax.jit(run)(jax.random.key(1))
    target = jnp.sign(z.sum(-1, keepdims=True)) * EMBED[0] * sde.alpha(schedule, schedule.t_min)
    errors.append(float(jnp.max(jnp.abs(z - target))))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.05, errors

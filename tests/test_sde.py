"""Schedules and marginals against closed forms and an independent ODE solve, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text import sde

SCHEDULES = [sde.LinearBeta(), sde.Cosine(), sde.LinearBeta(beta_min=0.5, beta_max=7.0),
             sde.Cosine(log_snr_min=-7.0, log_snr_max=13.0), sde.LogLinear()]
TIMES = np.array([1e-4, 0.003, 0.1, 0.37, 0.5, 0.81, 0.999, 1.0])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_alpha_sigma_log_snr_consistent(schedule, x64):
  t = jnp.asarray(TIMES, jnp.float64)
  a, s = sde.alpha(schedule, t), sde.sigma(schedule, t)
  np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
  np.testing.assert_allclose(jnp.log(a**2 / s**2), schedule.log_snr(t), rtol=1e-9, atol=1e-9)
  assert a.dtype == jnp.float64


def test_linear_beta_matches_closed_form(x64):
  schedule = sde.LinearBeta(beta_min=0.1, beta_max=20.0)
  t = jnp.asarray(TIMES, jnp.float64)
  integral = 0.1 * t + 0.5 * 19.9 * t**2
  np.testing.assert_allclose(sde.alpha(schedule, t), np.exp(-0.5 * integral), rtol=1e-12)
  np.testing.assert_allclose(sde.beta(schedule, t), 0.1 + 19.9 * t, rtol=1e-10)


def test_cosine_endpoints(x64):
  schedule = sde.Cosine(log_snr_min=-10.0, log_snr_max=10.0)
  np.testing.assert_allclose(schedule.log_snr(jnp.float64(0.0)), 10.0, rtol=1e-12)
  np.testing.assert_allclose(schedule.log_snr(jnp.float64(1.0)), -10.0, rtol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_beta_is_minus_derivative_of_log_alpha_squared(schedule, x64):
  log_alpha2 = lambda t: jnp.log(sde.alpha(schedule, t) ** 2)
  for t in TIMES[:-1]:
    expected = -jax.grad(log_alpha2)(jnp.float64(t))
    np.testing.assert_allclose(sde.beta(schedule, jnp.float64(t)), expected, rtol=1e-8)
    assert sde.beta(schedule, jnp.float64(t)) > 0


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_t_from_log_snr_inverts(schedule, x64):
  t = jnp.asarray(TIMES, jnp.float64)
  np.testing.assert_allclose(schedule.t_from_log_snr(schedule.log_snr(t)), t, rtol=1e-9,
                             atol=1e-12)


def _rk4(beta_fn, y, t0, t1, steps):
  """Integrate dm/dt = -beta m / 2, dv/dt = beta (1 - v) with beta sampled on a half-step grid."""
  h = (t1 - t0) / steps
  betas = np.asarray(beta_fn(jnp.linspace(t0, t1, 2 * steps + 1, dtype=jnp.float64)))
  deriv = lambda b, y: np.array([-0.5 * b * y[0], b * (1.0 - y[1])])
  for i in range(steps):
    b0, b_half, b1 = betas[2 * i], betas[2 * i + 1], betas[2 * i + 2]
    k1 = deriv(b0, y)
    k2 = deriv(b_half, y + h / 2 * k1)
    k3 = deriv(b_half, y + h / 2 * k2)
    k4 = deriv(b1, y + h * k3)
    y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return y


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_marginal_moments_solve_the_sde(schedule, x64):
  """Mean m and variance v of the forward SDE obey dm/dt = -beta m / 2 and dv/dt = beta (1 - v).

  Integrated with RK4 from the marginal at t = 0.001, they must reach (alpha_t x0, sigma_t^2).
  """
  x0 = 1.7
  beta_fn = lambda t: sde.beta(schedule, t)
  t_prev = 0.001
  y = np.array([x0 * float(sde.alpha(schedule, t_prev)), float(sde.sigma(schedule, t_prev)) ** 2])
  for t_next in (0.5, 0.9, 1.0):
    y = _rk4(beta_fn, y, t_prev, t_next, 2000)
    t_prev = t_next
    np.testing.assert_allclose(y[0], x0 * sde.alpha(schedule, t_next), rtol=1e-7)
    np.testing.assert_allclose(y[1], sde.sigma(schedule, t_next) ** 2, rtol=1e-7)


def test_sample_marginal_statistics():
  schedule = sde.Cosine()
  x0 = jnp.full((20000, 3), 2.0)
  t = jnp.full((20000,), 0.4)
  eps = jax.random.normal(jax.random.key(0), x0.shape)
  z = sde.sample_marginal(schedule, x0, t, eps)
  a, s = float(sde.alpha(schedule, 0.4)), float(sde.sigma(schedule, 0.4))
  np.testing.assert_allclose(z.mean(), 2.0 * a, atol=4 * s / np.sqrt(z.size))
  np.testing.assert_allclose(z.std(), s, rtol=0.02)


def test_prior_kl_matches_gaussian_kl(x64):
  schedule = sde.LinearBeta()
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(5, 16)), jnp.float64)
  a2 = float(sde.alpha(schedule, 1.0) ** 2)
  s2 = 1.0 - a2
  expected = 0.5 * np.sum(a2 * np.asarray(x0) ** 2 + s2 - 1.0 - np.log(s2), axis=-1)
  np.testing.assert_allclose(sde.prior_kl(x0, schedule), expected, rtol=1e-7)

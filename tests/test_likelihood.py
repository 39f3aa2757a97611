"""The likelihood bound against closed forms, in float64, with exact denoisers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffusion_text import likelihood
from diffusion_text import sde


def point_token_denoiser(schedule, table, log_prior):
  """Exact posterior logits log pi_w - ||z - alpha_t e_w||^2 / (2 sigma_t^2) of point tokens."""
  def denoise(z_bld, t_b):
    a = sde.alpha(schedule, t_b)[:, None, None, None]
    s = sde.sigma(schedule, t_b)[:, None, None]
    dist_blv = jnp.sum((z_bld[:, :, None, :] - a * table[None, None]) ** 2, axis=-1)
    return log_prior - dist_blv / (2 * s**2)
  return denoise, lambda logits: jax.nn.softmax(logits, axis=-1) @ table


def run_elbo(denoise, interpolate, schedule, x0, tokens, mask, seed=0, repeats=1):
  """Per-sequence terms, averaged over `repeats` independent estimates of each sequence."""
  step = jax.jit(lambda rng: likelihood.elbo_terms(denoise, interpolate, schedule, x0, tokens,
                                                   mask, rng))
  runs = [jax.device_get(step(jax.random.key(seed + i))) for i in range(repeats)]
  return {k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}


def test_bound_is_tight_above_exact_nll(x64):
  """Tokens drawn from pi with the exact denoiser: E[bound] - H(pi) lies in [0, prior term].

  With the exact score the continuous-time bound is exact except for the mismatch between
  q(z_1) and N(0, I), which is at most the prior term (about 1e-4 nats here).
  """
  schedule = sde.Cosine()
  probs = np.array([0.5, 0.25, 0.125, 0.125])
  table = jax.random.normal(jax.random.key(0), (4, 6), jnp.float64)
  table = table * np.sqrt(6) / jnp.linalg.norm(table, axis=-1, keepdims=True)
  denoise, interpolate = point_token_denoiser(schedule, table, jnp.log(probs))
  # Exactly the expected count of each token, so the data entropy is H(pi) with no sampling.
  tokens = np.repeat(np.arange(4), (probs * 65536).astype(int))
  tokens = jnp.asarray(np.random.default_rng(0).permutation(tokens).reshape(4096, 16))
  mask = jnp.ones(tokens.shape)
  x0 = table[tokens]

  summary = likelihood.summarize(run_elbo(denoise, interpolate, schedule, x0, tokens, mask,
                                          repeats=8))
  entropy_bits = float(-np.sum(probs * np.log2(probs)))
  gap = summary["total_bits_per_token"] - entropy_bits
  stderr = summary["total_stderr"]
  assert stderr < 0.012, summary
  assert gap > -3 * stderr, (gap, stderr)
  assert gap < summary["prior_bits_per_token"] + 3 * stderr, (gap, stderr)


def test_prior_term_matches_gaussian_kl(x64):
  schedule = sde.Cosine(log_snr_min=-4.0)  # alpha_1^2 = 0.018, so the term is not negligible
  x0 = jax.random.normal(jax.random.key(1), (3, 5, 7), jnp.float64)
  mask = jnp.ones((3, 5)).at[1, 3:].set(0.0)
  identity = lambda logits: logits
  terms = likelihood.elbo_terms(lambda z, t: z, identity, schedule, x0,
                                jnp.zeros((3, 5), jnp.int32), mask, jax.random.key(0))
  a2 = 1 / (1 + math.exp(4.0))
  s2 = 1 - a2
  kl = 0.5 * np.sum(a2 * np.asarray(x0) ** 2 + s2 - 1 - np.log(s2), axis=-1)
  np.testing.assert_allclose(terms["prior"], np.sum(kl * np.asarray(mask), axis=1), rtol=1e-12)
  np.testing.assert_array_equal(terms["tokens"], [5, 3, 5])


def test_diffusion_weight_is_half_snr_derivative(x64):
  for schedule in (sde.Cosine(), sde.LinearBeta(), sde.LogLinear()):
    t = jnp.linspace(1e-3, 1.0, 17)
    snr_rate = jax.vmap(jax.grad(lambda u: jnp.exp(schedule.log_snr(u))))(t)
    np.testing.assert_allclose(likelihood.diffusion_weight(schedule, t), -0.5 * snr_rate,
                               rtol=1e-10)


SCALE = 1.5  # standard deviation of the one-dimensional Gaussian data


def gaussian_x0_hat(schedule):
  """Exact x0_hat of N(0, SCALE^2) data, passed as logits with the identity interpolation."""
  def denoise(z, t_b):
    a = sde.alpha(schedule, t_b)[:, None, None]
    s = sde.sigma(schedule, t_b)[:, None, None]
    return a * SCALE**2 * z / (a**2 * SCALE**2 + s**2)
  return denoise, lambda x0_hat: x0_hat


def snr(schedule, t):
  return float(jnp.exp(schedule.log_snr(jnp.float64(t))))


@pytest.mark.parametrize("schedule", [sde.Cosine(), sde.LinearBeta(), sde.LogLinear()], ids=repr)
def test_diffusion_term_matches_gaussian_closed_form(schedule, x64):
  """Averaged over x0 ~ N(0, S^2): 1/2 log((1 + S^2 SNR(t_min)) / (1 + S^2 SNR(1)))."""
  denoise, interpolate = gaussian_x0_hat(schedule)
  x0 = SCALE * jax.random.normal(jax.random.key(2), (4096, 16, 1), jnp.float64)
  tokens = jnp.zeros((4096, 16), jnp.int32)
  summary = likelihood.summarize(run_elbo(denoise, interpolate, schedule, x0, tokens,
                                          jnp.ones((4096, 16)), repeats=2))
  exact_nats = 0.5 * math.log((1 + SCALE**2 * snr(schedule, schedule.t_min))
                              / (1 + SCALE**2 * snr(schedule, 1.0)))
  estimate_nats = summary["diffusion_bits_per_token"] * math.log(2)
  stderr_nats = summary["diffusion_stderr"] * math.log(2)
  assert abs(estimate_nats - exact_nats) < 3 * stderr_nats, (estimate_nats, exact_nats,
                                                              stderr_nats)
  assert stderr_nats < 0.1 * exact_nats


def test_diffusion_term_for_fixed_x0_matches_quadrature(x64):
  """For one x0, E_z ||x0 - x0_hat||^2 = (1 - k alpha)^2 x0^2 + k^2 sigma^2 with
  k = alpha S^2 / (alpha^2 S^2 + sigma^2); scipy integrates the weighted error over t."""
  schedule = sde.LinearBeta()
  value = 1.7
  denoise, interpolate = gaussian_x0_hat(schedule)
  x0 = jnp.full((4096, 16, 1), value, jnp.float64)
  summary = likelihood.summarize(run_elbo(denoise, interpolate, schedule, x0,
                                          jnp.zeros((4096, 16), jnp.int32),
                                          jnp.ones((4096, 16)), seed=5, repeats=2))

  def integrand(t):
    lam = float(schedule.log_snr(jnp.float64(t)))
    a, s = math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))
    k = a * SCALE**2 / (a**2 * SCALE**2 + s**2)
    error = (1 - k * a) ** 2 * value**2 + k**2 * s**2
    return float(likelihood.diffusion_weight(schedule, jnp.float64(t))) * error

  exact_nats, _ = integrate.quad(integrand, schedule.t_min, 1.0, limit=200, epsabs=1e-10)
  estimate_nats = summary["diffusion_bits_per_token"] * math.log(2)
  stderr_nats = summary["diffusion_stderr"] * math.log(2)
  assert abs(estimate_nats - exact_nats) < 3 * stderr_nats, (estimate_nats, exact_nats,
                                                              stderr_nats)


def test_reconstruction_term_matches_gauss_hermite(x64):
  """Two equally likely tokens at +-e (|e|^2 = d) at a t_min where they overlap: the term is
  E_n softplus(-X), X = 2 alpha (alpha |e|^2 + sigma |e| n) / sigma^2, n ~ N(0, 1)."""
  schedule = sde.Cosine(t_min=0.6)
  dim = 4
  table = jnp.stack([jnp.ones(dim), -jnp.ones(dim)]).astype(jnp.float64)
  denoise, interpolate = point_token_denoiser(schedule, table, jnp.zeros(2))
  tokens = jnp.zeros((2048, 16), jnp.int32).at[::2].set(1)
  summary = likelihood.summarize(run_elbo(denoise, interpolate, schedule, table[tokens],
                                          tokens, jnp.ones(tokens.shape)))

  lam = float(schedule.log_snr(jnp.float64(schedule.t_min)))
  a, s = math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))
  nodes, weights = np.polynomial.hermite_e.hermegauss(80)
  x = 2 * a * (a * dim + s * math.sqrt(dim) * nodes) / s**2
  exact_nats = float(np.sum(weights * np.logaddexp(0.0, -x)) / math.sqrt(2 * math.pi))
  estimate_nats = summary["reconstruction_bits_per_token"] * math.log(2)
  stderr_nats = summary["reconstruction_stderr"] * math.log(2)
  assert exact_nats > 0.05  # the test point is not trivially zero
  assert abs(estimate_nats - exact_nats) < 3 * stderr_nats, (estimate_nats, exact_nats,
                                                              stderr_nats)


def test_summarize_standard_error_of_equal_lengths():
  rng = np.random.default_rng(0)
  nats = rng.normal(10.0, 2.0, size=(50, 3))
  summary = likelihood.summarize({"prior": nats[:, 0], "diffusion": nats[:, 1],
                                  "reconstruction": nats[:, 2], "tokens": np.full(50, 4.0)})
  total = nats.sum(axis=1) / 4 / math.log(2)
  assert summary["sequences"] == 50
  np.testing.assert_allclose(summary["total_bits_per_token"], total.mean())
  np.testing.assert_allclose(summary["total_stderr"], total.std(ddof=1) / math.sqrt(50))
  np.testing.assert_allclose(summary["prior_bits_per_token"], nats[:, 0].mean() / 4 / math.log(2))


def test_summarize_rejects_a_single_sequence():
  one = np.ones(1)
  with pytest.raises(ValueError, match="at least 2"):
    likelihood.summarize({"prior": one, "diffusion": one, "reconstruction": one, "tokens": one})

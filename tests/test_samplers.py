"""Samplers against closed forms: time grids, convergence on Gaussian data, NFE counts,
conditioning, guidance and rounding.

Two data sets have exact denoisers:
- one-dimensional Gaussian data x0 ~ N(0, S^2), where x0_hat(z, t) = alpha S^2 z / (alpha^2 S^2
  + sigma^2) and the probability-flow ODE maps z_1 to z_t = z_1 std_t / std_1 with
  std_t^2 = alpha_t^2 S^2 + sigma_t^2;
- two tokens whose embeddings are the points +e and -e, where the posterior over the clean token
  has logits -||z - alpha_t e_w||^2 / (2 sigma_t^2) plus the log prior.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from diffusion_text import registry
from diffusion_text import samplers
from diffusion_text import sde

ALL_SAMPLERS = ["euler_maruyama", "ode_euler", "ode_heun", "ddpm", "dpm_solver_pp_1",
                "dpm_solver_pp_2", "dpm_solver_pp_3"]
DETERMINISTIC = ["ode_euler", "ode_heun", "dpm_solver_pp_1", "dpm_solver_pp_2", "dpm_solver_pp_3"]
SCHEDULES = [sde.Cosine(), sde.LinearBeta(), sde.LogLinear()]


def test_registry_lists_every_sampler():
  assert set(ALL_SAMPLERS) <= set(registry.names("sampler"))


# -- time grids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 3, 7, 128, 1000])
@pytest.mark.parametrize("t_min", [1e-4, 1e-3, 0.05])
def test_time_grid_starts_at_one_ends_at_t_min(steps, t_min):
  grid = np.asarray(samplers.time_grid(steps, t_min))
  assert grid.shape == (steps + 1,)
  assert grid[0] == np.float32(1.0)
  assert grid[-1] == np.float32(t_min)
  assert np.all(np.diff(grid) < 0)
  np.testing.assert_allclose(np.diff(grid), -(1 - t_min) / steps, rtol=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 5, 64])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_log_snr_grid_is_even_in_log_snr(steps, schedule, x64):
  grid = np.asarray(samplers.time_grid(steps, schedule.t_min, schedule, "log_snr", jnp.float64))
  assert grid.shape == (steps + 1,)
  assert grid[0] == 1.0
  assert grid[-1] == schedule.t_min
  assert np.all(np.diff(grid) < 0)
  lam = np.asarray(schedule.log_snr(jnp.asarray(grid)))
  np.testing.assert_allclose(np.diff(lam), (lam[-1] - lam[0]) / steps, rtol=1e-6)


def test_time_grid_rejects_bad_arguments():
  with pytest.raises(ValueError, match="at least 1"):
    samplers.time_grid(0, 1e-4)
  with pytest.raises(ValueError, match="not one of"):
    samplers.time_grid(4, 1e-4, sde.Cosine(), "sigma")


# -- convergence on Gaussian data ---------------------------------------------------------------

SCALE = 3.0  # standard deviation S of the Gaussian data


def gaussian_denoiser(schedule):
  """Exact x0_hat of N(0, S^2) data, returned in place of logits (interpolate is the identity)."""
  def denoise(z, t_b, x0_self):
    del x0_self
    a = sde.alpha(schedule, t_b)[:, None, None]
    s = sde.sigma(schedule, t_b)[:, None, None]
    return a * SCALE**2 * z / (a**2 * SCALE**2 + s**2)
  return denoise, lambda x0_hat: x0_hat


def marginal_std(schedule, t):
  return float(jnp.sqrt(sde.alpha(schedule, t) ** 2 * SCALE**2 + sde.sigma(schedule, t) ** 2))


@functools.partial(jax.jit, static_argnames=("schedule", "sampler", "steps", "batch", "grid"))
def run_gaussian(rng, *, schedule, sampler, steps, batch, grid="t"):
  denoise, interpolate = gaussian_denoiser(schedule)
  latent = samplers.integrate(denoise, interpolate, schedule, rng, shape=(batch, 1, 1),
                              sampler=sampler, steps=steps, grid=grid, dtype=jnp.float64)
  z_init = jax.random.normal(jax.random.split(rng)[0], (batch, 1, 1), jnp.float64)
  return latent.z, z_init


def ode_error(schedule, sampler, steps, grid="t"):
  """Largest distance of the sampler's final latent from the exact probability-flow solution."""
  z, z_init = run_gaussian(jax.random.key(0), schedule=schedule, sampler=sampler, steps=steps,
                           batch=64, grid=grid)
  exact = z_init * marginal_std(schedule, schedule.t_min) / marginal_std(schedule, 1.0)
  return float(jnp.max(jnp.abs(z - exact)))


@pytest.mark.parametrize("sampler", DETERMINISTIC)
@pytest.mark.parametrize("schedule, grid", [(sde.Cosine(), "t"), (sde.LinearBeta(), "log_snr"),
                                            (sde.LogLinear(), "t")], ids=repr)
def test_ode_samplers_converge_to_exact_flow(schedule, sampler, grid, x64):
  errors = [ode_error(schedule, sampler, steps, grid) for steps in (8, 32, 512)]
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.05, errors  # the final latent has standard deviation about 3


# Observed order of accuracy: Euler and DPM-Solver++ 1 are first order, Heun and 2M second
# order. 3M is also second order overall, because its first step is a first-order one.
ORDERS = {"ode_euler": 1, "dpm_solver_pp_1": 1, "ode_heun": 2, "dpm_solver_pp_2": 2,
          "dpm_solver_pp_3": 2}


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_ode_samplers_have_their_order(sampler, x64):
  schedule = sde.LinearBeta()
  coarse, fine = (ode_error(schedule, sampler, steps, "log_snr") for steps in (64, 256))
  observed = np.log2(coarse / fine) / 2
  assert observed > ORDERS[sampler] - 0.3, observed


# Two tokens at +e and -e in 64 dimensions (rows of norm sqrt(64), as `normalise_rows` makes
# them), whose posterior settles long before t_min, as it does for text. The exact flow is
# one-dimensional along e, and solved to 1e-11 by scipy; across e it is z_1 sigma_t / sigma_1.
WIDE = 64


def wide_two_point_reference(schedule, z1):
  norm = np.sqrt(WIDE)
  unit = np.ones(WIDE) / norm
  u1 = z1 @ unit

  def velocity(t, u):
    lam = float(schedule.log_snr(jnp.float64(t)))
    a2, s2 = 1 / (1 + np.exp(-lam)), 1 / (1 + np.exp(lam))
    x0_hat = norm * np.tanh(np.sqrt(a2) * norm * u / s2)
    score = -(u - np.sqrt(a2) * x0_hat) / s2
    return -0.5 * float(sde.beta(schedule, jnp.float64(t))) * (u + score)

  u = solve_ivp(velocity, (1.0, schedule.t_min), u1, method="DOP853", rtol=1e-11,
                atol=1e-11).y[:, -1]
  shrink = float(sde.sigma(schedule, schedule.t_min) / sde.sigma(schedule, 1.0))
  return np.outer(u, unit) + (z1 - np.outer(u1, unit)) * shrink


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_dpm_solver_2m_at_20_beats_euler_at_200(schedule, x64):
  table = jnp.stack([jnp.ones(WIDE), -jnp.ones(WIDE)])
  denoise, interpolate = two_point_denoiser(schedule, table)
  rng = jax.random.key(0)
  z1 = np.asarray(jax.random.normal(jax.random.split(rng)[0], (64, 1, WIDE), jnp.float64))[:, 0]
  exact = wide_two_point_reference(schedule, z1)

  def rms_error(sampler, steps, grid):
    latent = jax.jit(lambda r: samplers.integrate(
        denoise, interpolate, schedule, r, shape=(64, 1, WIDE), sampler=sampler, steps=steps,
        grid=grid, dtype=jnp.float64))(rng)
    return float(np.sqrt(np.mean((np.asarray(latent.z)[:, 0] - exact) ** 2)))

  dpm = rms_error("dpm_solver_pp_2", 20, "log_snr")
  euler = rms_error("ode_euler", 200, "t")
  # Measured: cosine 6.3e-5 vs 1.2e-4, linear 3.3e-5 vs 6.8e-3, log_linear 1.22e-3 vs 1.31e-3.
  assert dpm < euler, (dpm, euler)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "ddpm"])
@pytest.mark.parametrize("schedule", [sde.Cosine(), sde.LinearBeta()], ids=repr)
def test_stochastic_samplers_converge_in_distribution(schedule, sampler, x64):
  """The final latent's variance approaches std_{t_min}^2 (the sample's own error is ~1%)."""
  target = marginal_std(schedule, schedule.t_min) ** 2
  errors = []
  for steps in (4, 32, 256):
    z, _ = run_gaussian(jax.random.key(3), schedule=schedule, sampler=sampler, steps=steps,
                        batch=20_000)
    errors.append(abs(float(jnp.var(z)) / target - 1.0))
  assert errors[0] > errors[2], errors
  assert errors[2] < 0.04, errors


# -- network calls and their times --------------------------------------------------------------

def recording_denoiser(schedule, calls):
  """The Gaussian denoiser, which also appends the time of every call to `calls`."""
  denoise, interpolate = gaussian_denoiser(schedule)

  def recorded(z, t_b, x0_self):
    jax.debug.callback(lambda t: calls.append(float(t[0])), t_b, ordered=True)
    return denoise(z, t_b, x0_self)
  return recorded, interpolate


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_calls_match_nfe_and_span_one_to_t_min(sampler, steps):
  schedule = sde.Cosine()
  calls = []
  denoise, interpolate = recording_denoiser(schedule, calls)
  jax.jit(lambda rng: samplers.generate(denoise, interpolate, schedule, rng, shape=(2, 3, 1),
                                        sampler=sampler, steps=steps))(jax.random.key(0))
  jax.effects_barrier()
  assert len(calls) == samplers.nfe(sampler, steps)
  assert calls[0] == np.float32(1.0)
  assert calls[-1] == np.float32(schedule.t_min)
  assert calls[-2] == np.float32(schedule.t_min) or sampler != "ode_heun"


def test_nfe_counts_heun_and_guidance_twice():
  assert samplers.nfe("ode_euler", 10) == 11
  assert samplers.nfe("ode_heun", 10) == 21
  assert samplers.nfe("dpm_solver_pp_3", 10, guided=True) == 22


# -- two-point token data -----------------------------------------------------------------------

EMBED = jnp.array([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
LOG_NINE = float(np.log(9.0))


def two_point_denoiser(schedule, table=EMBED):
  """Exact posterior logits of the two points, equally likely without a condition.

  The optional condition is a stand-in for a trained conditional network: wherever the
  condition fixes any position of a sequence, the prior of that sequence becomes 9:1 for
  token 0.
  """
  def denoise(z_bld, t_b, x0_self, cond=None):
    del x0_self
    a = sde.alpha(schedule, t_b)[:, None, None, None]
    s = sde.sigma(schedule, t_b)[:, None, None]
    dist_blv = jnp.sum((z_bld[:, :, None, :] - a * table[None, None]) ** 2, axis=-1)
    logits_blv = -dist_blv / (2 * s**2)
    if cond is not None:
      conditioned_b = jnp.max(cond[..., -1], axis=-1)
      logits_blv = logits_blv.at[..., 0].add(LOG_NINE * conditioned_b[:, None])
    return logits_blv
  interpolate = lambda logits: jax.nn.softmax(logits, axis=-1) @ table.astype(logits.dtype)
  return denoise, interpolate


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_samplers_reach_the_data_points(sampler):
  schedule = sde.LinearBeta() if sampler in ("ddpm", "ode_heun") else sde.Cosine()
  denoise, interpolate = two_point_denoiser(schedule)
  tokens, logits = jax.jit(
      lambda rng: samplers.generate(denoise, interpolate, schedule, rng, shape=(400, 5, 4),
                                    sampler=sampler, steps=60))(jax.random.key(0))
  # Every position ends confidently on one of the two points, and both are equally likely.
  probs = jax.nn.softmax(logits, axis=-1)
  assert float(jnp.min(jnp.max(probs, axis=-1))) > 0.999
  share = float(jnp.mean(tokens == 0))
  assert 0.45 < share < 0.55, share


def test_clamp_to_table_picks_nearest_row():
  table = jax.random.normal(jax.random.key(0), (13, 5))
  x = jax.random.normal(jax.random.key(1), (3, 7, 5)) * 2
  clamped = np.asarray(samplers.clamp_to_table(x, table))
  dist = np.linalg.norm(np.asarray(x)[:, :, None] - np.asarray(table)[None, None], axis=-1)
  np.testing.assert_allclose(clamped, np.asarray(table)[dist.argmin(-1)], atol=1e-6)


def test_clamped_sampler_outputs_table_rows():
  schedule = sde.Cosine()
  denoise, interpolate = two_point_denoiser(schedule)
  latent = jax.jit(lambda rng: samplers.integrate(
      denoise, interpolate, schedule, rng, shape=(64, 3, 4), sampler="ddpm", steps=20,
      table=EMBED, clamp=True))(jax.random.key(2))
  rows = np.asarray(latent.x0_hat).reshape(-1, 4)
  assert np.all(np.isin(np.abs(rows), [1.0])), "clamped x0_hat is not an embedding row"


def random_condition(batch, length, seed=0):
  """Per-example masks (each example fixes its own positions) and fixed tokens."""
  rng_mask, rng_tokens = jax.random.split(jax.random.key(seed))
  mask = jax.random.bernoulli(rng_mask, 0.4, (batch, length))
  mask = mask.at[:, 0].set(True)  # every example is conditioned on something
  tokens = jax.random.randint(rng_tokens, (batch, length), 0, 2)
  return samplers.Condition(tokens, mask)


def wrong_denoiser(z, t_b, x0_self, cond=None):
  """Always certain of token 1, so fixed tokens 0 survive only if the sampler keeps them fixed."""
  del t_b, x0_self, cond
  return jnp.zeros(z.shape[:2] + (2,)).at[..., 1].set(30.0)


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_infilling_keeps_every_fixed_token(sampler):
  schedule = sde.Cosine()
  condition = random_condition(32, 9)
  for denoise, interpolate in (two_point_denoiser(schedule),
                               (wrong_denoiser, two_point_denoiser(schedule)[1]))[:1 + (
                                   sampler in ("euler_maruyama", "dpm_solver_pp_3"))]:
    tokens, _ = jax.jit(lambda rng, c: samplers.generate(
        denoise, interpolate, schedule, rng, shape=(32, 9, 4), sampler=sampler, steps=12,
        table=EMBED, condition=c))(jax.random.key(1), condition)
    kept = np.asarray(tokens)[np.asarray(condition.mask)]
    np.testing.assert_array_equal(kept, np.asarray(condition.tokens)[np.asarray(condition.mask)])


def test_fixed_positions_follow_forward_process():
  """At every network call a fixed position is at alpha_t E[w] + sigma_t eps_init."""
  schedule = sde.Cosine()
  condition = random_condition(8, 6, seed=4)
  seen = []

  def denoise(z, t_b, x0_self, cond):
    jax.debug.callback(lambda z_, t_: seen.append((np.asarray(z_), float(t_[0]))), z, t_b,
                       ordered=True)
    return two_point_denoiser(schedule)[0](z, t_b, x0_self, cond)

  rng = jax.random.key(5)
  jax.jit(lambda r: samplers.generate(denoise, two_point_denoiser(schedule)[1], schedule, r,
                                      shape=(8, 6, 4), sampler="euler_maruyama", steps=5,
                                      table=EMBED, condition=condition))(rng)
  jax.effects_barrier()
  z_init = np.asarray(jax.random.normal(jax.random.split(jax.random.split(rng)[0])[0],
                                        (8, 6, 4)))
  x0 = np.asarray(EMBED)[np.asarray(condition.tokens)]
  mask = np.asarray(condition.mask)
  assert len(seen) == 6
  for z, t in seen:
    a, s = float(sde.alpha(schedule, t)), float(sde.sigma(schedule, t))
    np.testing.assert_allclose(z[mask], (a * x0 + s * z_init)[mask], atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "dpm_solver_pp_2"])
def test_guidance_zero_and_one_reproduce_unguided(sampler, x64):
  schedule = sde.Cosine()
  denoise, interpolate = two_point_denoiser(schedule)
  ignore_condition = lambda z, t_b, x0_self, cond: denoise(z, t_b, x0_self, jnp.zeros_like(cond))
  condition = random_condition(64, 5, seed=2)

  @functools.cache
  def run(denoise_fn, guidance):
    return jax.jit(lambda rng, c: samplers.generate(
        denoise_fn, interpolate, schedule, rng, shape=(64, 5, 4), sampler=sampler, steps=16,
        table=EMBED, condition=c, guidance=guidance, dtype=jnp.float64))(jax.random.key(7),
                                                                         condition)

  log_softmax = lambda x: jax.nn.log_softmax(x, axis=-1)
  for guided, reference in (((denoise, 0.0), (ignore_condition, None)),
                            ((denoise, 1.0), (denoise, None))):
    tokens, logits = run(*guided)
    tokens_ref, logits_ref = run(*reference)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(tokens_ref))
    np.testing.assert_allclose(log_softmax(logits), log_softmax(logits_ref), atol=1e-6)

  # A larger scale pushes free positions further towards the conditional prior's token 0.
  share = lambda w: float(jnp.mean(run(denoise, w)[0][~condition.mask] == 0))
  assert share(0.0) < share(1.0) < share(3.0)


# -- rounding -----------------------------------------------------------------------------------

def test_sample_rounding_matches_softmax_in_float64(x64):
  logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))

  def denoise(z, t_b, x0_self):
    del t_b, x0_self
    return jnp.broadcast_to(logits, z.shape[:2] + (3,))

  interpolate = lambda l: jax.nn.softmax(l, axis=-1) @ jnp.eye(3)
  tokens, _ = jax.jit(lambda rng: samplers.generate(
      denoise, interpolate, sde.Cosine(), rng, shape=(2000, 10, 3), sampler="ode_euler",
      steps=1, rounding="sample", rounding_dtype=jnp.float64))(jax.random.key(0))
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=3) / tokens.size
  # 20000 draws: the standard error of each share is below 0.0035.
  np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.015)


def test_float64_rounding_needs_x64():
  denoise, interpolate = gaussian_denoiser(sde.Cosine())
  with pytest.raises(ValueError, match="JAX_ENABLE_X64"):
    samplers.generate(denoise, interpolate, sde.Cosine(), jax.random.key(0), shape=(2, 1, 1),
                      sampler="ode_euler", steps=1, rounding="sample",
                      rounding_dtype=jnp.float64)

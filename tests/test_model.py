"""Score network and embedding: shapes, normalisation, conditioning and padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_text import losses
from diffusion_text import sde
from diffusion_text.models.transformer import DiffusionLM, ModelConfig, log_snr_features

# Odd and prime sizes catch swapped axes.
CFG = ModelConfig(vocab_size=37, seq_len=11, embed_dim=5, width=24, num_layers=2, num_heads=3,
                  mlp_dim=40)


def random_params(seed=0):
  """Initialise, then replace every weight with noise so no zero-initialised path hides bugs."""
  model = DiffusionLM(CFG)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((2, 11), jnp.int32),
                               jnp.zeros((2,)))["params"])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  noisy = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return model, jax.tree.unflatten(treedef, noisy)


def denoise(model, params, z, log_snr, x0_self, mask=None):
  return model.apply({"params": params}, z, log_snr, x0_self, mask, method=model.denoise)


def test_log_snr_features_stay_distinct():
  lam = jnp.linspace(-30.0, 30.0, 2001)
  feats = log_snr_features(lam, 64)
  gaps = jnp.linalg.norm(feats[1:] - feats[:-1], axis=-1)
  assert float(gaps.min()) > 1e-3
  # Points far apart in lambda stay far apart in feature space (no wrap-around).
  far = jnp.linalg.norm(feats[0] - feats[-1])
  assert float(far) > float(gaps.max())


def test_embedding_rows_have_norm_sqrt_dim():
  model, params = random_params()
  table = model.apply({"params": params}, method=model.embedding_table)
  np.testing.assert_allclose(jnp.linalg.norm(table, axis=-1), np.sqrt(CFG.embed_dim), rtol=1e-5)
  x0 = model.apply({"params": params}, jnp.array([[3, 36]]), method=model.embed)
  np.testing.assert_allclose(x0[0], table[jnp.array([3, 36])], rtol=1e-6)


def test_output_shape_and_conditioning():
  model, params = random_params()
  rng = jax.random.split(jax.random.key(3), 2)
  z = jax.random.normal(rng[0], (2, 11, 5))
  x0_self = jax.random.normal(rng[1], (2, 11, 5))
  logits = denoise(model, params, z, jnp.array([0.0, 0.0]), x0_self)
  assert logits.shape == (2, 11, 37)
  assert logits.dtype == jnp.float32
  other_time = denoise(model, params, z, jnp.array([3.0, -3.0]), x0_self)
  other_self = denoise(model, params, z, jnp.array([0.0, 0.0]), jnp.zeros_like(x0_self))
  assert float(jnp.abs(logits - other_time).max()) > 1e-3
  assert float(jnp.abs(logits - other_self).max()) > 1e-3


def test_padding_does_not_change_real_positions():
  model, params = random_params()
  z = jax.random.normal(jax.random.key(4), (1, 11, 5))
  mask = jnp.array([[1.0] * 7 + [0.0] * 4])
  changed = z.at[:, 7:].set(100.0)
  out_a = denoise(model, params, z, jnp.array([1.0]), z, mask)
  out_b = denoise(model, params, changed, jnp.array([1.0]), changed, mask)
  np.testing.assert_allclose(out_a[:, :7], out_b[:, :7], rtol=1e-5, atol=1e-5)
  # Without the mask, attention does see the change.
  assert float(jnp.abs(denoise(model, params, z, jnp.array([1.0]), z)[:, :7]
                       - denoise(model, params, changed, jnp.array([1.0]), changed)[:, :7]).max()) > 1e-3


def test_attention_is_bidirectional():
  model, params = random_params()
  z = jax.random.normal(jax.random.key(5), (1, 11, 5))
  out = denoise(model, params, z, jnp.array([0.0]), z)
  later_changed = denoise(model, params, z.at[:, -1].add(1.0), jnp.array([0.0]), z)
  assert float(jnp.abs(out[:, 0] - later_changed[:, 0]).max()) > 1e-4


def test_fresh_model_loss_is_log_vocab():
  """The rounding head starts at zero, so the initial cross-entropy is exactly log(vocab)."""
  model = DiffusionLM(CFG)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 11), jnp.int32),
                               jnp.zeros((2,)))["params"])
  tokens = jax.random.randint(jax.random.key(1), (4, 11), 0, 37)
  for loss_fn in (losses.cross_entropy_loss,):
    loss, terms = loss_fn(model, params, sde.Cosine(), tokens, jnp.ones((4, 11)),
                          jax.random.key(2), self_cond_prob=0.5, train=True)
    np.testing.assert_allclose(loss, np.log(37), rtol=1e-5)
    assert set(terms) >= {"ce", "loss_by_t/0.00", "loss_by_t/0.75"}


def test_x0_mse_loss_terms_match_definition():
  model, params = random_params()
  tokens = jax.random.randint(jax.random.key(1), (4, 11), 0, 37)
  loss, terms = losses.x0_mse_loss(model, params, sde.Cosine(), tokens, jnp.ones((4, 11)),
                                   jax.random.key(2), self_cond_prob=0.0, train=True)
  np.testing.assert_allclose(loss, terms["x0_mse"] + terms["rounding"], rtol=1e-6)
  assert float(terms["x0_mse"]) > 0
  assert float(terms["rounding"]) > 0


def test_stratified_times_cover_interval():
  t = np.sort(np.asarray(losses.stratified_times(jax.random.key(0), 64, 1e-3)))
  assert t.min() >= 1e-3
  assert t.max() <= 1.0
  # One time in each of 64 equal strata of [t_min, 1].
  strata = np.floor((t - 1e-3) / (1 - 1e-3) * 64).astype(int)
  assert sorted(strata.tolist()) == list(range(64))


def test_masked_loss_ignores_padding():
  model, params = random_params()
  tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 37)
  mask = jnp.ones((2, 11)).at[:, 8:].set(0.0)
  rng = jax.random.key(9)
  loss_a, _ = losses.cross_entropy_loss(model, params, sde.Cosine(), tokens, mask, rng,
                                        self_cond_prob=0.0, train=False)
  loss_b, _ = losses.cross_entropy_loss(model, params, sde.Cosine(), tokens.at[:, 8:].set(0),
                                        mask, rng, self_cond_prob=0.0, train=False)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)

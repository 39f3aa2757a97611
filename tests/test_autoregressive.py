"""The autoregressive baseline: causality, cached decoding against the full forward pass, nucleus
truncation, exact likelihood, and a tiny run through the same trainer, CLI functions and files."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text import decoding
from diffusion_text import inference
from diffusion_text import train
from diffusion_text.data.tokenizer import BOS_ID
from diffusion_text.errors import ConfigError
from diffusion_text.experiment import Experiment
from diffusion_text.models.autoregressive import shift_right
from tests.test_train import read_metrics, text_dir, tiny_config  # noqa: F401 (fixture)

VOCAB = 300
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Vocabulary:
  vocab_size = VOCAB


def ar_config(**overrides):
  spec = importlib.util.spec_from_file_location("ar_experiment",
                                                os.path.join(ROOT, "experiments", "ar.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.seq_len = 24
  c.model.width = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 64
  c.train.batch_size = 8
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


@pytest.fixture(scope="module")
def model_and_params():
  """A small AR experiment whose parameters are perturbed away from their initial values, so
  that every layer (including the zero-initialised head) shapes the logits."""
  experiment = Experiment(ar_config(), _Vocabulary())
  params = experiment.init_state()["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])
  return experiment, params


def full_logits(experiment, params, tokens_bt):
  return experiment.model.apply({"params": params}, shift_right(tokens_bt, BOS_ID))


def test_outputs_depend_only_on_earlier_tokens(model_and_params):
  experiment, params = model_and_params
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 4, VOCAB)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % VOCAB)
  before, after = full_logits(experiment, params, tokens), full_logits(experiment, params, changed)
  # Output i predicts token i from tokens < i, so token 10 reaches outputs 11 onwards only.
  np.testing.assert_array_equal(before[:, :11], after[:, :11])
  assert np.abs(before[:, 11:] - after[:, 11:]).min() > 0


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_cached_decoding_matches_full_forward_pass(model_and_params, temperature, top_p):
  """The cache gives the full pass's logits (to float32 rounding) and exactly its tokens."""
  experiment, params = model_and_params
  sample_fn = experiment.make_ar_sampler(num_samples=8, temperature=temperature, top_p=top_p)
  rng = jax.random.key(3)
  tokens, logits = sample_fn(params, rng)
  reference = full_logits(experiment, params, tokens)
  assert float(jnp.std(reference)) > 0.5  # The comparison is not between near-constant logits.
  np.testing.assert_allclose(logits, reference, rtol=0, atol=2e-5)
  # Drawing every token from the full pass's logits, with the same keys, gives the same tokens.
  redrawn = jnp.stack([decoding.draw_token(jax.random.fold_in(rng, i), reference[:, i],
                                           temperature, top_p) for i in range(tokens.shape[1])],
                      axis=1)
  np.testing.assert_array_equal(redrawn, tokens)
  if temperature == 0.0:
    np.testing.assert_array_equal(jnp.argmax(reference, axis=-1), tokens)


def test_prefix_tokens_are_kept(model_and_params):
  experiment, params = model_and_params
  sample_fn = experiment.make_ar_sampler(num_samples=8, temperature=1.0, top_p=1.0,
                                         conditioned=True)
  prefix = np.zeros((8, 24), np.int32)
  prefix[:, :5] = [11, 12, 13, 14, 15]
  fixed = np.zeros((8, 24), bool)
  fixed[:, :5] = True
  tokens, logits = sample_fn(params, jax.random.key(0), prefix, fixed)
  np.testing.assert_array_equal(tokens[:, :5], prefix[:, :5])
  np.testing.assert_allclose(logits, full_logits(experiment, params, tokens), atol=2e-5)


def test_top_p_keeps_the_smallest_nucleus():
  probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
  logits = jnp.log(jnp.asarray(probs))[None]
  nucleus = lambda p: np.isfinite(np.asarray(decoding.top_p_mask(logits, p)[0]))
  np.testing.assert_array_equal(nucleus(1.0), [True] * 5)
  np.testing.assert_array_equal(nucleus(0.4), [False, True, False, False, False])
  np.testing.assert_array_equal(nucleus(0.41), [False, True, False, True, False])
  np.testing.assert_array_equal(nucleus(0.85), [False, True, False, True, True])
  np.testing.assert_array_equal(nucleus(0.86), [False, True, True, True, True])
  np.testing.assert_array_equal(nucleus(1e-6), [False, True, False, False, False])

  # Draws follow the renormalised nucleus (0.4, 0.3, 0.15) / 0.85.
  draws = jax.vmap(lambda k: decoding.draw_token(k, logits, 1.0, 0.85))(
      jax.random.split(jax.random.key(0), 20_000))
  counts = np.bincount(np.asarray(draws).ravel(), minlength=5) / 20_000
  np.testing.assert_allclose(counts, [0, 0.4 / 0.85, 0, 0.3 / 0.85, 0.15 / 0.85], atol=0.015)


def test_bad_decoding_options_rejected():
  with pytest.raises(ValueError, match="temperature"):
    decoding.check_options(-1.0, 1.0)
  with pytest.raises(ValueError, match="top_p"):
    decoding.check_options(1.0, 0.0)


def test_exact_nll_matches_cached_chain_rule(model_and_params):
  """Sequence NLL from the full pass equals the sum of -log p(token_i | earlier) taken from
  the cached decoder one position at a time (a second, independent computation)."""
  experiment, params = model_and_params
  tokens = jax.random.randint(jax.random.key(1), (8, 24), 4, VOCAB)
  mask = np.ones((8, 24), np.float32)
  mask[3, 20:] = 0.0
  nats = experiment.make_token_nll()(params, tokens, mask)

  model = experiment.model
  cache = model.apply({"params": params}, 8, method=model.init_cache)
  inputs = shift_right(tokens, BOS_ID)
  expected = np.zeros(8)
  for i in range(24):
    logits, cache = model.apply({"params": params}, inputs[:, i:i + 1], i, cache,
                                method=model.decode)
    log_p = jax.nn.log_softmax(np.asarray(logits[:, 0], np.float64))
    expected -= np.asarray(log_p)[np.arange(8), np.asarray(tokens[:, i])] * mask[:, i]
  np.testing.assert_allclose(nats, expected, rtol=2e-5)


def test_flops_match_xla_cost_analysis(model_and_params):
  """The analytic count covers the matrix products XLA reports for one forward pass."""
  experiment, params = model_and_params
  tokens = jnp.zeros((8, 24), jnp.int32)
  compiled = jax.jit(lambda p, x: experiment.model.apply({"params": p}, x)).lower(
      params, tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_per_token = cost["flops"] / tokens.size
  # XLA also counts elementwise work (norms, softmax, GELU), which the analytic figure leaves out.
  assert 0.75 < experiment.flops_per_token() / xla_per_token <= 1.0


def test_loss_must_suit_the_model():
  with pytest.raises(ConfigError, match="loss.name=next_token"):
    Experiment(ar_config(**{"loss.name": "ce"}), _Vocabulary())
  diffusion = ar_config(**{"model.name": "transformer", "loss.name": "next_token"})
  with pytest.raises(ConfigError, match="loss.name=ce"):
    Experiment(diffusion, _Vocabulary())
  with pytest.raises(ConfigError, match="model.conditional=True applies to diffusion"):
    Experiment(ar_config(**{"model.conditional": True}), _Vocabulary())


def test_ar_run_trains_samples_and_evaluates(text_dir, tmp_path):  # noqa: F811
  config = tiny_config(text_dir, tmp_path, **{"model.name": "ar_transformer",
                                              "loss.name": "next_token"})
  workdir = str(tmp_path / "ar")
  final = train.train_and_evaluate(config, workdir)
  assert final["step"] == 60
  evals = [r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r]
  assert evals[0] == pytest.approx(np.log(400), rel=1e-4)  # Zero-initialised head.
  assert evals[-1] < 0.8 * evals[0], evals
  with open(os.path.join(workdir, "samples", "step_60.txt"), encoding="utf-8") as f:
    assert "AR decoding" in f.readline()

  texts = inference.sample(workdir, num_samples=8, sampler=None, steps=None, seed=0,
                           prefix="The king", temperature=0.7, top_p=0.9)
  assert len(texts) == 8
  assert all(t.startswith("The king") for t in texts)
  result = inference.evaluate(workdir, split="validation", max_batches=4)
  # Exact NLL: the bits per token are the evaluation loss converted from nats.
  assert result["total_bits_per_token"] == pytest.approx(result["loss"] / np.log(2), rel=1e-5)
  assert result["nll_bits_per_token"] == result["total_bits_per_token"]
  assert result["total_stderr"] > 0
  assert "time_samples" not in result

  # As a judge, the run needs fewer bits in all for Shakespeare than for its letters shuffled
  # (shuffled text splits into more, individually cheaper tokens).
  judge = inference.TextJudge(workdir)
  real = ["And the king is the lord of this"] * 3  # Short enough not to be cut.
  rng = np.random.default_rng(0)
  shuffled = ["".join(rng.permutation(list(text))) for text in real]
  total_bits = lambda score: score["total_bits_per_token"] * score["tokens"]
  real_score, shuffled_score = judge.score(real), judge.score(shuffled)
  assert shuffled_score["tokens"] < 3 * 32
  assert total_bits(real_score) < 0.8 * total_bits(shuffled_score)

  with pytest.raises(ConfigError, match="--sampler, --steps"):
    inference.sample(workdir, num_samples=8, sampler="ddpm", steps=4, seed=0)
  with pytest.raises(ConfigError, match="--prefix needs at least"):
    inference.sample(workdir, num_samples=8, sampler=None, steps=None, seed=0,
                     prefix="The king " * 40)
  with pytest.raises(ConfigError, match="--top_p=0.0 must lie in"):
    inference.sample(workdir, num_samples=8, sampler=None, steps=None, seed=0, top_p=0.0)
  with pytest.raises(ConfigError, match="time_samples"):
    inference.evaluate(workdir, split="validation", max_batches=1, time_samples=2)

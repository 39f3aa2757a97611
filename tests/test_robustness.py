"""Preemption, damaged checkpoints, non-finite steps, evaluation invariance and run health."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import config as config_lib
from diffusion_text import losses
from diffusion_text import metrics
from diffusion_text import registry
from diffusion_text import train
from diffusion_text.data import pipeline
from diffusion_text.data import sources
from diffusion_text.errors import TrainingStopped
from diffusion_text.experiment import Experiment, load_or_train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny run on the bundled corpus; written to a file so subprocesses can train it too.
TINY_CONFIG = """
from diffusion_text import config as config_lib

def get_config():
  c = config_lib.base_config()
  c.data.tfds_dir = {tfds_dir!r}
  c.data.seq_len = 32
  c.tokenizer.vocab_size = 400
  c.tokenizer.max_chars = 200_000
  c.model.embed_dim, c.model.width, c.model.num_layers = 8, 32, 1
  c.model.num_heads, c.model.mlp_dim = 2, 64
  c.train.batch_size = 8
  c.train.steps = 40
  c.train.warmup_steps = 4
  c.train.log_every = 5
  c.train.eval_every = 20
  c.train.eval_batches = 2
  c.train.sample_every = 40
  c.train.checkpoint_every = 20
  c.sample.steps = 3
  c.mesh.data = 1
  return c
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
  directory = tmp_path_factory.mktemp("config")
  path = directory / "tiny.py"
  path.write_text(TINY_CONFIG.format(tfds_dir=str(directory / "tfds")))
  return path


def load_config(config_file):
  namespace = {}
  exec(compile(config_file.read_text(), str(config_file), "exec"), namespace)  # pylint: disable=exec-used
  config = namespace["get_config"]()
  config.mesh.data = -1  # In-process tests see 8 devices; the subprocesses see one.
  return config


def comparable_metrics(workdir):
  """metrics.jsonl without wall-clock fields, which differ between any two runs."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")}
          for r in records]


def start_training(config_file, workdir):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen(
      [sys.executable, "-m", "diffusion_text", "train", f"--config={config_file}",
       f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def test_sigterm_resume_matches_straight_run(config_file, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert start_training(config_file, straight).wait(timeout=300) == 0

  process = start_training(config_file, resumed)
  deadline = time.time() + 300
  while time.time() < deadline:
    records = comparable_metrics(resumed) if (resumed / "metrics.jsonl").exists() else []
    if any(r["step"] >= 10 and "train/loss" in r for r in records):
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, output
  assert "Rerun the same command to continue" in output
  stopped_at = max(ckpt_lib.Checkpointer(str(resumed)).all_steps())
  assert 10 <= stopped_at < 40

  process = start_training(config_file, resumed)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  assert f"resume: continuing from step {stopped_at}" in output
  assert comparable_metrics(resumed) == comparable_metrics(straight)


def test_damaged_latest_checkpoint_falls_back(config_file, tmp_path):
  config = load_config(config_file)
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  checkpoints = workdir / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [20, 40]
  reference = ckpt_lib.Checkpointer(str(workdir))
  tokenizer = load_or_train_tokenizer(config, str(workdir))
  experiment = Experiment(config, tokenizer)
  good_state, _, _ = reference.restore(40, experiment.abstract_state)
  reference.close()

  # A crash mid-write leaves a temporary folder (ignored); damage makes step 40 unreadable.
  (checkpoints / "60.orbax-checkpoint-tmp-1234").mkdir()
  for path in (checkpoints / "40" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"\0garbage")

  final = train.train_and_evaluate(config, str(workdir))
  assert final["step"] == 40
  moved = list((tmp_path / "run" / "checkpoints_unreadable").iterdir())
  assert len(moved) == 1
  assert moved[0].name.startswith("40-")
  checkpointer = ckpt_lib.Checkpointer(str(workdir))
  assert checkpointer.latest_step() == 40
  state, _, _ = checkpointer.restore(40, experiment.abstract_state)
  checkpointer.close()
  # Retraining steps 21-40 from the good step 20 reproduces the lost checkpoint exactly.
  for a, b in zip(jax.tree.leaves(good_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@registry.register("loss", "test_nan_on_some_steps")
def nan_on_some_steps(model, params, schedule, tokens_bt, mask_bt, rng, **kwargs):
  loss, terms = losses.cross_entropy_loss(model, params, schedule, tokens_bt, mask_bt, rng,
                                          **kwargs)
  bad = jax.random.uniform(jax.random.fold_in(rng, 99)) < 0.4
  return jnp.where(bad, jnp.nan, loss), terms


@registry.register("loss", "test_always_nan")
def always_nan(model, params, schedule, tokens_bt, mask_bt, rng, **kwargs):
  loss, terms = losses.cross_entropy_loss(model, params, schedule, tokens_bt, mask_bt, rng,
                                          **kwargs)
  return loss * jnp.nan, terms


def test_non_finite_step_changes_nothing(config_file, tmp_path):
  config = load_config(config_file)
  config.loss.name = "test_nan_on_some_steps"
  tokenizer = load_or_train_tokenizer(config, str(tmp_path))
  experiment = Experiment(config, tokenizer)
  state = experiment.init_state()
  step_fn = experiment.make_train_step()

  source = sources.get_source(config.data, "train")
  batches = pipeline.make_train_iterator(source, tokenizer, seq_len=32, global_batch_size=8,
                                         seed=0)
  rng = jax.random.key(0)
  skipped, applied = 0, 0
  for _ in range(12):
    before = jax.tree.map(np.array, state)  # A copy: the step donates (reuses) its input buffers.
    state, step_metrics = step_fn(state, {"tokens": jnp.asarray(next(batches)["tokens"])}, rng)
    assert int(state["step"]) == int(before["step"]) + 1
    if float(step_metrics["train/skipped"]) == 1.0:
      skipped += 1
      assert int(state["bad_steps"]) == int(before["bad_steps"]) + 1
      for key in ("params", "ema", "opt_state"):
        for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(state[key])):
          np.testing.assert_array_equal(a, np.asarray(b))
    else:
      applied += 1
      assert int(state["bad_steps"]) == 0
      # The optimiser's schedule counts applied updates only, and its warm-up starts at a
      # learning rate of 0, so the first applied update changes nothing.
      if applied > 1:
        assert any(not np.array_equal(a, np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(before["params"]), jax.tree.leaves(state["params"])))

  assert skipped > 0
  assert applied > 0


def test_non_finite_streak_stops_run(config_file, tmp_path):
  config = load_config(config_file)
  config.loss.name = "test_always_nan"
  config.train.max_bad_steps = 7
  workdir = tmp_path / "run"
  with pytest.raises(TrainingStopped, match=r"stopped at step 10: the last 10 steps had a "
                     r"non-finite loss.*parameters of step 0.*max_bad_steps"):
    train.train_and_evaluate(config, str(workdir))
  checkpointer = ckpt_lib.Checkpointer(str(workdir))
  assert checkpointer.latest_step() == 10
  checkpointer.close()


def test_dtypes_survive_checkpoints(config_file, tmp_path):
  config = load_config(config_file)
  config.train.steps = 5
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  tokenizer = load_or_train_tokenizer(config, str(workdir))
  experiment = Experiment(config, tokenizer)
  checkpointer = ckpt_lib.Checkpointer(str(workdir))
  state, _, _ = checkpointer.restore(5, experiment.abstract_state)
  checkpointer.close()
  assert state["step"].dtype == jnp.int32
  assert int(state["step"]) == 5
  assert state["bad_steps"].dtype == jnp.int32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))


def test_evaluation_ignores_batch_size_and_padding(config_file, tmp_path):
  config = load_config(config_file)
  tokenizer = load_or_train_tokenizer(config, str(tmp_path))
  experiment = Experiment(config, tokenizer)
  state = experiment.init_state()
  # Perturb the weights so the figure depends on the input at all.
  params = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                        state["params"])
  source = sources.get_source(config.data, "validation")
  eval_step = experiment.make_eval_step()
  figures = []
  for batch_size in (8, 24, 64):
    batches = pipeline.make_eval_batches(source, tokenizer, seq_len=32, batch_size=batch_size)
    figures.append(train.evaluate(eval_step, params, batches, experiment, seed=0))
  tokens = {f["eval/tokens"] for f in figures}
  assert len(tokens) == 1, figures
  for other in figures[1:]:
    np.testing.assert_allclose(other["eval/loss"], figures[0]["eval/loss"], rtol=1e-5)


def test_health_metrics_flag_failure_modes():
  healthy = np.random.default_rng(0).normal(size=(50, 16))
  healthy *= np.sqrt(16) / np.linalg.norm(healthy, axis=1, keepdims=True)
  scalars = metrics.embedding_health(healthy)
  assert 0.8 < scalars["health/embedding_mean_distance"] < 1.2
  assert not metrics.health_warnings(scalars)

  collapsed = healthy.copy()
  collapsed[1] = collapsed[0] + 1e-3
  scalars = metrics.embedding_health(collapsed)
  assert scalars["health/embedding_min_distance"] < 1e-3
  assert any("collapsing" in w for w in metrics.health_warnings(scalars))

  class Ids:
    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

  tokens = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12],
                     [5, 6, 7, 8, 5, 6, 7, 8], [3, 3, 3, 3, 3, 3, 3, 0]])
  scalars = metrics.sample_health(tokens, Ids())
  assert scalars["health/empty_samples"] == 0.5
  # Five 4-grams per row; repeats of an earlier one: 4, 0, 1 and 3.
  assert scalars["health/repeated_ngrams"] == pytest.approx((4 + 0 + 1 + 3) / 20)
  assert any("padding" in w for w in metrics.health_warnings({"health/empty_samples": 0.75}))
  assert any("4-grams" in w for w in metrics.health_warnings({"health/repeated_ngrams": 0.9}))


def test_failed_save_raises_and_keeps_previous(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  state = {"w": jnp.arange(3.0)}
  checkpointer.save(1, state, {"position": 1}, {})
  checkpointer.wait()
  # A data state that JSON cannot encode makes the (partly background) write fail.
  with pytest.raises(TypeError, match="not JSON serializable"):
    checkpointer.save(2, state, {"position": {1, 2}}, {})
    checkpointer.wait()
  assert checkpointer.latest_step() == 1
  fresh = ckpt_lib.Checkpointer(str(tmp_path))
  assert fresh.all_steps() == [1]
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored, data_state, _ = fresh.restore(1, abstract)
  assert data_state == {"position": 1}
  np.testing.assert_array_equal(restored["w"], np.arange(3.0))

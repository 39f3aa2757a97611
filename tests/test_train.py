"""End-to-end training on a tiny config: loss falls, checkpoints restore exactly, runs resume,
and bad input stops with a message before any training."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import config as config_lib
from diffusion_text import inference
from diffusion_text import train
from diffusion_text.data import corpus
from diffusion_text.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  """Three small plays as user text files: two for training, one held out."""
  directory = tmp_path_factory.mktemp("text")
  plays = {p["play"]: p for p in corpus.load_plays()}
  for name in ("macbeth", "twelfth-night", "the-tempest"):
    (directory / f"{name}.txt").write_text(plays[name]["text"][:60_000], encoding="utf-8")
  return directory


def tiny_config(text_dir, tmp_path, **overrides):
  c = config_lib.base_config()
  c.data.files = str(text_dir / "*.txt")
  c.data.validation_files = str(text_dir / "the-tempest.txt")
  c.data.tfds_dir = str(tmp_path / "tfds")
  c.data.seq_len = 32
  c.tokenizer.vocab_size = 400
  c.model.embed_dim = 8
  c.model.width = 48
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.mlp_dim = 96
  c.train.batch_size = 16
  c.train.steps = 60
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 5
  c.train.log_every = 10
  c.train.eval_every = 30
  c.train.eval_batches = 4
  c.train.sample_every = 60
  c.train.checkpoint_every = 20
  c.sample.steps = 4
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_training_lowers_validation_loss_and_writes_outputs(text_dir, tmp_path):
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(tiny_config(text_dir, tmp_path), workdir)
  records = read_metrics(workdir)
  evals = [r["eval/loss"] for r in records if "eval/loss" in r]
  assert evals[0] == pytest.approx(np.log(400), rel=1e-4)  # Zero-initialised rounding head.
  assert evals[-1] < 0.8 * evals[0], evals
  assert final["step"] == 60
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == [10, 20, 30, 40, 50, 60]
  assert all(r["perf/tokens_per_s"] > 0 for r in records if "perf/tokens_per_s" in r)
  assert os.path.exists(os.path.join(workdir, "samples", "step_60.txt"))
  assert glob.glob(os.path.join(workdir, "events", "events.out.tfevents.*"))
  assert os.path.exists(os.path.join(workdir, "plots", "loss.png"))
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))

  # The checkpoint samples and evaluates on its own.
  texts = inference.sample(workdir, num_samples=8, sampler="ode_euler", steps=3, seed=1)
  assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
  result = inference.evaluate(workdir, split="validation", max_batches=4)
  assert result["loss"] == pytest.approx(evals[-1], rel=1e-5)


def test_resume_matches_uninterrupted_run(text_dir, tmp_path):
  """Stopping at step 20 and restarting gives exactly the parameters of a straight 40-step run."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_config(text_dir, tmp_path, **{"train.steps": 40})
  train.train_and_evaluate(config, straight)
  first = train.train_and_evaluate(
      tiny_config(text_dir, tmp_path, **{"train.steps": 40, "train.max_minutes": 1e-9}), resumed)
  stopped_at = first["step"]
  assert 1 <= stopped_at < 40
  final = train.train_and_evaluate(config, resumed)
  assert final["step"] == 40

  # The resumed run logged no step twice, and none before the stop.
  steps = [r["step"] for r in read_metrics(resumed) if "train/loss" in r]
  assert len(steps) == len(set(steps))

  def restore(workdir):
    checkpointer = ckpt_lib.Checkpointer(workdir)
    step = checkpointer.latest_step()
    meta = checkpointer.restore_meta(step)
    _, data_state, _ = None, None, None
    from diffusion_text.experiment import Experiment
    from diffusion_text.data.tokenizer import Tokenizer
    experiment = Experiment(config, Tokenizer.from_bytes(ckpt_lib.decode_bytes(meta["tokenizer"])))
    state, data_state, _ = checkpointer.restore(step, experiment.abstract_state)
    checkpointer.close()
    return step, state, data_state

  step_a, state_a, data_a = restore(straight)
  step_b, state_b, data_b = restore(resumed)
  assert step_a == step_b == 40
  assert data_a == data_b
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_round_trip_is_exact(tmp_path):
  from diffusion_text.experiment import Experiment

  class FakeTokenizer:
    vocab_size = 300

  config = config_lib.base_config()
  config.model.width, config.model.num_layers, config.model.mlp_dim = 24, 1, 48
  config.model.num_heads = 3
  experiment = Experiment(config, FakeTokenizer())
  state = experiment.init_state()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(7, state, {"position": 3}, {"note": "x"})
  checkpointer.wait()
  restored, data_state, meta = checkpointer.restore(7, experiment.abstract_state)
  checkpointer.close()
  assert data_state == {"position": 3}
  assert meta == {"note": "x"}
  assert restored["step"].dtype == np.int32
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- Bad input: each stops before training with a message naming what to fix. -------------------


def test_glob_matching_nothing(text_dir, tmp_path):
  config = tiny_config(text_dir, tmp_path, **{"data.files": str(tmp_path / "nothing*.txt")})
  with pytest.raises(DataError, match=r"nothing\*\.txt.*--config\.data\.files|--config\.data\.files.*nothing"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_empty_and_non_utf8_files(text_dir, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("  \n\n", encoding="utf-8")
  with pytest.raises(DataError, match="empty.txt"):
    train.train_and_evaluate(tiny_config(text_dir, tmp_path, **{"data.files": str(empty)}),
                             str(tmp_path / "run"))
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"latin1\.txt.*\b3\b"):
    train.train_and_evaluate(tiny_config(text_dir, tmp_path, **{"data.files": str(latin)}),
                             str(tmp_path / "run"))


@pytest.mark.parametrize("overrides, flag", [
    ({"data.seq_len": 1}, "data.seq_len"),
    ({"train.batch_size": 12}, "train.batch_size"),  # 8 devices in tests cannot split 12.
    ({"model.num_heads": 5}, "model.num_heads"),
    ({"train.warmup_steps": 100}, "train.warmup_steps"),
    ({"loss.name": "l2"}, "loss.name"),
    ({"mesh.fsdp": 3}, "mesh"),
])
def test_invalid_config_values(text_dir, tmp_path, overrides, flag):
  with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
    train.train_and_evaluate(tiny_config(text_dir, tmp_path, **overrides), str(tmp_path / "run"))


def test_mismatching_workdir_is_left_untouched(text_dir, tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(text_dir, tmp_path, **{"train.steps": 10}), str(workdir))
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}

  with pytest.raises(ConfigError, match=r"model\.width: saved 48, now 64"):
    train.train_and_evaluate(tiny_config(text_dir, tmp_path, **{"model.width": 64}), str(workdir))
  with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size"):
    train.train_and_evaluate(tiny_config(text_dir, tmp_path, **{"tokenizer.vocab_size": 500}),
                             str(workdir))
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert after == before


def test_cli_reports_unknown_config_key(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "diffusion_text", "train", "--config=experiments/demo.py",
       f"--workdir={tmp_path}/run", "--config.train.stepz=5"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=120, check=False)
  assert result.returncode != 0
  assert "train.stepz" in result.stderr
  assert not os.path.exists(tmp_path / "run")


def test_failed_setup_writes_nothing(text_dir, tmp_path):
  """Errors found while setting up (here, a vocabulary too large for the text) leave no files."""
  workdir = tmp_path / "run"
  config = tiny_config(text_dir, tmp_path, **{"tokenizer.vocab_size": 30000})
  with pytest.raises(DataError, match=r"--config\.tokenizer\.vocab_size"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
  # The fix the message suggests now works in the same workdir.
  final = train.train_and_evaluate(tiny_config(text_dir, tmp_path, **{"train.steps": 6}),
                                   str(workdir))
  assert final["step"] == 6

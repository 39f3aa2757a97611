"""Sampling and evaluation of a trained run, read back from its workdir."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import train as train_lib
from diffusion_text.data import pipeline
from diffusion_text.data import sources
from diffusion_text.data.tokenizer import Tokenizer
from diffusion_text.errors import ConfigError
from diffusion_text.experiment import Experiment, TOKENIZER_FILE, load_saved_config


def load_run(workdir: str) -> tuple[Experiment, dict, int]:
  """Rebuild the experiment saved in `workdir` and restore its newest checkpoint.

  Returns (experiment, state, step). The config and tokenizer come from the checkpoint itself,
  so a checkpoint folder copied elsewhere with its workdir still samples.
  """
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} does not exist; pass the folder a training run wrote.")
  step, meta = ckpt_lib.require_checkpoint(workdir)
  config = ml_collections.ConfigDict(meta.get("config") or load_saved_config(workdir))
  tokenizer = Tokenizer.from_bytes(ckpt_lib.decode_bytes(meta["tokenizer"]))
  experiment = Experiment(config, tokenizer)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    state, _, _ = checkpointer.restore(step, experiment.abstract_state)
  finally:
    checkpointer.close()
  logging.info("loaded step %d from %s", step, os.path.join(workdir, "checkpoints"))
  return experiment, state, step


def sample(workdir: str, *, num_samples: int, sampler: str | None, steps: int | None,
           seed: int, use_ema: bool = True) -> list[str]:
  experiment, state, _ = load_run(workdir)
  config = experiment.config
  sample_fn = experiment.make_sampler(sampler=sampler or config.sample.sampler,
                                      steps=steps or config.sample.steps, num_samples=num_samples)
  params = state["ema"] if use_ema else state["params"]
  rng = jax.random.key(seed)
  tokens, _ = sample_fn(params, rng)
  return experiment.decode(tokens)


def evaluate(workdir: str, *, split: str, max_batches: int, use_ema: bool = True) -> dict:
  """Validation loss of the newest checkpoint on `split` (mean cross-entropy in nats/token)."""
  experiment, state, step = load_run(workdir)
  config = experiment.config
  source = sources.get_source(config.data, split)
  batches = list(pipeline.make_eval_batches(
      source, experiment.tokenizer, seq_len=config.data.seq_len,
      batch_size=config.train.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), max_batches=max_batches or None))
  eval_step = experiment.make_eval_step()
  params = state["ema"] if use_ema else state["params"]
  scalars = train_lib.evaluate(eval_step, params, batches, experiment, config.seed)
  return {"step": step, "split": split, "loss": scalars["eval/loss"],
          "tokens": int(scalars["eval/tokens"]), "weights": "ema" if use_ema else "params"}

"""Training loop: data, model and state set-up, the compiled step, evaluation, samples, checkpoints.

`train_and_evaluate(config, workdir)` reads top to bottom as phases. Resume is the default path:
when `<workdir>/checkpoints/` holds a checkpoint, the run continues from the newest one with the
same data order and random stream; otherwise it starts from scratch.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import jax
import ml_collections
import numpy as np

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import config as config_lib
from diffusion_text import metrics as metrics_lib
from diffusion_text import parallel
from diffusion_text.data import pipeline
from diffusion_text.data import sources
from diffusion_text.errors import ConfigError
from diffusion_text.experiment import Experiment, load_or_train_tokenizer, prepare_workdir
from diffusion_text.experiment import tokenizer_digest

# Streams split from the seed, so that training noise, evaluation noise and samples never share
# random numbers and each is reproducible on its own.
TRAIN_STREAM, EVAL_STREAM, SAMPLE_STREAM = 1, 2, 3


def evaluate(eval_step, params, batches: list[dict[str, np.ndarray]], experiment: Experiment,
             seed: int) -> dict[str, float]:
  """Mean validation loss over `batches`, with the same noise at every evaluation."""
  rng = jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)
  total, count = 0.0, 0.0
  for i, batch in enumerate(batches):
    loss_sum, tokens = eval_step(params, parallel.global_batch(batch, experiment.mesh),
                                 jax.random.fold_in(rng, i))
    total += float(loss_sum)
    count += float(tokens)
  return {"eval/loss": total / max(count, 1.0), "eval/tokens": count}


def draw_samples(sample_fn, params, experiment: Experiment, seed: int, step: int) -> list[str]:
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SAMPLE_STREAM), step)
  tokens, _ = sample_fn(params, rng)
  return experiment.decode(tokens)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train (or resume) the model of `config` in `workdir`; return the final metrics."""
  t_start = time.perf_counter()

  # -- Config and workdir: everything that can be wrong is checked before work starts.
  config_lib.validate(config)
  train_source = sources.get_source(config.data, "train")
  eval_source = sources.get_source(config.data, "validation")
  prepare_workdir(config, workdir)
  logging.info("workdir: %s", workdir)

  # -- Tokenizer and model.
  tokenizer = load_or_train_tokenizer(config, workdir)
  experiment = Experiment(config, tokenizer)
  logging.info("model: %s parameters, mesh %s on %d devices (%d processes)",
               f"{experiment.num_params():,}", dict(experiment.mesh.shape), jax.device_count(),
               jax.process_count())

  # -- Data.
  train_iter = pipeline.make_train_iterator(
      train_source, tokenizer, seq_len=config.data.seq_len,
      global_batch_size=config.train.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_batches = list(pipeline.make_eval_batches(
      eval_source, tokenizer, seq_len=config.data.seq_len, batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      max_batches=config.train.eval_batches or None))

  # -- State: resume from the newest checkpoint in the workdir, else start from scratch.
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  digest = tokenizer_digest(tokenizer)
  latest = checkpointer.latest_step()
  if latest is not None:
    state, data_state, meta = checkpointer.restore(latest, experiment.abstract_state)
    if meta.get("tokenizer_sha256") != digest:
      raise ConfigError(f"the checkpoint at step {latest} in {checkpointer.directory} was trained "
                        f"with a different tokenizer than {workdir}/tokenizer.model; use a new "
                        "--workdir.")
    train_iter.set_state(data_state)
    logging.info("resume: continuing from step %d (%s)", latest, checkpointer.directory)
  else:
    state = experiment.init_state()
  meta = {"config": config.to_dict(), "tokenizer_sha256": digest,
          "tokenizer": ckpt_lib.encode_bytes(tokenizer.serialized())}

  # -- Compile.
  train_step = experiment.make_train_step()
  eval_step = experiment.make_eval_step()
  sample_fn = experiment.make_sampler(sampler=config.sample.sampler, steps=config.sample.steps,
                                      num_samples=config.sample.num_samples)
  train_rng = jax.random.fold_in(jax.random.key(config.seed), TRAIN_STREAM)

  writer = metrics_lib.MetricWriter(workdir)
  peak = metrics_lib.measure_matmul_flops()
  tokens_per_step = config.train.batch_size * config.data.seq_len
  total_steps = config.train.steps
  step = int(jax.device_get(state["step"]))
  progress = metrics_lib.Progress(total_steps, step, tokens_per_step,
                                  experiment.train_flops_per_token() * tokens_per_step, peak)
  logging.info("set-up took %.1f s; measured matmul rate %.1f GFLOP/s (the MFU denominator)",
               time.perf_counter() - t_start, peak / 1e9)

  def run_eval(step: int) -> dict[str, float]:
    scalars = evaluate(eval_step, state["ema"], eval_batches, experiment, config.seed)
    writer.write_scalars(step, scalars)
    logging.info("eval step %d: validation loss %.4f (EMA weights, %d tokens)", step,
                 scalars["eval/loss"], scalars["eval/tokens"])
    return scalars

  def run_samples(step: int) -> None:
    texts = draw_samples(sample_fn, state["ema"], experiment, config.seed, step)
    path = writer.write_samples(step, texts, header=f"# step {step}, sampler "
                                f"{config.sample.sampler}, {config.sample.steps} steps, EMA weights")
    logging.info("samples at step %d written to %s; first one:\n%s", step, path, texts[0][:400])

  def save(step: int) -> None:
    checkpointer.save(step, state, train_iter.get_state(), meta)

  # -- Loop.
  final = {}
  if step == 0:
    final.update(run_eval(0))
  if step >= total_steps:
    logging.info("training already complete at step %d of %d", step, total_steps)
  pending: list[dict[str, jax.Array]] = []
  first_step = step
  deadline = t_start + 60.0 * config.train.max_minutes if config.train.max_minutes else None
  progress.restart_clock(step)
  while step < total_steps:
    batch = parallel.global_batch(next(train_iter), experiment.mesh)
    state, step_metrics = train_step(state, batch, train_rng)
    pending.append(step_metrics)
    step += 1
    if step == first_step + 1:
      jax.block_until_ready(state)
      logging.info("compiled and ran the first step in %.1f s", time.perf_counter()
                   - progress.start_time)
      progress.restart_clock(step)  # Compile time is not training time.

    out_of_time = deadline is not None and time.perf_counter() > deadline
    last = step == total_steps or out_of_time
    if step % config.train.log_every == 0 or last:
      scalars = _mean_metrics(pending)
      pending.clear()
      scalars.update(progress.measure(step))
      writer.write_scalars(step, scalars)
      logging.info(progress.line(step, scalars))
      final.update(scalars)
    if step % config.train.eval_every == 0 or last:
      final.update(run_eval(step))
    if step % config.train.sample_every == 0 or last:
      run_samples(step)
    if step % config.train.checkpoint_every == 0 or last:
      save(step)
    if step % config.train.log_every == 0 or last:
      progress.restart_clock(step)  # Evaluation, sampling and saving are not training time.
    if out_of_time:
      logging.warning("stopping at step %d: --config.train.max_minutes=%s reached; rerun the "
                      "same command to continue", step, config.train.max_minutes)
      break

  # -- Finish: wait for the last checkpoint, draw the curves.
  checkpointer.wait()
  checkpointer.close()
  for path in writer.plot():
    logging.info("plot: %s", path)
  writer.close()
  logging.info("done at step %d in %s", step, metrics_lib.format_duration(
      time.perf_counter() - t_start))
  final["step"] = step
  return final


def _mean_metrics(pending: Iterable[dict[str, jax.Array]]) -> dict[str, float]:
  """Average each metric over the logging interval, ignoring NaN (empty time bins)."""
  host = jax.device_get(list(pending))
  if not host:
    return {}
  out = {}
  for key in host[0]:
    values = np.array([float(m[key]) for m in host])
    finite = values[~np.isnan(values)]
    out[key] = float(finite.mean()) if finite.size else float("nan")
  return out

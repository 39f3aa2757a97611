"""Training loop: data, model and state set-up, the compiled step, evaluation, samples, checkpoints.

`train_and_evaluate(config, workdir)` reads top to bottom as phases. Resume is the default path:
when `<workdir>/checkpoints/` contains a checkpoint, the run continues from the newest
readable one with the same data order and random stream. Otherwise it starts from scratch.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import config as config_lib
from diffusion_text import metrics as metrics_lib
from diffusion_text import parallel
from diffusion_text.data import pipeline
from diffusion_text.data import sources
from diffusion_text.errors import ConfigError, TrainingStopped
from diffusion_text.experiment import Experiment, check_batch_size, check_workdir
from diffusion_text.experiment import load_or_train_tokenizer, record_workdir
from diffusion_text.experiment import tokenizer_digest

# Streams split from the seed, so that training noise, evaluation noise and samples never share
# random numbers and each is reproducible on its own.
TRAIN_STREAM, EVAL_STREAM, SAMPLE_STREAM = 1, 2, 3


# Fractional part of the golden ratio: i * GOLDEN mod 1 spreads any run of windows evenly over
# [0, 1) (a Kronecker low-discrepancy sequence), whatever the batch boundaries.
GOLDEN = 0.6180339887498949


def eval_times(index: np.ndarray, t_min: float) -> np.ndarray:
  """Diffusion time of each evaluation window, a function of its index in the split alone."""
  return (t_min + (1.0 - t_min) * np.mod(0.5 + index * GOLDEN, 1.0)).astype(np.float32)


def evaluate(eval_step, params, batches: list[dict[str, np.ndarray]], experiment: Experiment,
             seed: int) -> dict[str, float]:
  """Mean validation cross-entropy (nats per token) over `batches`, with the same noise for each
  window at every evaluation and for any batch size."""
  rng = jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)
  total, count = 0.0, 0.0
  for i, batch in enumerate(batches):
    local = len(batch["tokens"])
    first = (i * jax.process_count() + jax.process_index()) * local
    index = np.arange(first, first + local, dtype=np.int32)
    batch = {**batch, "index": index, "t": eval_times(index, experiment.schedule.t_min)}
    loss_sum, tokens = eval_step(params, parallel.global_batch(batch, experiment.mesh), rng)
    total += float(loss_sum)
    count += float(tokens)
  return {"eval/loss": total / max(count, 1.0), "eval/tokens": count}


def draw_sample_tokens(sample_fn, params, seed: int, step: int) -> jax.Array:
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), SAMPLE_STREAM), step)
  tokens, _ = sample_fn(params, rng)
  return tokens


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Train (or resume) the model of `config` in `workdir`; return the final metrics."""
  t_start = time.perf_counter()

  # -- Config and workdir: everything that can be wrong is checked before work starts.
  config_lib.validate(config)
  check_batch_size(parallel.make_mesh(config.mesh), config.train.batch_size,
                   "--config.train.batch_size")
  train_source = sources.get_source(config.data, "train")
  eval_source = sources.get_source(config.data, "validation")
  check_workdir(config, workdir)
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

  # Every check has passed: only now does the workdir get its config and tokenizer.
  record_workdir(config, workdir, tokenizer)

  # -- State: resume from the newest readable checkpoint in the workdir, else start from scratch.
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  digest = tokenizer_digest(tokenizer)
  pending: list[dict] = []  # Per-step metrics not yet averaged into a progress line.
  restored = checkpointer.restore_newest_good(experiment.abstract_state)
  if restored is not None:
    latest, state, data_state, saved_meta = restored
    if saved_meta.get("tokenizer_sha256") != digest:
      raise ConfigError(f"the checkpoint at step {latest} in {checkpointer.directory} was trained "
                        f"with a different tokenizer than {workdir}/tokenizer.model; use a new "
                        "--workdir.")
    train_iter.set_state(data_state)
    pending = list(saved_meta.get("pending_metrics", []))
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
    if experiment.kind == "diffusion":  # Only diffused embeddings can collapse.
      table = experiment.model.apply({"params": state["ema"]},
                                     method=experiment.model.embedding_table)
      scalars.update(metrics_lib.embedding_health(parallel.gather_to_host(table)))
    for warning in metrics_lib.health_warnings(scalars):
      logging.warning("step %d: %s", step, warning)
    writer.write_scalars(step, scalars)
    logging.info("eval step %d: validation loss %.4f (EMA weights, %d tokens)", step,
                 scalars["eval/loss"], scalars["eval/tokens"])
    return scalars

  def run_samples(step: int) -> None:
    tokens = draw_sample_tokens(sample_fn, state["ema"], config.seed, step)
    texts = experiment.decode(tokens)
    scalars = metrics_lib.sample_health(parallel.gather_to_host(tokens), tokenizer)
    writer.write_scalars(step, scalars)
    if experiment.kind == "ar":
      method = (f"AR decoding, temperature {config.sample.temperature}, top_p "
                f"{config.sample.top_p}")
    else:
      method = f"sampler {config.sample.sampler}, {config.sample.steps} steps"
    path = writer.write_samples(step, texts, header=f"# step {step}, {method}, EMA weights")
    if path:
      logging.info("samples at step %d written to %s; first one:\n%s", step, path, texts[0][:400])
    for warning in metrics_lib.health_warnings(scalars):
      logging.warning("step %d: %s", step, warning)

  def save(step: int) -> None:
    # Metrics of a partial logging interval travel with the checkpoint, so a resumed run logs
    # the same averages as an uninterrupted one.
    meta["pending_metrics"] = _to_floats(pending)
    checkpointer.save(step, state, train_iter.get_state(), meta)

  # -- Loop.
  final = {}
  if step == 0:
    final.update(run_eval(0))
  if step >= total_steps:
    logging.info("training already complete at step %d of %d", step, total_steps)
  first_step = step
  deadline = t_start + 60.0 * config.train.max_minutes if config.train.max_minutes else None
  stop = StopRequest.install()
  progress.restart_clock(step)
  try:
    while step < total_steps:
      batch = parallel.global_batch(next(train_iter), experiment.mesh)
      state, step_metrics = train_step(state, batch, train_rng)
      if pending:
        # Wait for the previous step, so the host stays at most one step ahead of the device
        # and a stop request is acted on within a step or two.
        jax.block_until_ready(pending[-1]["train/loss"])
      pending.append(step_metrics)
      step += 1
      if step == first_step + 1:
        jax.block_until_ready(state)
        logging.info("compiled and ran the first step in %.1f s", time.perf_counter()
                     - progress.start_time)
        progress.restart_clock(step)  # Compile time is not training time.

      last = step == total_steps
      if step % config.train.log_every == 0 or last:
        pending = _to_floats(pending)
        _report_skipped_steps(pending, step)
        scalars = _mean_metrics(pending)
        pending = []
        scalars.update(progress.measure(step))
        writer.write_scalars(step, scalars)
        logging.info(progress.line(step, scalars))
        final.update(scalars)
        bad_steps = int(jax.device_get(state["bad_steps"]))
        if bad_steps >= config.train.max_bad_steps:
          save(step)
          checkpointer.wait()
          raise TrainingStopped(
              f"stopped at step {step}: the last {bad_steps} steps had a non-finite loss or "
              f"gradients, so none of them changed the parameters. The checkpoint of step {step} "
              f"in {checkpointer.directory} contains the parameters of step {step - bad_steps}. "
              "Lower --config.train.learning_rate or --config.train.grad_clip, or check the "
              "data, then resume; --config.train.max_bad_steps sets this limit.")
      if step % config.train.eval_every == 0 or last:
        final.update(run_eval(step))
      if step % config.train.sample_every == 0 or last:
        run_samples(step)
      if step % config.train.checkpoint_every == 0 or last:
        save(step)
      if step % config.train.log_every == 0 or last:
        progress.restart_clock(step)  # Evaluation, sampling and saving are not training time.

      # Preemption or the time limit: save where we are and leave; rerunning continues. This
      # comes after the step's periodic work, so a resumed run repeats and skips none of it.
      reason = stop.reason(out_of_time=deadline is not None and time.perf_counter() > deadline)
      if reason and not last:
        if step % config.train.checkpoint_every:
          save(step)
        logging.warning("stopped at step %d (%s); checkpoint saved in %s. Rerun the same "
                        "command to continue.", step, reason, checkpointer.directory)
        final["stopped"] = reason
        break
  finally:
    stop.uninstall()

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


def _to_floats(pending: list[dict]) -> list[dict[str, float]]:
  """Copy per-step metrics to the host as plain floats (JSON-safe, for checkpoints too)."""
  return [{k: float(v) for k, v in m.items()} for m in jax.device_get(list(pending))]


def _mean_metrics(pending: list[dict[str, float]]) -> dict[str, float]:
  """Average each metric over the logging interval, ignoring NaN (empty time bins)."""
  if not pending:
    return {}
  out = {}
  for key in pending[0]:
    values = np.array([m[key] for m in pending], dtype=np.float64)
    finite = values[np.isfinite(values)]
    out[key] = float(finite.mean()) if finite.size else float("nan")
  return out


def _report_skipped_steps(pending: list[dict[str, float]], last_step: int) -> None:
  first_step = last_step - len(pending) + 1
  for offset, m in enumerate(pending):
    if m.get("train/skipped", 0.0) > 0:
      logging.warning("step %d skipped: loss %s, gradient norm %s are not both finite; the batch "
                      "of that step left the parameters and optimiser state unchanged",
                      first_step + offset, m.get("train/loss"), m.get("train/grad_norm"))


class StopRequest:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  A second signal of the same kind interrupts at once. In a multi-process run the processes
  agree on the stop step, so they save the same checkpoint together.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  @classmethod
  def install(cls) -> "StopRequest":
    request = cls()
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        request._previous[signum] = signal.signal(signum, request._handle)
    return request

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    logging.warning("received %s: stopping after the current step (send it again to stop at "
                    "once, without a checkpoint)", self.signal_name)

  def reason(self, out_of_time: bool) -> str | None:
    local = self.signal_name or ("time limit --config.train.max_minutes" if out_of_time else None)
    if jax.process_count() == 1:
      return local
    # Every process must stop at the same step, so they vote each step.
    votes = multihost_utils.process_allgather(np.int32(local is not None))
    return (local or "another process is stopping") if np.any(votes) else None

  def uninstall(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

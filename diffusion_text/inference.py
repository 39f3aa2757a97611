"""Sampling and evaluation of a trained run, read back from its workdir.

Sampling can condition on text: `--prefix=TEXT` fixes the first tokens, and
`--template=TEXT` fixes literal text with gaps written as `[MASK]` (one token) or `[MASK:N]`
(N tokens), e.g. "To be, or [MASK:3] to be". Positions after the prefix or template are
generated too. Evaluation reports the variational bound of `likelihood.py` in bits per token.
"""

from __future__ import annotations

import logging
import os
import re

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import likelihood
from diffusion_text import parallel
from diffusion_text import paths
from diffusion_text import samplers
from diffusion_text import train as train_lib
from diffusion_text.data import pipeline
from diffusion_text.data import sources
from diffusion_text.data.tokenizer import Tokenizer
from diffusion_text.errors import ConfigError
from diffusion_text.experiment import Experiment, KIND_NAMES, TOKENIZER_FILE
from diffusion_text.experiment import load_saved_config


def load_run(workdir: str) -> tuple[Experiment, dict, int]:
  """Rebuild the experiment saved in `workdir` and restore its newest checkpoint.

  Returns (experiment, state, step). The config and tokenizer come from the checkpoint itself,
  so a checkpoint folder copied elsewhere with its workdir still samples.
  """
  paths.check_workdir_url(workdir)
  if not epath.Path(workdir).is_dir():
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


PLACEHOLDER = re.compile(r"\[MASK(?::(\d+))?\]")


def parse_template(tokenizer: Tokenizer, template: str, seq_len: int,
                   flag: str = "--template") -> tuple[np.ndarray, np.ndarray]:
  """Token ids [seq_len] and fixed-position mask [seq_len] of a template with `[MASK]` gaps.

  Each literal piece of text is tokenized on its own, `[MASK]` leaves one position free and
  `[MASK:N]` leaves N. Positions after the template are free. `flag` names the text's source
  in the error for a template longer than the model.
  """
  tokens = np.zeros(seq_len, np.int32)
  fixed = np.zeros(seq_len, bool)
  position = 0

  def place(ids, is_fixed):
    nonlocal position
    if position + len(ids) > seq_len:
      start = template if len(template) <= 60 else template[:60] + "..."
      raise ConfigError(f"{flag} needs at least {position + len(ids)} positions, but the model "
                        f"has {seq_len}; shorten it. It starts {start!r}.")
    tokens[position:position + len(ids)] = ids
    fixed[position:position + len(ids)] = is_fixed
    position += len(ids)

  cursor = 0
  for match in PLACEHOLDER.finditer(template):
    place(tokenizer.encode(template[cursor:match.start()]), True)
    place([0] * int(match.group(1) or 1), False)
    cursor = match.end()
  place(tokenizer.encode(template[cursor:]), True)
  return tokens, fixed


def make_sampler(experiment: Experiment, *, sampler: str, steps: int, num_samples: int,
                 conditioned: bool = False, guidance: float | None = None, grid: str = "t",
                 clamp: bool = False, rounding: str = "argmax", rounding_float64: bool = False):
  """Compile sampling with every option of `samplers.generate`.

  Returns `fn(params, rng)`, or `fn(params, rng, tokens_bt, fixed_bt)` when `conditioned`, that
  returns (tokens [num_samples, seq_len], logits).
  """
  experiment._check_batch(num_samples, "--num_samples")  # pylint: disable=protected-access
  model, schedule = experiment.model, experiment.schedule
  shape = (num_samples, experiment.config.data.seq_len, experiment.config.model.embed_dim)
  if guidance is not None and not experiment.model_config.conditional:
    raise ConfigError("--guidance needs a model trained with --config.model.conditional=True; "
                      "this run's network does not read the fixed tokens.")
  if guidance is not None and not conditioned:
    raise ConfigError("--guidance needs fixed tokens; pass --prefix or --template.")

  def sample(params, rng, tokens_bt=None, fixed_bt=None):
    def denoise(z, t_b, x0_self, cond=None):
      return model.apply({"params": params}, z, schedule.log_snr(t_b), x0_self, None, True, cond,
                         method=model.denoise)

    def interpolate(logits):
      return model.apply({"params": params}, logits, method=model.interpolate)

    table = model.apply({"params": params}, method=model.embedding_table)
    condition = samplers.Condition(tokens_bt, fixed_bt) if conditioned else None
    return samplers.generate(
        denoise, interpolate, schedule, rng, shape=shape, sampler=sampler, steps=steps,
        grid=grid, table=table, clamp=clamp, condition=condition, guidance=guidance,
        rounding=rounding, rounding_dtype=jnp.float64 if rounding_float64 else jnp.float32)

  params_sharding = experiment.state_shardings["params"]
  in_shardings = (params_sharding, experiment.replicated)
  if conditioned:
    in_shardings += (experiment.batch_sharding, experiment.batch_sharding)
  with jax.set_mesh(experiment.mesh), nn.logical_axis_rules(experiment.rules):
    return jax.jit(sample, in_shardings=in_shardings,
                   out_shardings=(experiment.batch_sharding, experiment.batch_sharding))


def _check_ar_options(*, sampler, steps, template, guidance, grid, clamp, rounding,
                      rounding_float64) -> None:
  """Raise ConfigError for a diffusion-only sampling option given to an AR run."""
  flag_is_set = {"--sampler": sampler is not None, "--steps": steps is not None,
                 "--template": template is not None, "--guidance": guidance is not None,
                 "--grid": grid is not None, "--clamp": clamp is not None,
                 "--rounding": rounding != "argmax", "--rounding_float64": rounding_float64}
  wrong = [flag for flag, is_set in flag_is_set.items() if is_set]
  if wrong:
    predicate = ("is a diffusion sampling option" if len(wrong) == 1
                 else "are diffusion sampling options")
    raise ConfigError(f"{', '.join(wrong)} {predicate}, but this run is an autoregressive "
                      "model. Use --prefix, --temperature and --top_p instead.")


def sample(workdir: str, *, num_samples: int, sampler: str | None, steps: int | None,
           seed: int, use_ema: bool = True, prefix: str | None = None,
           template: str | None = None, guidance: float | None = None, grid: str | None = None,
           clamp: bool | None = None, rounding: str = "argmax",
           rounding_float64: bool = False, temperature: float | None = None,
           top_p: float | None = None) -> list[str]:
  """Draw `num_samples` texts; unset options fall back to the run's `sample.*` config.

  `temperature` and `top_p` apply to AR runs, every other option to diffusion runs.
  """
  if prefix is not None and template is not None:
    raise ConfigError("--prefix and --template both fix text; pass only one.")
  if num_samples < 1:
    raise ConfigError(f"--num_samples={num_samples} must be at least 1.")
  if steps is not None and steps < 1:
    raise ConfigError(f"--steps={steps} must be at least 1 (leave it out to use the run's "
                      "sample.steps).")
  if rounding_float64:
    # Must happen before any array is created, so that float64 exists inside the compiled step.
    jax.config.update("jax_enable_x64", True)
  experiment, state, _ = load_run(workdir)
  config = experiment.config
  params = state["ema"] if use_ema else state["params"]
  rng = jax.random.key(seed)
  conditioned = prefix is not None or template is not None
  if experiment.kind == "ar":
    _check_ar_options(sampler=sampler, steps=steps, template=template, guidance=guidance,
                      grid=grid, clamp=clamp, rounding=rounding,
                      rounding_float64=rounding_float64)
    temperature = config.sample.get("temperature", 1.0) if temperature is None else temperature
    top_p = config.sample.get("top_p", 1.0) if top_p is None else top_p
    if temperature < 0.0:
      raise ConfigError(f"--temperature={temperature} must be at least 0 (0 picks the most "
                        "likely token).")
    if not 0.0 < top_p <= 1.0:
      raise ConfigError(f"--top_p={top_p} must lie in (0, 1].")
    sample_fn = experiment.make_ar_sampler(num_samples=num_samples, temperature=temperature,
                                           top_p=top_p, conditioned=conditioned)
    logging.info("sampling %d sequences by AR decoding, temperature %g, top_p %g", num_samples,
                 temperature, top_p)
  else:
    if temperature is not None or top_p is not None:
      raise ConfigError("--temperature and --top_p apply to autoregressive runs; this run is a "
                        "diffusion model (see --sampler, --steps and --rounding).")
    sample_fn = _diffusion_sampler(experiment, num_samples=num_samples, sampler=sampler,
                                   steps=steps, grid=grid, clamp=clamp, guidance=guidance,
                                   conditioned=conditioned, rounding=rounding,
                                   rounding_float64=rounding_float64)
  if not conditioned:
    tokens, _ = sample_fn(params, rng)
    return experiment.decode(tokens)

  text = template if template is not None else prefix
  tokens_t, fixed_t = parse_template(experiment.tokenizer, text, config.data.seq_len,
                                     "--template" if template is not None else "--prefix")
  local_rows = num_samples // jax.process_count()
  batch = lambda row: parallel.global_batch({"x": np.tile(row, (local_rows, 1))},
                                            experiment.mesh)["x"]
  tokens, _ = sample_fn(params, rng, batch(tokens_t), batch(fixed_t))
  return experiment.decode(tokens)


def _diffusion_sampler(experiment: Experiment, *, num_samples, sampler, steps, grid, clamp,
                       guidance, conditioned, rounding, rounding_float64):
  """`make_sampler` with unset options taken from the run's config; logs what it runs."""
  config = experiment.config
  sampler = sampler or config.sample.sampler
  steps = config.sample.steps if steps is None else steps
  grid = grid or config.sample.get("grid", "t")
  clamp = config.sample.get("clamp", False) if clamp is None else clamp
  sample_fn = make_sampler(experiment, sampler=sampler, steps=steps, num_samples=num_samples,
                           conditioned=conditioned, guidance=guidance, grid=grid, clamp=clamp,
                           rounding=rounding, rounding_float64=rounding_float64)
  logging.info("sampling %d sequences with %s, %d steps (%d network evaluations), grid %s",
               num_samples, sampler, steps, samplers.nfe(sampler, steps, guidance is not None),
               grid)
  return sample_fn


def make_elbo_step(experiment: Experiment):
  """Compile (params, batch with mask, rng) -> per-sequence terms of `likelihood.elbo_terms`."""
  model, schedule = experiment.model, experiment.schedule

  def elbo_step(params, batch, rng):
    tokens_bt, mask_bt = batch["tokens"], batch["mask"]
    x0_btl = model.apply({"params": params}, tokens_bt, method=model.embed)

    def denoise(z, t_b):
      return model.apply({"params": params}, z, schedule.log_snr(t_b), jnp.zeros_like(z),
                         mask_bt, method=model.denoise)

    def interpolate(logits):
      return model.apply({"params": params}, logits, method=model.interpolate)

    return likelihood.elbo_terms(denoise, interpolate, schedule, x0_btl, tokens_bt, mask_bt, rng)

  with jax.set_mesh(experiment.mesh), nn.logical_axis_rules(experiment.rules):
    return jax.jit(elbo_step, in_shardings=(experiment.state_shardings["params"],
                                            experiment.batch_sharding, experiment.replicated),
                   out_shardings=experiment.batch_sharding)


def evaluate(workdir: str, *, split: str, max_batches: int, use_ema: bool = True,
             time_samples: int = 1) -> dict:
  """Compute the likelihood bound of the newest checkpoint on `split`, in bits per token.

  Each sequence's terms are averaged over `time_samples` independent draws of t and noise.
  The result also contains "loss", the training objective (mean cross-entropy in nats per token).
  For an AR run `total_bits_per_token` is the exact negative log-likelihood instead (its only
  term is `nll`), and `time_samples` must stay 1.
  """
  if time_samples < 1:
    raise ConfigError(f"--time_samples={time_samples} must be at least 1.")
  experiment, state, step = load_run(workdir)
  if experiment.kind == "ar" and time_samples != 1:
    raise ConfigError(f"--time_samples={time_samples}: an AR model's likelihood is exact, "
                      "with no time to sample; leave the flag out.")
  config = experiment.config
  source = sources.get_source(config.data, split)
  batches = list(pipeline.make_eval_batches(
      source, experiment.tokenizer, seq_len=config.data.seq_len,
      batch_size=config.train.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), max_batches=max_batches or None))
  params = state["ema"] if use_ema else state["params"]
  scalars = train_lib.evaluate(experiment.make_eval_step(), params, batches, experiment,
                               config.seed)
  summary = {"step": step, "split": split, "weights": "ema" if use_ema else "params"}
  if experiment.kind == "ar":
    nll = exact_nll(experiment, params, batches)
    logging.info("negative log-likelihood on %s: %.4f +- %.4f bits/token over %d sequences",
                 split, nll["total_bits_per_token"], nll["total_stderr"], nll["sequences"])
    return {**summary, **nll, "loss": scalars["eval/loss"],
            "loss_tokens": int(scalars["eval/tokens"])}

  elbo_step = make_elbo_step(experiment)
  rng = jax.random.fold_in(jax.random.key(config.seed), train_lib.EVAL_STREAM)
  per_sequence: dict[str, list[np.ndarray]] = {}
  for i, batch in enumerate(batches):
    global_batch = parallel.global_batch(batch, experiment.mesh)
    draws = [parallel.gather_to_host(elbo_step(params, global_batch,
                                               jax.random.fold_in(rng, i * time_samples + k)))
             for k in range(time_samples)]
    for name in draws[0]:
      per_sequence.setdefault(name, []).append(np.mean([d[name] for d in draws], axis=0))
  stacked = {name: np.concatenate(parts) for name, parts in per_sequence.items()}
  # Padding rows of the last batch hold no tokens and carry no information.
  real = stacked["tokens"] > 0
  bound = likelihood.summarize({name: values[real] for name, values in stacked.items()})
  logging.info("bound on %s: %.4f +- %.4f bits/token over %d sequences, %d draws of t each",
               split, bound["total_bits_per_token"], bound["total_stderr"], bound["sequences"],
               time_samples)
  return {**summary, "time_samples": time_samples, **bound, "loss": scalars["eval/loss"],
          "loss_tokens": int(scalars["eval/tokens"])}


def exact_nll(experiment: Experiment, params, batches: list[dict[str, np.ndarray]]) -> dict:
  """Compute an AR model's negative log-likelihood of `batches` in bits per token, with its
  standard error."""
  token_nll = experiment.make_token_nll()
  nats, tokens = [], []
  for batch in batches:
    global_batch = parallel.global_batch(batch, experiment.mesh)
    nats.append(parallel.gather_to_host(
        token_nll(params, global_batch["tokens"], global_batch["mask"])))
    tokens.append(parallel.gather_to_host(global_batch["mask"]).sum(axis=1))
  nats_s, tokens_s = np.concatenate(nats), np.concatenate(tokens)
  real = tokens_s > 0  # Padding rows of the last batch hold no tokens.
  return likelihood.summarize({"nll": nats_s[real], "tokens": tokens_s[real]}, terms=("nll",))


class TextJudge:
  """Scores text with a trained AR run: the generative perplexity of another model's samples.

  Texts are encoded with the judge's own tokenizer, so the sampling model may use another one,
  and each text is cut to the judge's `seq_len` tokens. Token 0 of each text is predicted from
  BOS alone.
  """

  def __init__(self, workdir: str, use_ema: bool = True):
    if jax.process_count() > 1:
      raise ConfigError("scoring text with a judge runs in a single process; start it without "
                        "the distributed runtime.")
    self.experiment, state, self.step = load_run(workdir)
    if self.experiment.kind != "ar":
      raise ConfigError(f"{workdir} is a run of {KIND_NAMES[self.experiment.kind]}, but a judge "
                        "must be an autoregressive run (for example one trained with "
                        "experiments/ar.py).")
    self.params = state["ema"] if use_ema else state["params"]
    self._token_nll = self.experiment.make_token_nll()

  def score(self, texts: list[str]) -> dict[str, float]:
    """Negative log-likelihood of `texts` in bits per (judge) token, with its standard error."""
    experiment = self.experiment
    seq_len = experiment.config.data.seq_len
    rows = [experiment.tokenizer.encode(text)[:seq_len] for text in texts]
    divisor = parallel.batch_divisor(experiment.mesh)
    padded = -(-len(rows) // divisor) * divisor
    tokens = np.zeros((padded, seq_len), np.int32)
    mask = np.zeros((padded, seq_len), np.float32)
    for i, ids in enumerate(rows):
      tokens[i, :len(ids)] = ids
      mask[i, :len(ids)] = 1.0
    batch = parallel.global_batch({"tokens": tokens, "mask": mask}, experiment.mesh)
    nats = parallel.gather_to_host(self._token_nll(self.params, batch["tokens"], batch["mask"]))
    counts = mask.sum(axis=1)
    real = counts > 0  # Empty texts and padding rows carry no tokens.
    return likelihood.summarize({"nll": nats[real], "tokens": counts[real]}, terms=("nll",))

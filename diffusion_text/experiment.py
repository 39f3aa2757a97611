"""Everything a run is built from: workdir checks, tokenizer, model, sharded state, compiled steps.

`train`, `sample` and `eval` all start from `Experiment`, so a checkpoint written by one is read
the same way by the others.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from typing import Any, Sequence

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import config as config_lib
from diffusion_text import decoding
from diffusion_text import parallel
from diffusion_text import paths
from diffusion_text import registry
from diffusion_text import samplers
from diffusion_text import sde as sde_lib
from diffusion_text.data import sources
from diffusion_text.data.tokenizer import BOS_ID, Tokenizer
from diffusion_text.errors import ConfigError
from diffusion_text.models.autoregressive import shift_right
from diffusion_text.models.transformer import ModelConfig

CONFIG_FILE = "config.json"
# Name of each `Experiment.kind` in messages, with its article.
KIND_NAMES = {"diffusion": "a diffusion model", "ar": "an autoregressive model"}
TOKENIZER_FILE = "tokenizer.model"


def load_saved_config(workdir: str) -> dict | None:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as exc:
    raise ConfigError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}; "
                      "move it away or use a new --workdir.") from exc


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Check that `workdir` is new or contains a run that `config` can continue. Write nothing."""
  paths.check_workdir_url(workdir)
  saved = load_saved_config(workdir)
  if saved is not None:
    config_lib.check_resume_compatible(config, saved, str(epath.Path(workdir) / CONFIG_FILE))
  tokenizer_path = epath.Path(workdir) / TOKENIZER_FILE
  if tokenizer_path.exists():
    tokenizer = Tokenizer.from_bytes(tokenizer_path.read_bytes())
    if tokenizer.vocab_size != config.tokenizer.vocab_size:
      raise ConfigError(
          f"{tokenizer_path} has {tokenizer.vocab_size} pieces but --config.tokenizer.vocab_size="
          f"{config.tokenizer.vocab_size}; use a new --workdir or set the vocabulary size to "
          f"{tokenizer.vocab_size}.")


def record_workdir(config: ml_collections.ConfigDict, workdir: str, tokenizer: Tokenizer) -> None:
  """Write config.json and tokenizer.model into `workdir` where they are missing.

  Called only once every check has passed, so a run that stops on bad input leaves the
  workdir as it was. Existing files are never overwritten.
  """
  if jax.process_index() != 0:
    return
  directory = epath.Path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  config_path = directory / CONFIG_FILE
  if not config_path.exists():
    paths.write_atomic(config_path, config_lib.to_json(config).encode("utf-8"))
  tokenizer_path = directory / TOKENIZER_FILE
  if not tokenizer_path.exists():
    paths.write_atomic(tokenizer_path, tokenizer.serialized())


def load_or_train_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> Tokenizer:
  """Load `<workdir>/tokenizer.model`, or train one on the training split (not yet saved).

  In a multi-host run process 0 trains it and sends the model to the others, because hosts
  need not share a file system and sentencepiece's output depends on its thread count.
  """
  path = epath.Path(workdir) / TOKENIZER_FILE
  if path.exists():
    logging.info("tokenizer: reusing %s", path)
    return Tokenizer.from_bytes(path.read_bytes())
  logging.info("tokenizer: training %d pieces on the training split", config.tokenizer.vocab_size)

  def train_privately() -> Tokenizer:
    texts = sources.get_texts(config.data, "train", max_chars=config.tokenizer.max_chars)
    with tempfile.TemporaryDirectory() as tmp:
      return Tokenizer.train(texts, config.tokenizer.vocab_size, os.path.join(tmp, TOKENIZER_FILE))

  if jax.process_count() == 1:
    return train_privately()
  if jax.process_index() == 0:
    model_bytes = np.frombuffer(train_privately().serialized(), np.uint8)
  else:
    model_bytes = np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(model_bytes.size)))
  padded = np.zeros(size, np.uint8)
  padded[:model_bytes.size] = model_bytes
  received = np.asarray(multihost_utils.broadcast_one_to_all(padded), np.uint8)
  return Tokenizer.from_bytes(received.tobytes())


def check_batch_size(mesh, batch_size: int, flag: str) -> None:
  """Raise ConfigError unless `batch_size` splits over the mesh's batch axes and the processes."""
  divisor = parallel.batch_divisor(mesh)
  processes = jax.process_count()
  step = math.lcm(divisor, processes)
  if batch_size % step:
    raise ConfigError(f"{flag}={batch_size} cannot be split over the mesh's data axes "
                      f"({divisor} devices) and {processes} processes; use a multiple of {step}, "
                      f"e.g. {max(step, batch_size // step * step)}.")


def tokenizer_digest(tokenizer: Tokenizer) -> str:
  return hashlib.sha256(tokenizer.serialized()).hexdigest()


class Experiment:
  """Model, schedule, mesh and state shardings for one config and tokenizer.

  The mesh spans `devices` (default: every device of every process). Passing `mesh` instead,
  for example a `jax.sharding.AbstractMesh`, builds shapes and shardings without devices. The
  memory planner uses this to size a slice this machine does not have. Such an experiment
  cannot create state or compile steps.
  """

  def __init__(self, config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
               devices: Sequence[jax.Device] | None = None,
               mesh: Mesh | AbstractMesh | None = None):
    self.config = config
    self.tokenizer = tokenizer
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh, devices)
    self.rules = parallel.axis_rules(config.mesh)
    self.model_config = ModelConfig.from_config(config, tokenizer.vocab_size)
    self.model = registry.get("model", config.model.name)(self.model_config)
    self.schedule = sde_lib.make_schedule(config.sde)
    self.loss_fn = registry.get("loss", config.loss.name)
    # "diffusion" or "ar" (the autoregressive baseline); decides evaluation and sampling.
    self.kind = getattr(self.model, "kind", "diffusion")
    loss_kind = getattr(self.loss_fn, "model_kind", "diffusion")
    if loss_kind != self.kind:
      fix = ("set --config.loss.name=next_token" if self.kind == "ar" else
             "set --config.loss.name=ce or x0_mse, or train the AR baseline with "
             "--config=experiments/ar.py")
      raise ConfigError(
          f"--config.loss.name={config.loss.name} is a loss for {KIND_NAMES[loss_kind]}, but "
          f"--config.model.name={config.model.name} is {KIND_NAMES[self.kind]}; {fix}.")
    if self.kind == "ar" and self.model_config.conditional:
      raise ConfigError("--config.model.conditional=True applies to diffusion models; an "
                        "autoregressive model conditions on a prompt (--prefix) without it. "
                        "Set it to False.")
    self.optimizer = make_optimizer(config)
    self._check_batch(config.train.batch_size, "--config.train.batch_size")

    abstract_boxed = jax.eval_shape(functools.partial(self._init_state, boxed=True),
                                    jax.random.key(0))
    # Every dimension is checked against the mesh here, so a bad size stops before any compile.
    parallel.check_shardable(abstract_boxed["params"], dict(self.mesh.shape), self.rules)
    self.state_shardings = parallel.state_shardings(abstract_boxed, self.mesh, self.rules)
    self.abstract_state = ckpt_lib.abstract_like(nn.unbox(abstract_boxed), self.state_shardings)
    self.batch_sharding = parallel.batch_sharding(self.mesh)
    self.replicated = parallel.replicated(self.mesh)

  def _check_batch(self, batch_size: int, flag: str) -> None:
    check_batch_size(self.mesh, batch_size, flag)

  def _init_state(self, rng, boxed: bool = False) -> dict[str, Any]:
    tokens = jnp.zeros((1, self.config.data.seq_len), jnp.int32)
    inputs = (tokens,) if self.kind == "ar" else (tokens, jnp.zeros((1,)))
    params = self.model.init(rng, *inputs)["params"]
    if not boxed:
      params = nn.unbox(params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": params,
            "opt_state": self.optimizer.init(params),
            "bad_steps": jnp.zeros((), jnp.int32)}  # Non-finite steps in a row.

  def init_state(self) -> dict[str, Any]:
    """Create the training state directly under its shardings (never whole on one device)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      init = jax.jit(self._init_state, out_shardings=self.state_shardings)
      return init(jax.random.key(self.config.seed))

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state["params"]))

  def flops_per_token(self) -> float:
    """Forward-pass FLOPs per token of the network (matrix products only).

    Attention counts the whole length for causal models too, as the compiled step computes it.
    The AR model's input is a table look-up, which costs no matrix product. The diffusion
    model's input is two dense layers (noisy latent and self-conditioning), and it also
    interpolates embeddings from the logits.
    """
    c = self.model_config
    per_layer = 2 * 4 * c.width**2 + 2 * 2 * c.width * c.mlp_dim + 2 * 2 * c.seq_len * c.width
    head = 2 * c.width * c.vocab_size
    if self.kind == "ar":
      return float(c.num_layers * per_layer + head)
    io = 2 * 2 * c.embed_dim * c.width + head
    interpolate = 2 * c.vocab_size * c.embed_dim
    return float(c.num_layers * per_layer + io + interpolate)

  def train_flops_per_token(self) -> float:
    # Forward and backward cost three forward passes; self-conditioning adds a forward pass
    # on the share of diffusion batches that use it.
    extra = self.config.loss.self_cond_prob if self.kind == "diffusion" else 0.0
    return (3.0 + extra) * self.flops_per_token()

  # -- compiled functions -------------------------------------------------------------------

  def make_train_step(self):
    config, model, schedule, optimizer = self.config, self.model, self.schedule, self.optimizer
    loss_fn, ema_decay = self.loss_fn, config.train.ema_decay
    lr_schedule = make_lr_schedule(config)
    # Only conditional models take the drop probability, so user losses need not know it.
    cond_options = ({"cond_drop_prob": config.loss.get("cond_drop_prob", 0.0)}
                    if self.model_config.conditional else {})

    def train_step(state, batch, base_rng):
      rng = jax.random.fold_in(base_rng, state["step"])
      tokens_bt = batch["tokens"]
      mask_bt = jnp.ones(tokens_bt.shape, jnp.float32)

      def objective(params):
        return loss_fn(model, params, schedule, tokens_bt, mask_bt, rng,
                       self_cond_prob=config.loss.self_cond_prob, train=True, **cond_options)

      (loss, terms), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      # EMA with warm-up: early on the average follows the parameters closely.
      decay = jnp.minimum(ema_decay, (1.0 + state["step"]) / (10.0 + state["step"]))
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)

      # A step whose loss or gradients are not finite changes nothing but the step counter
      # (so the data and noise move on) and the count of such steps in a row.
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = {"step": state["step"] + 1,
                   "params": keep(params, state["params"]),
                   "ema": keep(ema, state["ema"]),
                   "opt_state": keep(opt_state, state["opt_state"]),
                   "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1).astype(jnp.int32)}
      metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
                 "train/learning_rate": lr_schedule(state["step"]),
                 "train/skipped": 1.0 - finite.astype(jnp.float32),
                 **{f"train/{k}": v for k, v in terms.items()}}
      return new_state, metrics

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(train_step,
                     in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
                     out_shardings=(self.state_shardings, self.replicated),
                     donate_argnums=(0,))

  def make_eval_step(self):
    """Compile (params, batch, rng) -> (summed cross-entropy, number of real tokens).

    The batch contains `tokens`, `mask`, `t` [b] and `index` [b], the window's position in the
    split. Noise is drawn from `fold_in(rng, index)`, so every window gets the same time and
    noise whatever the batch size or the number of devices, and so does the figure. The
    figure is the `ce` objective without self-conditioning, whichever loss trains the model.
    For an AR model it is the exact negative log-likelihood; `t`, `index` and `rng` are unused.
    """
    model, schedule = self.model, self.schedule

    def ar_eval_step(params, batch, rng):
      del rng
      nats_b = self._token_nll(params, batch["tokens"], batch["mask"])
      return jnp.sum(nats_b), jnp.sum(batch["mask"])

    def eval_step(params, batch, rng):
      tokens_bt, mask_bt, t_b = batch["tokens"], batch["mask"], batch["t"]
      x0_btl = model.apply({"params": params}, tokens_bt, method=model.embed)
      eps_btl = jax.vmap(
          lambda i: jax.random.normal(jax.random.fold_in(rng, i), x0_btl.shape[1:]))(
              batch["index"])
      z_btl = sde_lib.sample_marginal(schedule, x0_btl, t_b, eps_btl)
      logits_btv = model.apply({"params": params}, z_btl, schedule.log_snr(t_b),
                               jnp.zeros_like(x0_btl), mask_bt, method=model.denoise)
      ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt)
      return jnp.sum(ce_bt * mask_bt), jnp.sum(mask_bt)

    param_shardings = self.state_shardings["params"]
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(ar_eval_step if self.kind == "ar" else eval_step,
                     in_shardings=(param_shardings, self.batch_sharding, self.replicated),
                     out_shardings=(self.replicated, self.replicated))

  def _token_nll(self, params, tokens_bt, mask_bt):
    """Compute each sequence's exact negative log-likelihood under the AR model, in nats [batch]."""
    model = self.model
    logits_btv = model.apply({"params": params}, shift_right(tokens_bt, BOS_ID),
                             mask_bt)
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, tokens_bt)
    return jnp.sum(nll_bt * mask_bt, axis=1)

  def make_token_nll(self):
    """Compile (params, tokens [b, L], mask [b, L]) -> nats per sequence [b] (AR models only).

    Scores any token sequences, for example another model's samples: token 0 is predicted
    from BOS alone, token i from BOS and tokens 0..i-1; masked positions count nothing.
    """
    if self.kind != "ar":
      raise ConfigError(f"scoring token sequences needs an AR model; --config.model.name="
                        f"{self.config.model.name} is {KIND_NAMES[self.kind]}.")
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(self._token_nll,
                     in_shardings=(self.state_shardings["params"], self.batch_sharding,
                                   self.batch_sharding),
                     out_shardings=self.batch_sharding)

  def make_ar_sampler(self, *, num_samples: int, temperature: float, top_p: float,
                      conditioned: bool = False):
    """Compile key/value-cached AR generation of `num_samples` full-length sequences.

    Returns `fn(params, rng)`, or `fn(params, rng, tokens_bt, fixed_bt)` when `conditioned`
    (fixed positions are forced), that returns (tokens [num_samples, seq_len], logits).
    """
    self._check_batch(num_samples, "--num_samples")
    decoding.check_options(temperature, top_p)
    model, seq_len = self.model, self.config.data.seq_len

    def sample(params, rng, tokens_bt=None, fixed_bt=None):
      def decode(inputs_bt, position, cache):
        return model.apply({"params": params}, inputs_bt, position, cache, method=model.decode)

      cache = model.apply({"params": params}, num_samples, method=model.init_cache)
      return decoding.generate(decode, cache, rng, batch=num_samples, length=seq_len,
                               bos_id=BOS_ID, temperature=temperature,
                               top_p=top_p, tokens_bt=tokens_bt, fixed_bt=fixed_bt)

    in_shardings = (self.state_shardings["params"], self.replicated)
    if conditioned:
      in_shardings += (self.batch_sharding, self.batch_sharding)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(sample, in_shardings=in_shardings,
                     out_shardings=(self.batch_sharding, self.batch_sharding))

  def make_sampler(self, *, sampler: str, steps: int, num_samples: int):
    """Compile (params, rng) -> (tokens [num_samples, seq_len], logits) for one sampler.

    An AR model ignores `sampler` and `steps` and decodes with the config's
    `sample.temperature` and `sample.top_p`.
    """
    if self.kind == "ar":
      return self.make_ar_sampler(num_samples=num_samples,
                                  temperature=self.config.sample.get("temperature", 1.0),
                                  top_p=self.config.sample.get("top_p", 1.0))
    self._check_batch(num_samples, "--num_samples")
    model, schedule = self.model, self.schedule
    shape = (num_samples, self.config.data.seq_len, self.config.model.embed_dim)

    def sample(params, rng):
      def denoise(z, t_b, x0_self):
        return model.apply({"params": params}, z, schedule.log_snr(t_b), x0_self,
                           method=model.denoise)

      def interpolate(logits):
        return model.apply({"params": params}, logits, method=model.interpolate)

      return samplers.generate(denoise, interpolate, schedule, rng, shape=shape,
                               sampler=sampler, steps=steps)

    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(sample, in_shardings=(self.state_shardings["params"], self.replicated),
                     out_shardings=(self.batch_sharding, self.batch_sharding))

  def decode(self, tokens_bt) -> list[str]:
    """Decode every row on every process, also when the rows are split across processes."""
    return [self.tokenizer.decode([int(t) for t in row])
            for row in parallel.gather_to_host(tokens_bt)]


def make_lr_schedule(config) -> optax.Schedule:
  t = config.train
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
      decay_steps=t.steps, end_value=t.learning_rate * 0.1)


def make_optimizer(config) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.train.grad_clip),
      optax.adamw(make_lr_schedule(config), b1=0.9, b2=0.99,
                  weight_decay=config.train.weight_decay))

"""Default configuration, its validation, and comparison with a saved run's config.

Every experiment file in `experiments/` starts from `base_config()` and overrides fields. Each
field is documented here once; `docs/configs.md` lists them for users. `validate` runs before
any data is read or anything is compiled, and each error names the `--config.` flag to change.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from diffusion_text.errors import ConfigError

# Logical axis name -> mesh axis (or None for replicated). Model code names logical axes only.
DEFAULT_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("latent", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("length", None),
    ("cond", None),
)


def base_config() -> ml_collections.ConfigDict:
  """Return the default configuration: the CPU demo model on the bundled corpus."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameters, noise, data order and sampling.
  c.imports = ""  # Comma-separated modules to import first, e.g. to register your own parts.

  c.data = ml_collections.ConfigDict()
  c.data.name = "shakespeare"  # "shakespeare" (bundled), or a registered TFDS name like "lm1b".
  c.data.files = ""  # Glob(s) of UTF-8 text files, comma-separated; when set, replaces data.name.
  c.data.validation_files = ""  # Glob(s) of validation files; default: hold out whole files.
  c.data.validation_fraction = 0.1  # Share of files (or documents, for one file) held out.
  c.data.documents = "paragraph"  # How text files split into documents: paragraph | file | line.
  c.data.decode_errors = "strict"  # Invalid UTF-8: "strict" raises, "replace" reads it as U+FFFD.
  c.data.text_key = "text"  # Feature holding the text in a TFDS dataset.
  c.data.tfds_dir = ""  # Where prepared datasets go; default ~/.cache/diffusion_text/tfds.
  c.data.seq_len = 128  # Tokens per training window.

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 2048
  c.tokenizer.max_chars = 3_000_000  # Characters of training text used to fit the tokenizer.

  c.model = ml_collections.ConfigDict()
  c.model.name = "transformer"  # "transformer" (diffusion) or "ar_transformer" (AR baseline).
  c.model.embed_dim = 64  # Dimension of the token embeddings that are diffused (the latent).
  c.model.width = 192  # Transformer hidden size.
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 768
  c.model.dropout = 0.0
  c.model.dtype = "float32"  # Activation dtype: float32 or bfloat16; parameters stay float32.
  c.model.conditional = False  # Feed fixed tokens to the network (needed for guidance).

  c.sde = ml_collections.ConfigDict()
  c.sde.schedule = "log_linear"  # "log_linear", "cosine" or "linear", or a registered name.
  c.sde.t_min = 1e-4  # Smallest diffusion time used by training, sampling and evaluation.
  c.sde.log_snr_max = 2.0  # log_linear and cosine: log-SNR at t = 0.
  c.sde.log_snr_min = -10.0  # log_linear and cosine: log-SNR at t = 1.
  c.sde.beta_min = 0.1  # linear: beta(0).
  c.sde.beta_max = 20.0  # linear: beta(1).

  c.loss = ml_collections.ConfigDict()
  # "ce" (score interpolation, CDCD) or "x0_mse" (Diffusion-LM style); "next_token" for AR.
  c.loss.name = "ce"
  c.loss.self_cond_prob = 0.5  # Probability that a training batch uses self-conditioning.
  c.loss.cond_drop_prob = 0.0  # model.conditional: share of examples trained without condition.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.batch_size = 32  # Global batch size, summed over all devices and hosts.
  c.train.learning_rate = 2e-3  # Peak learning rate of AdamW.
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.01
  c.train.grad_clip = 1.0  # Maximum global gradient norm.
  c.train.ema_decay = 0.999
  c.train.log_every = 50
  c.train.eval_every = 200
  c.train.eval_batches = 8  # Validation batches per evaluation (0: the whole split).
  c.train.sample_every = 600
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 2
  c.train.max_bad_steps = 20  # Stop after this many steps in a row with non-finite loss/gradients.
  c.train.max_minutes = 0.0  # Stop (with a checkpoint) after this much training time; 0: no limit.

  c.sample = ml_collections.ConfigDict()
  # euler_maruyama, ode_euler, ode_heun, ddpm, dpm_solver_pp_1, dpm_solver_pp_2, dpm_solver_pp_3.
  c.sample.sampler = "euler_maruyama"
  c.sample.steps = 128
  c.sample.num_samples = 8
  c.sample.grid = "t"  # Time grid: "t" (even in t) or "log_snr" (even in log-SNR).
  c.sample.clamp = False  # Replace x0_hat by its nearest embedding row at every step.
  c.sample.temperature = 1.0  # AR models: softmax temperature; 0 picks the most likely token.
  c.sample.top_p = 1.0  # AR models: draw from the smallest token set with this much probability.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the other axes.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.axis_rules = DEFAULT_AXIS_RULES
  return c


_CHOICES = {
    "data.documents": ("paragraph", "file", "line"),
    "data.decode_errors": ("strict", "replace"),
    "model.dtype": ("float32", "bfloat16"),
    "sample.grid": ("t", "log_snr"),
}

# Fields that must agree between a run and the workdir it resumes from: anything that changes
# the shapes of saved arrays, the tokenizer, or the data the tokens came from.
_RESUME_FIELDS = (
    "data.name", "data.files", "data.documents", "data.decode_errors", "data.seq_len",
    "tokenizer.vocab_size",
    "model.name", "model.embed_dim", "model.width", "model.num_layers", "model.num_heads",
    "model.mlp_dim", "model.conditional", "sde.schedule",
)


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError for values that cannot work, before any data or compile work."""
  def positive(field: str) -> None:
    if get_field(config, field) <= 0:
      raise ConfigError(f"--config.{field}={get_field(config, field)} must be positive.")

  for field in ("data.seq_len", "tokenizer.vocab_size", "model.embed_dim", "model.width",
                "model.num_layers", "model.num_heads", "model.mlp_dim", "train.steps",
                "train.batch_size", "train.log_every", "train.checkpoint_every", "train.max_bad_steps",
                "train.keep_checkpoints", "sample.steps", "sample.num_samples"):
    positive(field)
  for field, choices in _CHOICES.items():
    if get_field(config, field) not in choices:
      raise ConfigError(f"--config.{field}={get_field(config, field)!r} is not one of {choices}.")

  if config.data.seq_len < 2:
    raise ConfigError(f"--config.data.seq_len={config.data.seq_len} is too short; use at least 2.")
  if config.tokenizer.vocab_size < 300:
    # Byte fallback alone needs 256 pieces, plus pad, unk, bos and eos.
    raise ConfigError(f"--config.tokenizer.vocab_size={config.tokenizer.vocab_size} is too small "
                      "for a byte-fallback tokenizer; use at least 300.")
  if config.model.width % config.model.num_heads:
    raise ConfigError(f"--config.model.width={config.model.width} is not divisible by "
                      f"--config.model.num_heads={config.model.num_heads}; try num_heads="
                      f"{_largest_divisor_at_most(config.model.width, config.model.num_heads)}.")
  if config.sde.log_snr_min >= config.sde.log_snr_max:
    raise ConfigError(f"--config.sde.log_snr_min={config.sde.log_snr_min} must be below "
                      f"--config.sde.log_snr_max={config.sde.log_snr_max}.")
  if not 0.0 < config.sde.beta_min < config.sde.beta_max:
    raise ConfigError(f"--config.sde.beta_min={config.sde.beta_min} and --config.sde.beta_max="
                      f"{config.sde.beta_max} must satisfy 0 < beta_min < beta_max.")
  if not 0.0 < config.sde.t_min < 0.1:
    raise ConfigError(f"--config.sde.t_min={config.sde.t_min} must lie in (0, 0.1).")
  if not 0.0 <= config.loss.self_cond_prob <= 1.0:
    raise ConfigError(f"--config.loss.self_cond_prob={config.loss.self_cond_prob} must lie in [0, 1].")
  if not 0.0 <= config.loss.cond_drop_prob <= 1.0:
    raise ConfigError(f"--config.loss.cond_drop_prob={config.loss.cond_drop_prob} must lie in [0, 1].")
  if config.loss.cond_drop_prob > 0.0 and not config.model.conditional:
    raise ConfigError(f"--config.loss.cond_drop_prob={config.loss.cond_drop_prob} has no effect "
                      "unless the network reads the condition; set --config.model.conditional=True "
                      "or --config.loss.cond_drop_prob=0.")
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise ConfigError(f"--config.train.ema_decay={config.train.ema_decay} must lie in [0, 1).")
  if not 0.0 < config.data.validation_fraction < 1.0:
    raise ConfigError(f"--config.data.validation_fraction={config.data.validation_fraction} "
                      "must lie in (0, 1).")
  if config.train.warmup_steps >= config.train.steps:
    raise ConfigError(f"--config.train.warmup_steps={config.train.warmup_steps} must be smaller "
                      f"than --config.train.steps={config.train.steps}.")
  if config.sample.get("temperature", 1.0) < 0.0:
    raise ConfigError(f"--config.sample.temperature={config.sample.temperature} must be at least 0 "
                      "(0 picks the most likely token).")
  if not 0.0 < config.sample.get("top_p", 1.0) <= 1.0:
    raise ConfigError(f"--config.sample.top_p={config.sample.top_p} must lie in (0, 1].")
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    if size == 0 or size < -1:
      raise ConfigError(f"--config.mesh.{axis}={size} must be a positive size or -1 (fill).")

  # Registry names are checked here so a typo fails before the data is prepared.
  from diffusion_text import registry  # pylint: disable=import-outside-toplevel
  registry.check_names(config)


def _largest_divisor_at_most(n: int, k: int) -> int:
  return max(d for d in range(1, k + 1) if n % d == 0)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def check_resume_compatible(config: ml_collections.ConfigDict, saved: dict, path: str) -> None:
  """Raise ConfigError when `config` cannot continue the run whose config was saved at `path`."""
  saved_config = ml_collections.ConfigDict(saved)
  mismatches = []
  for field in _RESUME_FIELDS:
    try:
      old = get_field(saved_config, field)
    except KeyError:
      continue
    new = get_field(config, field)
    if _normalise(old) != _normalise(new):
      mismatches.append(f"{field}: saved {old!r}, now {new!r}")
  if mismatches:
    lines = "\n  ".join(mismatches)
    raise ConfigError(
        f"this config does not match the run saved in {path}:\n  {lines}\n"
        "Use a new --workdir, or restore the saved values with the --config. flags above.")


def _normalise(value: Any) -> Any:
  if isinstance(value, float) and math.isfinite(value) and value == int(value):
    return int(value)
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  return value

"""Command-line entry point: `python -m diffusion_text train|sample|eval|plan [flags]`.

Only parses flags, starts the distributed runtime and calls library functions that tests call
too. Problems the user can fix are printed as one message, without a traceback.
"""

from __future__ import annotations

import json
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

COMMANDS = ("train", "sample", "eval", "plan")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/demo.py; override fields with "
    "--config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (a local folder or "
                               "gs://BUCKET/PATH): config, tokenizer, checkpoints, metrics and "
                               "samples.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 8, "sample: number of sequences to draw.")
_SAMPLER = flags.DEFINE_string("sampler", None, "sample: sampler name; default: the run's "
                               "sample.sampler.")
_STEPS = flags.DEFINE_integer("steps", None, "sample: number of sampler steps; default: the run's "
                              "sample.steps.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_PREFIX = flags.DEFINE_string("prefix", None, "sample: text that every sample starts with.")
_TEMPLATE = flags.DEFINE_string("template", None, "sample: text with gaps to fill, written "
                                "[MASK] (one token) or [MASK:N] (N tokens).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "sample: classifier-free guidance scale for "
                               "--prefix/--template (0: unconditional, 1: conditional); needs "
                               "a model trained with model.conditional. Default: no guidance.")
_GRID = flags.DEFINE_enum("grid", None, ["t", "log_snr"], "sample: time grid, even in t or in "
                          "log-SNR; default: the run's sample.grid.")
_CLAMP = flags.DEFINE_bool("clamp", None, "sample: clamp x0_hat to the nearest embedding at "
                           "every step; default: the run's sample.clamp.")
_ROUNDING = flags.DEFINE_enum("rounding", "argmax", ["argmax", "sample"], "sample: final "
                              "token choice, the most likely token or a draw from the logits.")
_ROUNDING_FLOAT64 = flags.DEFINE_bool("rounding_float64", False, "sample: draw the final tokens "
                                      "in float64 (turns on jax_enable_x64).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "sample, AR runs: softmax temperature "
                                  "(0: most likely token); default: the run's sample.temperature.")
_TOP_P = flags.DEFINE_float("top_p", None, "sample, AR runs: draw from the smallest set of tokens "
                            "with this much probability; default: the run's sample.top_p.")
_TIME_SAMPLES = flags.DEFINE_integer("time_samples", 1, "eval: draws of t and noise per "
                                     "sequence for the likelihood bound.")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "sample/eval: use the EMA parameters.")
_SPLIT = flags.DEFINE_string("split", "validation", "eval: split to evaluate.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "eval: number of batches; 0: the whole "
                                    "split.")
_DEVICES = flags.DEFINE_integer("devices", None, "plan: number of devices to plan for; default: "
                                "the devices this process sees.")


def _load_config():
  """Load the --config file, turning ml_collections' deferred load errors into a ConfigError."""
  from diffusion_text.errors import ConfigError  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  try:
    config.get("seed")
  except OSError as exc:
    reason = " ".join(str(exc).split())
    raise ConfigError(f"--config: cannot load the config file ({reason}).") from exc
  return config


def run(command: str) -> None:
  from diffusion_text import inference  # pylint: disable=import-outside-toplevel
  from diffusion_text import parallel  # pylint: disable=import-outside-toplevel
  from diffusion_text import plan  # pylint: disable=import-outside-toplevel
  from diffusion_text import train  # pylint: disable=import-outside-toplevel

  parallel.maybe_initialize_distributed()
  workdir = _WORKDIR.value
  if command == "train":
    if _CONFIG.value is None:
      raise app.UsageError("train needs --config=experiments/<name>.py")
    final = train.train_and_evaluate(_load_config(), workdir)
    print(json.dumps({k: v for k, v in final.items() if not k.startswith("train/loss_by")}))
    stopped = final.get("stopped", "")
    if stopped.startswith("SIG"):
      # The shell convention for "ended by a signal", so schedulers see the job did not finish.
      sys.exit(128 + signal.Signals[stopped].value)
  elif command == "sample":
    texts = inference.sample(workdir, num_samples=_NUM_SAMPLES.value, sampler=_SAMPLER.value,
                             steps=_STEPS.value, seed=_SEED.value, use_ema=_USE_EMA.value,
                             prefix=_PREFIX.value, template=_TEMPLATE.value,
                             guidance=_GUIDANCE.value, grid=_GRID.value, clamp=_CLAMP.value,
                             rounding=_ROUNDING.value, rounding_float64=_ROUNDING_FLOAT64.value,
                             temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
    for i, text in enumerate(texts):
      print(f"--- sample {i}\n{text}")
  elif command == "eval":
    result = inference.evaluate(workdir, split=_SPLIT.value, max_batches=_MAX_BATCHES.value,
                                use_ema=_USE_EMA.value, time_samples=_TIME_SAMPLES.value)
    print(json.dumps(result))
  elif command == "plan":
    if _CONFIG.value is None:
      raise app.UsageError("plan needs --config=experiments/<name>.py")
    import jax  # pylint: disable=import-outside-toplevel
    print(plan.format_plan(plan.make_plan(_load_config(), _DEVICES.value or jax.device_count())))


class _OwnInfoOnly:
  """Logging filter: INFO lines from this package only; warnings and errors from everywhere.

  orbax and tensorflow-datasets log dozens of INFO lines per checkpoint or dataset read.
  """

  # tensorflow-datasets warns about these on every read of a prepared local dataset.
  _IGNORED = ("Using custom data configuration", "has no dataset_info.json")

  def filter(self, record) -> bool:
    if "tensorflow_datasets" in record.pathname and any(
        text in str(record.msg) for text in self._IGNORED):
      return False
    return record.levelno > logging.converter.STANDARD_INFO or "diffusion_text" in record.pathname


def main(argv: list[str]) -> None:
  from diffusion_text.errors import TrainingStopped, UserInputError  # pylint: disable=import-outside-toplevel

  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()

  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m diffusion_text {{{'|'.join(COMMANDS)}}} "
                         f"--workdir=DIR [flags]; got arguments {argv[1:]}")
  if _WORKDIR.value is None and argv[1] != "plan":
    print(f"error: {argv[1]} needs --workdir=DIR, the run directory.", file=sys.stderr)
    sys.exit(2)
  try:
    run(argv[1])
  except TrainingStopped as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
  except UserInputError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """Parse flags; a bad --config override gets one message naming the flag, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as exc:
    detail = " ".join(str(exc).replace("\\'", "'").replace("\\n", " ").split())
    culprits = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                and any(part and part in detail for part in arg.split("=")[0].split(".")[1:])]
    where = culprits[-1] if culprits else "command line"
    if isinstance(exc, (AttributeError, KeyError)):
      suggestion = re.search(r'Did you mean "[^"]+"', detail)
      detail = "no such config field." + (f" {suggestion.group(0)}?" if suggestion else "")
    print(f"error: {where}: {detail}\nConfig fields are listed in docs/configs.md.",
          file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)

"""The CPU demo: a small embedding diffusion model on the bundled Shakespeare corpus.

    python -m diffusion_text train --config=experiments/demo.py --workdir=runs/demo

`make demo` runs exactly this, then samples and evaluates. On a 2-core CPU training takes about
8 minutes (see README.md for the measured figures). For a quick smoke run, add
`--config.train.steps=50 --config.train.eval_every=25`.
"""

from diffusion_text import config as config_lib


def get_config():
  return config_lib.base_config()

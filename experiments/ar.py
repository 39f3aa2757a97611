"""The autoregressive baseline: a causal Transformer with the demo model's backbone.

    python -m diffusion_text train --config=experiments/ar.py --workdir=runs/ar

Width, depth, heads, MLP size, sequence length, tokenizer, data and optimiser are those of
experiments/demo.py, so the two runs compare diffusion with AR at equal size. `sample` decodes
with a key/value cache (`--temperature`, `--top_p`), and `eval` reports the exact negative
log-likelihood in bits per token, the AR counterpart of the diffusion model's bound.
"""

from diffusion_text import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.name = "ar_transformer"
  config.loss.name = "next_token"
  return config

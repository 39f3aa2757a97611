"""Causal Transformer language model: the autoregressive baseline diffusion is measured against.

It is built from the same `Block` and `Attention` as the score network, with the same widths,
so that a diffusion model and an AR model of one config have the same backbone and the same
matrix-multiply FLOPs per token. The blocks are plain pre-norm blocks (no time input), with
causal attention. Position i of `__call__`'s output predicts token i of the sequence from the
tokens before it: the input is the sequence shifted right behind a BOS token.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_text import registry
from diffusion_text.models.transformer import Block, ModelConfig

_partitioned = nn.with_logical_partitioning
_constrain = nn.with_logical_constraint


def shift_right(tokens_bt: jax.Array, bos_id: int) -> jax.Array:
  """[BOS, t_0, ..., t_{L-2}]: the inputs whose outputs predict t_0, ..., t_{L-1}."""
  bos_b1 = jnp.full(tokens_bt.shape[:1] + (1,), bos_id, tokens_bt.dtype)
  return jnp.concatenate([bos_b1, tokens_bt[:, :-1]], axis=1)


@registry.register("model", "ar_transformer")
class CausalLM(nn.Module):
  """Token embedding, causal blocks and a vocabulary head.

  Methods: `__call__` scores whole sequences (training, evaluation), `init_cache` and
  `decode` run key/value-cached generation one position (or a few) at a time.
  """

  cfg: ModelConfig
  kind = "ar"  # Read by Experiment to choose the training, evaluation and sampling code.

  def setup(self):
    cfg = self.cfg
    self.token_embedding = self.param(
        "token_embedding", _partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.width), jnp.float32)
    self.position = self.param(
        "position", _partitioned(nn.initializers.normal(0.02), ("length", "embed")),
        (cfg.seq_len, cfg.width), jnp.float32)
    self.blocks = [Block(cfg, causal=True, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.final_norm = nn.LayerNorm(
        dtype=jnp.float32, scale_init=_partitioned(nn.initializers.ones, ("embed",)),
        bias_init=_partitioned(nn.initializers.zeros, ("embed",)))
    self.head = nn.Dense(
        cfg.vocab_size, dtype=jnp.dtype(cfg.dtype),
        kernel_init=_partitioned(nn.initializers.zeros_init(), ("embed", "vocab")),
        bias_init=_partitioned(nn.initializers.zeros_init(), ("vocab",)))

  def _inputs(self, inputs_bt, positions_t):
    dtype = jnp.dtype(self.cfg.dtype)
    x_btd = jnp.take(self.token_embedding, inputs_bt, axis=0)
    x_btd = x_btd + jnp.take(self.position, positions_t, axis=0)[None]
    return _constrain(x_btd.astype(dtype), ("act_batch", "act_length", "act_embed"))

  def _logits(self, x_btd):
    x_btd = self.final_norm(x_btd).astype(jnp.dtype(self.cfg.dtype))
    logits_btv = self.head(x_btd)
    return _constrain(logits_btv, ("act_batch", "act_length", "act_vocab")).astype(jnp.float32)

  def __call__(self, inputs_bt, mask_bt=None, deterministic=True):
    """Return logits [batch, length, vocab]. Position i predicts the token after inputs_bt[:, i]."""
    length = inputs_bt.shape[1]
    if length > self.cfg.seq_len:
      raise ValueError(f"input length {length} exceeds the model's seq_len {self.cfg.seq_len}")
    x_btd = self._inputs(inputs_bt, jnp.arange(length))
    for block in self.blocks:
      x_btd = block(x_btd, None, mask_bt, deterministic)
    return self._logits(x_btd)

  def init_cache(self, batch: int) -> list[dict[str, jax.Array]]:
    """Empty key/value cache for `batch` sequences of up to seq_len tokens."""
    cfg = self.cfg
    shape = (batch, cfg.seq_len, cfg.num_heads, cfg.width // cfg.num_heads)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return [{"key": zeros, "value": zeros} for _ in range(cfg.num_layers)]

  def decode(self, inputs_bt, position, cache):
    """Run the inputs at positions `position`, `position + 1`, ... against the cache of the
    earlier positions. Return (logits [batch, t, vocab], updated cache)."""
    x_btd = self._inputs(inputs_bt, position + jnp.arange(inputs_bt.shape[1]))
    new_cache = []
    for block, layer in zip(self.blocks, cache):
      x_btd, layer = block(x_btd, None, None, True, {**layer, "position": position})
      new_cache.append({"key": layer["key"], "value": layer["value"]})
    return self._logits(x_btd), new_cache

  def embedding_table(self):
    return self.token_embedding

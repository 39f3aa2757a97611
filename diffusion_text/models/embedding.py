"""Learned token embeddings (the diffused latent) and score interpolation.

Each row of the table E [vocab, embed_dim] is normalised to norm sqrt(embed_dim), so every
token's clean latent has unit mean square per dimension and a noise level means the same
thing for every token. Score interpolation turns the network's logits into the denoised latent:
x0_hat = softmax(logits) @ E (CDCD).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def normalise_rows(table_vd: jax.Array) -> jax.Array:
  """Scale each row to norm sqrt(dim)."""
  dim = table_vd.shape[-1]
  norm_v1 = jnp.linalg.norm(table_vd, axis=-1, keepdims=True)
  return table_vd * (jnp.sqrt(dim) / jnp.maximum(norm_v1, 1e-6))


class TokenEmbedding(nn.Module):
  """Embedding table used both to embed tokens and to interpolate x0 from logits."""

  vocab_size: int
  embed_dim: int

  def setup(self):
    self.table = self.param(
        "table",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "latent")),
        (self.vocab_size, self.embed_dim), jnp.float32)

  def normalised(self) -> jax.Array:
    return normalise_rows(self.table)  # [vocab, embed_dim]

  def __call__(self, tokens_bl: jax.Array) -> jax.Array:
    """Return the clean latents x0 [batch, length, embed_dim] of token ids."""
    return jnp.take(self.normalised(), tokens_bl, axis=0)

  def interpolate(self, logits_blv: jax.Array) -> jax.Array:
    """Return x0_hat = softmax(logits) @ E [batch, length, embed_dim], in float32."""
    probs_blv = jax.nn.softmax(logits_blv.astype(jnp.float32), axis=-1)
    return probs_blv @ self.normalised()

"""Key/value-cached generation for the autoregressive baseline, compiled as one `lax.scan`.

`generate` feeds one token per scan step to a `decode(inputs_b1, position, cache)` function
(`CausalLM.decode` with its parameters bound) and draws the next token from the returned logits
with a temperature and nucleus (top-p) truncation. Fixed positions (a prompt) are forced instead
of drawn, so a prefix needs no separate code path.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

DecodeFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def top_p_mask(logits_bv: jax.Array, top_p: float) -> jax.Array:
  """Logits with every token outside the nucleus set to -inf.

  The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`; the
  most likely token is always in it.
  """
  sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  in_nucleus_bv = mass_before_bv < top_p
  # The smallest logit still inside the nucleus. Every logit below it is dropped.
  threshold_b = jnp.min(jnp.where(in_nucleus_bv, sorted_bv, jnp.inf), axis=-1)
  return jnp.where(logits_bv < threshold_b[:, None], -jnp.inf, logits_bv)


def draw_token(rng: jax.Array, logits_bv: jax.Array, temperature: float,
               top_p: float) -> jax.Array:
  """Draw the next tokens [batch]: the argmax at temperature 0, else a sample from the
  temperature-scaled, nucleus-truncated softmax."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  scaled_bv = logits_bv / temperature
  if top_p < 1.0:
    scaled_bv = top_p_mask(scaled_bv, top_p)
  return jax.random.categorical(rng, scaled_bv, axis=-1).astype(jnp.int32)


def check_options(temperature: float, top_p: float) -> None:
  """Raise ValueError for a negative temperature or a top_p outside (0, 1]."""
  if temperature < 0.0:
    raise ValueError(f"temperature must be at least 0 (0 means greedy), got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def generate(decode: DecodeFn, cache: Any, rng: jax.Array, *, batch: int, length: int,
             bos_id: int, temperature: float = 1.0, top_p: float = 1.0,
             tokens_bt: jax.Array | None = None,
             fixed_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Generate `length` tokens per row; return (tokens [batch, length], logits [batch, length, V]).

  Position i's logits are those the model gives for token i; a position where `fixed_bt` is
  set takes `tokens_bt`'s token instead of a drawn one. The random draw of position i uses
  `fold_in(rng, i)`, so it does not depend on how many positions were fixed.
  """
  check_options(temperature, top_p)
  if fixed_bt is None:
    tokens_bt = jnp.zeros((batch, length), jnp.int32)
    fixed_bt = jnp.zeros((batch, length), bool)

  def step(carry, position):
    previous_b, cache = carry
    logits_b1v, cache = decode(previous_b[:, None], position, cache)
    logits_bv = logits_b1v[:, 0]
    drawn_b = draw_token(jax.random.fold_in(rng, position), logits_bv, temperature, top_p)
    token_b = jnp.where(fixed_bt[:, position], tokens_bt[:, position], drawn_b)
    return (token_b, cache), (token_b, logits_bv)

  start_b = jnp.full((batch,), bos_id, jnp.int32)
  _, (tokens_lb, logits_lbv) = jax.lax.scan(step, (start_b, cache), jnp.arange(length))
  return tokens_lb.T, jnp.swapaxes(logits_lbv, 0, 1)

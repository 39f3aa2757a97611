"""Bidirectional Transformer score network with adaptive layer norm on the log-SNR.

The network reads noisy latents z_t [batch, length, embed_dim], the log-SNR lambda_t [batch] and
(for self-conditioning) the previous estimate x0_hat [batch, length, embed_dim], and returns
logits [batch, length, vocab] over the clean token at every position. Every weight names its
logical axes (`embed`, `mlp`, `heads`, `kv`, `vocab`, `latent`), which config rules map to mesh
axes; the model itself never mentions devices.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_text import registry
from diffusion_text.models.embedding import TokenEmbedding

_partitioned = nn.with_logical_partitioning
_constrain = nn.with_logical_constraint


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  seq_len: int
  embed_dim: int
  width: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: str = "float32"
  # Whether the network reads the fixed tokens (`samplers.condition_features`) as an extra
  # input, which classifier-free guidance needs. It adds the parameters of one dense layer.
  conditional: bool = False

  @classmethod
  def from_config(cls, config, vocab_size: int) -> "ModelConfig":
    m = config.model
    return cls(vocab_size=vocab_size, seq_len=config.data.seq_len, embed_dim=m.embed_dim,
               width=m.width, num_layers=m.num_layers, num_heads=m.num_heads,
               mlp_dim=m.mlp_dim, dropout=m.dropout, dtype=m.dtype,
               conditional=m.get("conditional", False))


def log_snr_features(log_snr_b: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal features of lambda [batch] -> [batch, dim].

  The lowest frequency is 1/64, so lambda in [-30, 30] maps to an angle within (-pi/2, pi/2)
  and the features stay distinct across every schedule's range. A scaled copy of lambda itself
  is appended as a last, monotone feature.
  """
  half = (dim - 1) // 2
  freqs = jnp.exp(jnp.linspace(math.log(1 / 64), math.log(16.0), half))
  angles_bh = log_snr_b[:, None].astype(jnp.float32) * freqs[None, :]
  feats = [jnp.sin(angles_bh), jnp.cos(angles_bh), log_snr_b[:, None] / 10.0]
  feats_bd = jnp.concatenate(feats, axis=-1)
  return jnp.pad(feats_bd, ((0, 0), (0, dim - feats_bd.shape[-1])))


def _dense(features, axes, name, dtype, zero=False, use_bias=True):
  init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                  kernel_init=_partitioned(init, axes),
                  bias_init=_partitioned(nn.initializers.zeros_init(), axes[-1:]))


def _modulate(x_btd, shift_bd, scale_bd):
  return x_btd * (1.0 + scale_bd[:, None, :]) + shift_bd[:, None, :]


class Attention(nn.Module):
  """Multi-head self-attention; causal for the autoregressive baseline.

  With `cache` (keys and values [batch, seq_len, heads, head_dim] and the write `position`),
  `x_btd` contains the tokens at `position`, `position + 1`, ... Their keys and values are
  written into the cache, and each query attends to every cached position up to its own. The
  call then returns (output, updated cache): key/value-cached decoding.
  """

  cfg: ModelConfig
  causal: bool = False

  @nn.compact
  def __call__(self, x_btd, mask_bt, cache=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    head_dim = cfg.width // cfg.num_heads
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    # Weights are 3-D with named head axes, so tensor parallelism can split heads.
    qkv_dnh = [self.param(name, _partitioned(init, ("embed", "heads", "kv")),
                          (cfg.width, cfg.num_heads, head_dim), jnp.float32)
               for name in ("query", "key", "value")]
    q_btnh, k_btnh, v_btnh = (jnp.einsum("btd,dnh->btnh", x_btd, w.astype(dtype))
                              for w in qkv_dnh)
    mask = None if mask_bt is None else mask_bt[:, None, None, :].astype(bool)
    if cache is None:
      out_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, mask=mask,
                                              is_causal=self.causal)
    else:
      position = cache["position"]
      k_bsnh = jax.lax.dynamic_update_slice_in_dim(cache["key"], k_btnh.astype(cache["key"].dtype),
                                                   position, axis=1)
      v_bsnh = jax.lax.dynamic_update_slice_in_dim(cache["value"],
                                                   v_btnh.astype(cache["value"].dtype),
                                                   position, axis=1)
      query_pos_t = position + jnp.arange(x_btd.shape[1])
      visible_ts = jnp.arange(k_bsnh.shape[1])[None, :] <= query_pos_t[:, None]
      out_btnh = jax.nn.dot_product_attention(q_btnh, k_bsnh.astype(dtype),
                                              v_bsnh.astype(dtype),
                                              mask=visible_ts[None, None, :, :])
      cache = {"key": k_bsnh, "value": v_bsnh, "position": position}
    out_btnh = _constrain(out_btnh, ("act_batch", "act_length", "act_heads", None))
    out_nhd = self.param("out", _partitioned(init, ("heads", "kv", "embed")),
                         (cfg.num_heads, head_dim, cfg.width), jnp.float32)
    out_btd = jnp.einsum("btnh,nhd->btd", out_btnh, out_nhd.astype(dtype))
    return out_btd if cache is None else (out_btd, cache)


class Block(nn.Module):
  """Pre-norm Transformer block.

  With a condition `cond_bd` (the diffusion time embedding), adaptive layer norm gives the
  shift, scale and gate of each branch. Without one (the autoregressive baseline) the layer
  norms learn their own scale and bias and the branches are added ungated.
  """

  cfg: ModelConfig
  causal: bool = False

  @nn.compact
  def __call__(self, x_btd, cond_bd, mask_bt, deterministic, cache=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    if cond_bd is not None:
      # Zero-initialised modulation makes every block start as the identity (adaLN-Zero, DiT).
      mod_bd = _dense(6 * cfg.width, ("cond", "embed"), "modulation", dtype, zero=True)(cond_bd)
      shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod_bd, 6, axis=-1)
      norm = lambda name: nn.LayerNorm(use_scale=False, use_bias=False, name=name,
                                       dtype=jnp.float32)
      pre_attention = lambda x: _modulate(norm("norm_attention")(x), shift1, scale1)
      pre_mlp = lambda x: _modulate(norm("norm_mlp")(x), shift2, scale2)
      gate_attention, gate_mlp = gate1[:, None, :], gate2[:, None, :]
    else:
      norm = lambda name: nn.LayerNorm(name=name, dtype=jnp.float32,
                                       scale_init=_partitioned(nn.initializers.ones, ("embed",)),
                                       bias_init=_partitioned(nn.initializers.zeros, ("embed",)))
      pre_attention, pre_mlp = norm("norm_attention"), norm("norm_mlp")
      gate_attention = gate_mlp = 1.0

    h_btd = pre_attention(x_btd).astype(dtype)
    h_btd = Attention(cfg, self.causal, name="attention")(h_btd, mask_bt, cache)
    if cache is not None:
      h_btd, cache = h_btd
    h_btd = nn.Dropout(cfg.dropout)(h_btd, deterministic=deterministic)
    x_btd = x_btd + gate_attention * h_btd

    h_btd = pre_mlp(x_btd).astype(dtype)
    h_btf = _dense(cfg.mlp_dim, ("embed", "mlp"), "mlp_in", dtype)(h_btd)
    h_btf = _constrain(nn.gelu(h_btf), ("act_batch", "act_length", "act_mlp"))
    h_btd = _dense(cfg.width, ("mlp", "embed"), "mlp_out", dtype)(h_btf)
    h_btd = nn.Dropout(cfg.dropout)(h_btd, deterministic=deterministic)
    x_btd = x_btd + gate_mlp * h_btd
    x_btd = _constrain(x_btd, ("act_batch", "act_length", "act_embed"))
    return x_btd if cache is None else (x_btd, cache)


class ScoreTransformer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, z_btl, log_snr_b, x0_self_btl, mask_bt=None, deterministic=True,
               cond_btc=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    length = z_btl.shape[1]
    if length > cfg.seq_len:
      raise ValueError(f"input length {length} exceeds the model's seq_len {cfg.seq_len}")

    pos_td = self.param("position", _partitioned(nn.initializers.normal(0.02), ("length", "embed")),
                        (cfg.seq_len, cfg.width), jnp.float32)
    x_btd = (_dense(cfg.width, ("latent", "embed"), "input", dtype)(z_btl.astype(dtype))
             + _dense(cfg.width, ("latent", "embed"), "self_cond", dtype, use_bias=False)(
                 x0_self_btl.astype(dtype))
             + pos_td[None, :length].astype(dtype))
    if cfg.conditional:
      # cond [batch, length, embed_dim + 1]; all zeros means "no condition".
      if cond_btc is None:
        cond_btc = jnp.zeros(z_btl.shape[:-1] + (z_btl.shape[-1] + 1,), z_btl.dtype)
      x_btd = x_btd + _dense(cfg.width, ("latent", "embed"), "condition", dtype, use_bias=False)(
          cond_btc.astype(dtype))
    x_btd = _constrain(x_btd, ("act_batch", "act_length", "act_embed"))

    feats_bd = log_snr_features(log_snr_b, cfg.width)
    cond_bd = nn.silu(_dense(cfg.width, ("embed", "cond"), "time_in", jnp.float32)(feats_bd))
    cond_bd = nn.silu(_dense(cfg.width, ("cond", "embed"), "time_out", jnp.float32)(cond_bd))

    for i in range(cfg.num_layers):
      x_btd = Block(cfg, name=f"block_{i}")(x_btd, cond_bd, mask_bt, deterministic)

    shift_bd, scale_bd = jnp.split(
        _dense(2 * cfg.width, ("cond", "embed"), "final_modulation", jnp.float32, zero=True)(cond_bd),
        2, axis=-1)
    x_btd = _modulate(nn.LayerNorm(use_scale=False, use_bias=False, name="final_norm",
                                   dtype=jnp.float32)(x_btd), shift_bd, scale_bd)
    # The rounding head: zero-initialised, so training starts from uniform logits.
    logits_btv = _dense(cfg.vocab_size, ("embed", "vocab"), "rounding", dtype, zero=True)(
        x_btd.astype(dtype))
    return _constrain(logits_btv, ("act_batch", "act_length", "act_vocab")).astype(jnp.float32)


@registry.register("model", "transformer")
class DiffusionLM(nn.Module):
  """Embedding table + score network. Methods are the pieces losses and samplers call."""

  cfg: ModelConfig
  kind = "diffusion"  # Read by Experiment to choose the training, evaluation and sampling code.

  def setup(self):
    self.embedding = TokenEmbedding(self.cfg.vocab_size, self.cfg.embed_dim)
    self.network = ScoreTransformer(self.cfg)

  def __call__(self, tokens_bt, log_snr_b):
    """Used for initialisation: denoise the clean latents once, without self-conditioning."""
    x0_btl = self.embed(tokens_bt)
    return self.denoise(x0_btl, log_snr_b, jnp.zeros_like(x0_btl))

  def embed(self, tokens_bt):
    return self.embedding(tokens_bt)

  def denoise(self, z_btl, log_snr_b, x0_self_btl, mask_bt=None, deterministic=True,
              cond_btc=None):
    """Logits [batch, length, vocab]; `cond_btc` is read only by a conditional model."""
    return self.network(z_btl, log_snr_b, x0_self_btl, mask_bt, deterministic, cond_btc)

  def interpolate(self, logits_btv):
    return self.embedding.interpolate(logits_btv)

  def embedding_table(self):
    return self.embedding.normalised()

"""Memory and compute plan of a config on a mesh, from abstract shapes only.

`python -m diffusion_text plan --config=... [--devices=N]` builds the model, optimiser and state
shardings with `jax.eval_shape` on a `jax.sharding.AbstractMesh`, so nothing is allocated and a
64-device slice can be planned on a laptop. Parameter, optimiser and EMA bytes per device are
exact for the state the trainer creates, and a test compares them with real sharded arrays.
The activation figure is an estimate.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from diffusion_text import config as config_lib
from diffusion_text import parallel
from diffusion_text.experiment import Experiment


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes of one training run on one mesh. Bytes are per device unless the name says total."""

  num_devices: int
  mesh: dict[str, int]
  num_params: int
  param_bytes_total: int
  param_bytes: int
  opt_state_bytes: int
  ema_bytes: int
  other_state_bytes: int
  activation_bytes: int
  tokens_per_device: int
  flops_per_token: float
  train_flops_per_token: float

  @property
  def state_bytes(self) -> int:
    return self.param_bytes + self.opt_state_bytes + self.ema_bytes + self.other_state_bytes

  @property
  def total_bytes(self) -> int:
    return self.state_bytes + self.activation_bytes


@dataclasses.dataclass(frozen=True)
class _VocabularyOnly:
  """Stands in for the tokenizer: planning needs only the vocabulary size."""

  vocab_size: int


def make_plan(config: ml_collections.ConfigDict, num_devices: int) -> Plan:
  """Plan `config` on `num_devices` devices, with the mesh its `mesh.*` fields give."""
  config_lib.validate(config)
  mesh = parallel.make_abstract_mesh(config.mesh, num_devices)
  experiment = Experiment(config, _VocabularyOnly(config.tokenizer.vocab_size), mesh=mesh)
  state = experiment.abstract_state

  def per_device(tree) -> int:
    return sum(parallel.shard_nbytes(leaf) for leaf in jax.tree.leaves(tree))

  tokens_per_device = (config.train.batch_size // parallel.batch_divisor(mesh)
                       * config.data.seq_len)
  return Plan(
      num_devices=num_devices,
      mesh=dict(mesh.shape),
      num_params=experiment.num_params(),
      param_bytes_total=sum(leaf.size * np.dtype(leaf.dtype).itemsize
                            for leaf in jax.tree.leaves(state["params"])),
      param_bytes=per_device(state["params"]),
      opt_state_bytes=per_device(state["opt_state"]),
      ema_bytes=per_device(state["ema"]),
      other_state_bytes=per_device(state["step"]),
      activation_bytes=estimate_activation_bytes(config, dict(mesh.shape), tokens_per_device),
      tokens_per_device=tokens_per_device,
      flops_per_token=experiment.flops_per_token(),
      train_flops_per_token=experiment.train_flops_per_token())


def estimate_activation_bytes(config: ml_collections.ConfigDict, mesh: dict[str, int],
                              tokens_per_device: int) -> int:
  """Estimate the activations one training step keeps for the backward pass, per device.

  Per token and layer it counts about eight width-sized tensors that stay whole on each device
  (residual stream, layer norms, modulated inputs, projections). It adds four that tensor
  parallelism splits by heads (queries, keys, values, attention output), two MLP-sized tensors,
  and the attention scores and probabilities (heads x length). The rounding head adds three
  float32 vocabulary-sized tensors per token.
  NOTE: an estimate, not a measurement. It ignores rematerialisation, XLA's temporary buffers,
  the weights FSDP gathers for the layer being computed, and the self-conditioning pass;
  compare it with `jax.jit(...).lower(...).compile().memory_analysis()` on the target.
  """
  m = config.model
  tensor = mesh["tensor"]
  act_size = 2 if m.dtype == "bfloat16" else 4
  per_layer = (8 * m.width + (4 * m.width + 2 * m.mlp_dim + 2 * m.num_heads * config.data.seq_len)
               / tensor)
  head = 3 * 4 * config.tokenizer.vocab_size / tensor
  return int(tokens_per_device * (m.num_layers * per_layer * act_size + head))


def format_bytes(n: int) -> str:
  value = float(n)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if value < 1024 or unit == "TiB":
      return f"{n:,} B" if unit == "B" else f"{n:,} B ({value:.2f} {unit})"
    value /= 1024
  raise AssertionError("unreachable")


def format_plan(plan: Plan) -> str:
  """Render a plan as the lines `python -m diffusion_text plan` prints."""
  mesh = ", ".join(f"{axis}={size}" for axis, size in plan.mesh.items())
  rows = [
      ("devices", f"{plan.num_devices} (mesh {mesh})"),
      ("parameters", f"{plan.num_params:,} ({format_bytes(plan.param_bytes_total)} in total)"),
      ("FLOPs per token", f"{plan.flops_per_token / 1e9:.3f} GFLOP forward, "
                          f"{plan.train_flops_per_token / 1e9:.3f} GFLOP per training token"),
      ("tokens per device", f"{plan.tokens_per_device:,} per training step"),
      ("per device:", ""),
      ("  parameters", format_bytes(plan.param_bytes)),
      ("  optimiser state", format_bytes(plan.opt_state_bytes)),
      ("  EMA parameters", format_bytes(plan.ema_bytes)),
      ("  step counter", format_bytes(plan.other_state_bytes)),
      ("  activations", f"{format_bytes(plan.activation_bytes)} (estimate)"),
      ("  total", f"{format_bytes(plan.total_bytes)} (the activations are an estimate)"),
  ]
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)

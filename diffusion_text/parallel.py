"""Device mesh, logical-axis rules and the shardings of state and batches.

Mesh axes are `data`, `fsdp` and `tensor`. Model code names logical axes only; the rules in
`config.mesh.axis_rules` map them to mesh axes here. Batches are split over (`data`, `fsdp`).

Flax maps a logical name that has no rule to "replicated" without a warning, and `jax.jit`
reports a dimension that a mesh axis does not divide only while compiling. `check_shardable`
turns both into a ConfigError that names the config field and a size that works.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from diffusion_text.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The config field that sets the size of each logical parameter axis of the built-in model, so
# an error can name the flag to change. Axes of a user's model fall back to the parameter name.
_FIELD_OF_LOGICAL_AXIS = {
    "vocab": "tokenizer.vocab_size",
    "latent": "model.embed_dim",
    "embed": "model.width",
    "cond": "model.width",
    "heads": "model.num_heads",
    "mlp": "model.mlp_dim",
    "length": "data.seq_len",
}


def maybe_initialize_distributed() -> None:
  """Start JAX's multi-controller runtime when this process is one of several.

  On Cloud TPU VMs `jax.distributed.initialize()` finds its peers itself; elsewhere the
  coordinator address, process count and process id come from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if jax.distributed.is_initialized():
    return
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize()


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolve a -1 entry and check that the axes multiply to the device count."""
  sizes = [int(mesh_config[axis]) for axis in AXES]
  requested = dict(zip(AXES, sizes))
  fill = [i for i, size in enumerate(sizes) if size == -1]
  if len(fill) > 1:
    raise ConfigError(f"at most one of --config.mesh.data/fsdp/tensor may be -1; got {requested}.")
  known = math.prod(size for size in sizes if size != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(
          f"mesh axes {requested} cannot fill {num_devices} devices because {num_devices} is not "
          f"divisible by {known}; {_mesh_suggestion(requested, num_devices)}.")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh axes {requested} multiply to {math.prod(sizes)}, but there are {num_devices} "
        f"devices; {_mesh_suggestion(requested, num_devices)}.")
  return tuple(sizes)


def _mesh_suggestion(requested: dict[str, int], num_devices: int) -> str:
  model_axes = requested["fsdp"] * requested["tensor"]
  if requested["fsdp"] > 0 and requested["tensor"] > 0 and num_devices % model_axes == 0:
    return (f"use --config.mesh.data=-1 to give the data axis the remaining "
            f"{num_devices // model_axes} devices")
  return ("use --config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.tensor=1, or fsdp and "
          f"tensor sizes whose product divides {num_devices}")


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Build the mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def make_abstract_mesh(mesh_config, num_devices: int) -> AbstractMesh:
  """Build a mesh of axis sizes only, to plan for a device count this machine does not have."""
  shape = mesh_shape(mesh_config, num_devices)
  return AbstractMesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def axis_rules(mesh_config) -> tuple[tuple[str, object], ...]:
  return tuple((name, tuple(target) if isinstance(target, list) else target)
               for name, target in mesh_config.axis_rules)


def check_shardable(abstract_boxed_state, mesh_sizes: dict[str, int], rules) -> None:
  """Raise ConfigError if a parameter dimension cannot be split the way the axis rules map it.

  `abstract_boxed_state` contains flax boxes with logical axis names (from `jax.eval_shape`).
  Two cases are rejected: a logical name with no rule (flax would replicate it silently), and
  a dimension whose size the product of its mesh axes does not divide (jit would fail while
  compiling).
  """
  known = {name for name, _ in rules}
  logical_specs = nn.get_partition_spec(abstract_boxed_state)
  shapes = nn.unbox(abstract_boxed_state)
  flat_specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]

  for (path, leaf), logical in zip(flat_shapes, flat_specs):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    missing = [axis for axis in logical if isinstance(axis, str) and axis not in known]
    if missing:
      raise ConfigError(
          f"parameter {name} names logical axis {missing[0]!r}, which has no rule in "
          f"--config.mesh.axis_rules; add ({missing[0]!r}, None) to replicate it or map it to "
          f"one of the mesh axes {AXES}.")
    mesh_spec = nn.logical_to_mesh_axes(logical, rules)
    for dim, (size, logical_axis, mesh_axes) in enumerate(zip(leaf.shape, logical, mesh_spec)):
      parts = _num_parts(mesh_axes, mesh_sizes)
      if size % parts:
        raise ConfigError(_indivisible_message(name, leaf.shape, dim, logical_axis, mesh_axes,
                                               mesh_sizes))


def _as_tuple(mesh_axes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def _num_parts(mesh_axes, mesh_sizes: dict[str, int]) -> int:
  return math.prod(mesh_sizes[axis] for axis in _as_tuple(mesh_axes))


def _indivisible_message(name, shape, dim, logical_axis, mesh_axes, mesh_sizes) -> str:
  size = shape[dim]
  axes = _as_tuple(mesh_axes)
  parts = _num_parts(mesh_axes, mesh_sizes)
  where = " x ".join(f"mesh axis {axis!r} (size {mesh_sizes[axis]})" for axis in axes)
  field = _FIELD_OF_LOGICAL_AXIS.get(logical_axis)
  subject = (f"--config.{field}={size}" if field else
             f"dimension {dim} ({logical_axis!r}, size {size}) of parameter {name}")
  fixes = []
  if field:
    fixes.append(f"set --config.{field} to a multiple of {parts}, e.g. {-(-size // parts) * parts}")
  if len(axes) == 1:
    fixes.append(f"set --config.mesh.{axes[0]}={math.gcd(size, parts)} with --config.mesh.data=-1")
  fixes.append(f"map {logical_axis!r} to None in --config.mesh.axis_rules to replicate it")
  return (f"{subject} cannot be split over {where}: parameter {name} has shape {tuple(shape)} "
          f"and {size} is not divisible by {parts}. To fix it, " + ", or ".join(fixes) + ".")


def state_shardings(abstract_boxed_state, mesh: Mesh | AbstractMesh, rules):
  """NamedShardings for a state whose parameters carry logical axis names (flax boxes)."""
  specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def shard_nbytes(abstract: jax.ShapeDtypeStruct) -> int:
  """Bytes of one device's shard of an array described by a ShapeDtypeStruct with a sharding."""
  shard = abstract.sharding.shard_shape(abstract.shape)
  return math.prod(shard) * np.dtype(abstract.dtype).itemsize


def batch_sharding(mesh: Mesh | AbstractMesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh | AbstractMesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh | AbstractMesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble this process's rows into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def gather_to_host(tree: Any) -> Any:
  """Copy arrays to numpy on every process, including arrays split across processes."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)

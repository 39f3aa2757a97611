"""Device mesh, logical-axis rules and the shardings of state and batches.

Mesh axes are `data`, `fsdp` and `tensor`. Model code names logical axes only; the rules in
`config.mesh.axis_rules` map them to mesh axes here. Batches are split over (`data`, `fsdp`).
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_text.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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
  """Resolve -1 entries and check that the axes multiply to the device count."""
  sizes = [int(mesh_config[axis]) for axis in AXES]
  fill = [i for i, size in enumerate(sizes) if size == -1]
  if len(fill) > 1:
    raise ConfigError("at most one of --config.mesh.data/fsdp/tensor may be -1; got "
                      f"{dict(zip(AXES, sizes))}.")
  known = math.prod(size for size in sizes if size != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh axes {dict(zip(AXES, sizes))} cannot fill {num_devices} devices: "
                        f"{num_devices} is not divisible by {known}.")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh axes {dict(zip(AXES, sizes))} multiply to {math.prod(sizes)}, but "
                      f"there are {num_devices} devices; e.g. use --config.mesh.data=-1 "
                      f"--config.mesh.fsdp=1 --config.mesh.tensor=1.")
  return tuple(sizes)


def make_mesh(mesh_config) -> Mesh:
  shape = mesh_shape(mesh_config, jax.device_count())
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def axis_rules(mesh_config) -> tuple[tuple[str, object], ...]:
  return tuple((name, tuple(target) if isinstance(target, list) else target)
               for name, target in mesh_config.axis_rules)


def state_shardings(abstract_boxed_state, mesh: Mesh, rules):
  """NamedShardings for a state whose parameters carry logical axis names (flax boxes)."""
  specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble this process's rows into global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

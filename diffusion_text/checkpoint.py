"""Checkpoints of a run, behind one small interface over orbax's CheckpointManager.

A checkpoint contains three items: `state` (step, parameters, EMA parameters, optimiser state),
`data` (the input iterator's position) and `meta` (the resolved config and the tokenizer model,
so a checkpoint alone can sample). Orbax writes each step into a temporary folder and renames it
when complete, so a crash mid-write leaves the previous checkpoint intact; the oldest ones are
deleted only after a newer one is complete.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from diffusion_text import paths
from diffusion_text.errors import ConfigError


class Checkpointer:
  """Save and restore run checkpoints under `<workdir>/checkpoints/<step>/`."""

  def __init__(self, workdir: str, keep: int = 2):
    self.directory = os.path.join(_absolute(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, meta: dict) -> None:
    """Start writing a checkpoint; it completes in the background (see `wait`)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def wait(self) -> None:
    """Block until pending writes are finished; raises if one failed."""
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
    """Restore (state, data_state, meta) of `step`, placing arrays as `abstract_state` specifies.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings, so a checkpoint can be
    restored onto any mesh.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["meta"]

  def restore_newest_good(self, abstract_state: Any) -> tuple[int, Any, Any, dict] | None:
    """Restore the newest checkpoint that reads back completely; None when there is none.

    A checkpoint that fails to read (truncated or missing files, say after a crash or a full
    disk) is reported and moved to `<workdir>/checkpoints_unreadable/`, never deleted, and the
    next older one is tried. Moving it aside also keeps orbax from refusing to save that step
    again when training reaches it.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, data_state, meta = self.restore(step, abstract_state)
      except Exception as exc:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many error types for damaged files; all mean "unreadable".
        logging.warning("checkpoint: step %d in %s cannot be read (%s: %s); trying an older "
                        "one", step, self.directory, type(exc).__name__, exc)
        self._move_aside(step)
        continue
      return step, state, data_state, meta
    return None

  def _move_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      target = epath.Path(self.directory + "_unreadable")
      target.mkdir(parents=True, exist_ok=True)
      destination = target / f"{step}-moved-{int(time.time())}"
      (epath.Path(self.directory) / str(step)).rename(destination)
      logging.warning("checkpoint: moved the unreadable step %d to %s", step, destination)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self._manager.reload()

  def restore_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def close(self) -> None:
    self._manager.close()


def _absolute(path: str) -> str:
  """Make a local path absolute; leave URLs such as gs://bucket/run, which orbax opens itself."""
  return path if paths.is_url(path) else os.path.abspath(path)


def encode_bytes(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def decode_bytes(text: str) -> bytes:
  return base64.b64decode(text.encode("ascii"))


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `state`'s shapes and dtypes with the given shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def latest_meta(workdir: str) -> tuple[int, dict] | None:
  """Return (step, meta) of the newest checkpoint in `workdir`, or None when there is none."""
  directory = os.path.join(workdir, "checkpoints")
  if not epath.Path(directory).is_dir():
    return None
  checkpointer = Checkpointer(workdir)
  try:
    step = checkpointer.latest_step()
    if step is None:
      return None
    return step, checkpointer.restore_meta(step)
  finally:
    checkpointer.close()


def require_checkpoint(workdir: str) -> tuple[int, dict]:
  found = latest_meta(workdir)
  if found is None:
    raise ConfigError(f"no checkpoint found in {os.path.join(workdir, 'checkpoints')}; "
                      "train first with `python -m diffusion_text train --workdir=...`.")
  return found

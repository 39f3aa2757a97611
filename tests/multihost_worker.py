"""One process of a multi-process training test, and the helpers the tests share with it.

`tests/test_parallel.py` starts this script twice with a loopback coordinator. Each process
has two fake CPU devices, so the two form one four-device JAX cluster. Both prepare the
bundled corpus in the shared `--tfds_dir`, train a few steps on fixed batches, save and restore
a checkpoint together, and process 0 writes the record counts, losses, gradient norms and final
parameters to `--output` for the test to compare with a single-process run.

    python tests/multihost_worker.py --process_id=0 --num_processes=2 --port=PORT \
        --workdir=DIR --tfds_dir=DIR --output=FILE.npz
"""

from __future__ import annotations

import argparse
import os
import sys

NUM_STEPS = 3
MULTIHOST_MESH = {"data": 1, "fsdp": 2, "tensor": 2}


class FakeTokenizer:
  """The experiment needs only the vocabulary size to build the model."""

  vocab_size = 400


def tiny_config(**mesh):
  """A model small enough to compile quickly, with every sharded size even."""
  from diffusion_text import config as config_lib  # pylint: disable=import-outside-toplevel

  c = config_lib.base_config()
  c.data.seq_len = 16
  c.tokenizer.vocab_size = FakeTokenizer.vocab_size
  c.model.embed_dim = 8
  c.model.width = 48
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.mlp_dim = 96
  c.train.batch_size = 8
  c.train.steps = 20
  c.train.warmup_steps = 2
  c.train.learning_rate = 3e-3
  for axis in ("data", "fsdp", "tensor"):
    c.mesh[axis] = mesh.get(axis, 1)
  return c


def global_batches(config, num_steps: int):
  """Fixed token batches [batch, seq_len], the same in every process and every test."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(1234)
  shape = (num_steps, config.train.batch_size, config.data.seq_len)
  return rng.integers(0, FakeTokenizer.vocab_size, size=shape, dtype=np.int32)


def process_rows(experiment, tokens_bt):
  """This process's rows of a global batch, in the order its devices hold them."""
  sharding = experiment.batch_sharding
  starts = [index[0].start or 0 for index in
            sharding.addressable_devices_indices_map(tokens_bt.shape).values()]
  stops = [index[0].stop or tokens_bt.shape[0] for index in
           sharding.addressable_devices_indices_map(tokens_bt.shape).values()]
  return tokens_bt[min(starts):max(stops)]


def train_steps(experiment, num_steps: int = NUM_STEPS):
  """Run `num_steps` compiled steps from a fresh state; return (losses, grad norms, state, step fn)."""
  import jax  # pylint: disable=import-outside-toplevel
  from diffusion_text import parallel  # pylint: disable=import-outside-toplevel

  state = experiment.init_state()
  train_step = experiment.make_train_step()
  rng = jax.random.key(experiment.config.seed)
  losses, grad_norms = [], []
  for tokens_bt in global_batches(experiment.config, num_steps):
    batch = parallel.global_batch({"tokens": process_rows(experiment, tokens_bt)}, experiment.mesh)
    state, metrics = train_step(state, batch, rng)
    losses.append(float(metrics["train/loss"]))
    grad_norms.append(float(metrics["train/grad_norm"]))
  return losses, grad_norms, state, train_step


def flatten(tree) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tfds_dir", required=True)
  parser.add_argument("--output", required=True)
  args = parser.parse_args()

  # The same variables a user sets on a cluster without auto-detection; loopback only.
  os.environ["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{args.port}"
  os.environ["JAX_NUM_PROCESSES"] = str(args.num_processes)
  os.environ["JAX_PROCESS_ID"] = str(args.process_id)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from diffusion_text import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from diffusion_text import metrics  # pylint: disable=import-outside-toplevel
  from diffusion_text import parallel  # pylint: disable=import-outside-toplevel
  from diffusion_text.data import sources  # pylint: disable=import-outside-toplevel
  from diffusion_text.experiment import Experiment  # pylint: disable=import-outside-toplevel

  parallel.maybe_initialize_distributed()
  assert jax.process_count() == args.num_processes, jax.process_count()
  assert jax.process_index() == args.process_id, jax.process_index()

  # Both processes prepare the same dataset in one folder, and process 0 goes first.
  records = {split: len(sources.get_source({"tfds_dir": args.tfds_dir}, split))
             for split in ("train", "validation")}

  experiment = Experiment(tiny_config(**MULTIHOST_MESH), FakeTokenizer())
  losses, grad_norms, state, train_step = train_steps(experiment)
  params = parallel.gather_to_host(state["params"])

  # Every process takes part in writing and reading the checkpoint.
  checkpointer = ckpt_lib.Checkpointer(args.workdir)
  checkpointer.save(NUM_STEPS, state, {"position": NUM_STEPS}, {"processes": args.num_processes})
  checkpointer.wait()
  restored, data_state, meta = checkpointer.restore(NUM_STEPS, experiment.abstract_state)
  checkpointer.close()
  assert data_state == {"position": NUM_STEPS}, data_state
  assert meta == {"processes": args.num_processes}, meta
  for name, leaf in flatten(parallel.gather_to_host(restored["params"])).items():
    np.testing.assert_array_equal(leaf, flatten(params)[name], err_msg=name)

  # Only process 0 writes metrics.
  writer = metrics.MetricWriter(args.workdir)
  writer.write_scalars(NUM_STEPS, {"train/loss": losses[-1]})
  writer.close()

  if args.process_id == 0:
    np.savez(args.output, losses=np.array(losses), grad_norms=np.array(grad_norms),
             train_records=np.array(records["train"]),
             validation_records=np.array(records["validation"]),
             cache_size=np.array(train_step._cache_size()),  # pylint: disable=protected-access
             **{f"params/{k}": v for k, v in flatten(params).items()})
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  sys.exit(main())

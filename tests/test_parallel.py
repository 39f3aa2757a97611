"""Sharding on 8 fake CPU devices: equal results on every mesh, real parameter splits, restore
onto other meshes, two-process training, mesh errors, and the memory planner."""

import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_text import checkpoint as ckpt_lib
from diffusion_text import parallel
from diffusion_text import train
from diffusion_text import plan as plan_lib
from diffusion_text.data import sources
from diffusion_text.errors import ConfigError
from diffusion_text.experiment import Experiment

import multihost_worker as worker  # tests/ is on sys.path, next to this file.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]


def make_experiment(data, fsdp, tensor, **overrides):
  config = worker.tiny_config(data=data, fsdp=fsdp, tensor=tensor)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  devices = jax.devices()[:data * fsdp * tensor]
  return Experiment(config, worker.FakeTokenizer(), devices=devices)


@pytest.fixture(scope="module")
def runs():
  """Three training steps on each mesh: {mesh: (experiment, losses, grad norms, state, step)}."""
  results = {}
  for mesh in MESHES:
    experiment = make_experiment(*mesh)
    results[mesh] = (experiment, *worker.train_steps(experiment))
  return results


def host_params(state):
  return worker.flatten(jax.device_get(state["params"]))


# -- Same results on every mesh ------------------------------------------------------------------


@pytest.mark.parametrize("mesh", MESHES[1:])
def test_mesh_matches_single_device(runs, mesh):
  _, losses_1, norms_1, state_1, _ = runs[(1, 1, 1)]
  _, losses, norms, state, _ = runs[mesh]
  np.testing.assert_allclose(losses, losses_1, rtol=2e-6)
  np.testing.assert_allclose(norms, norms_1, rtol=2e-5)
  reference = host_params(state_1)
  for name, value in host_params(state).items():
    np.testing.assert_allclose(value, reference[name], rtol=1e-4, atol=1e-5, err_msg=name)
  assert int(state["step"]) == worker.NUM_STEPS


@pytest.mark.parametrize("mesh", MESHES)
def test_train_step_compiles_once(runs, mesh):
  train_step = runs[mesh][4]
  assert train_step._cache_size() == 1  # pylint: disable=protected-access


def test_parameters_split_over_fsdp_and_tensor(runs):
  experiment, _, _, state, _ = runs[(2, 2, 2)]
  params = state["params"]["network"]
  # (embed, heads, kv) -> (fsdp, tensor, replicated): width 48 / 2, 2 heads / 2, head_dim 24.
  query = params["block_0"]["attention"]["query"]
  assert query.shape == (48, 2, 24)
  assert {s.data.shape for s in query.addressable_shards} == {(24, 1, 24)}
  # (embed, mlp) -> (fsdp, tensor).
  mlp_in = params["block_0"]["mlp_in"]["kernel"]
  assert {s.data.shape for s in mlp_in.addressable_shards} == {(24, 48)}
  # (embed, vocab) -> (fsdp, tensor).
  rounding = params["rounding"]["kernel"]
  assert {s.data.shape for s in rounding.addressable_shards} == {(24, 200)}
  # The table is (vocab, latent) -> (tensor, replicated).
  table = state["params"]["embedding"]["table"]
  assert {s.data.shape for s in table.addressable_shards} == {(200, 8)}
  assert experiment.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}


def per_device_bytes(tree) -> int:
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def test_memory_per_device_falls_with_fsdp(runs):
  bytes_by_mesh = {mesh: per_device_bytes(runs[mesh][3]["params"]) for mesh in MESHES}
  full = bytes_by_mesh[(1, 1, 1)]
  assert bytes_by_mesh[(8, 1, 1)] == full  # Pure data parallelism replicates parameters.
  # Biases and the time embedding stay whole, so the tiny model does not reach 1/4 or 1/8.
  assert bytes_by_mesh[(2, 4, 1)] < 0.5 * full
  assert bytes_by_mesh[(2, 2, 2)] < 0.5 * full


@pytest.mark.parametrize("mesh", [(2, 4, 1), (2, 2, 2)])
def test_optimizer_and_ema_sharded_like_params(runs, mesh):
  experiment, _, _, state, _ = runs[mesh]
  params = worker.flatten(state["params"])
  ema = worker.flatten(state["ema"])
  adam = state["opt_state"][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState first.
  for moments in (worker.flatten(adam.mu), worker.flatten(adam.nu)):
    assert moments.keys() == params.keys()
    for name, value in moments.items():
      assert value.sharding.is_equivalent_to(params[name].sharding, value.ndim), name
  for name, value in ema.items():
    assert value.sharding.is_equivalent_to(params[name].sharding, value.ndim), name
  shardings = worker.flatten(experiment.state_shardings["params"])
  for name, value in params.items():
    assert value.sharding.is_equivalent_to(shardings[name], value.ndim), name


def test_eval_step_and_sampler_match_across_meshes(runs):
  outputs = {}
  for mesh in [(1, 1, 1), (2, 2, 2)]:
    experiment, _, _, state, _ = runs[mesh]
    tokens_bt = worker.global_batches(experiment.config, 1)[0]
    index = np.arange(len(tokens_bt), dtype=np.int32)
    batch = parallel.global_batch(
        {"tokens": tokens_bt, "mask": np.ones(tokens_bt.shape, np.float32), "index": index,
         "t": train.eval_times(index, experiment.schedule.t_min)}, experiment.mesh)
    eval_step = experiment.make_eval_step()
    sampler = experiment.make_sampler(sampler="ode_euler", steps=2, num_samples=8)
    rng = jax.random.key(5)
    loss_sum, count = eval_step(state["params"], batch, rng)
    loss_sum, count = eval_step(state["params"], batch, rng)
    tokens, logits = sampler(state["params"], rng)
    tokens, logits = sampler(state["params"], rng)
    assert eval_step._cache_size() == 1  # pylint: disable=protected-access
    assert sampler._cache_size() == 1  # pylint: disable=protected-access
    assert tokens.sharding.is_equivalent_to(experiment.batch_sharding, tokens.ndim)
    outputs[mesh] = float(loss_sum) / float(count), np.asarray(logits)
  np.testing.assert_allclose(outputs[(2, 2, 2)][0], outputs[(1, 1, 1)][0], rtol=1e-5)
  np.testing.assert_allclose(outputs[(2, 2, 2)][1], outputs[(1, 1, 1)][1], rtol=1e-4, atol=1e-4)


# -- Restore onto another mesh -------------------------------------------------------------------


def test_checkpoint_restores_on_other_meshes(runs, tmp_path):
  _, _, _, state, _ = runs[(8, 1, 1)]
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  checkpointer.save(worker.NUM_STEPS, state, {"position": 3}, {"note": "written on (8, 1, 1)"})
  checkpointer.wait()
  saved = worker.flatten(jax.device_get(state))

  for mesh in [(2, 2, 2), (1, 1, 1)]:
    experiment = make_experiment(*mesh)
    restored, data_state, _ = checkpointer.restore(worker.NUM_STEPS, experiment.abstract_state)
    assert data_state == {"position": 3}
    assert int(restored["step"]) == worker.NUM_STEPS
    targets = worker.flatten(experiment.state_shardings)
    for name, value in worker.flatten(restored).items():
      assert value.sharding.is_equivalent_to(targets[name], value.ndim), (mesh, name)
      assert value.dtype == saved[name].dtype, (mesh, name)
      np.testing.assert_array_equal(np.asarray(value), saved[name], err_msg=f"{mesh} {name}")
  checkpointer.close()


# -- Two processes -------------------------------------------------------------------------------


def free_loopback_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  port = free_loopback_port()
  output = tmp_path / "process0.npz"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"),
       f"--process_id={i}", "--num_processes=2", f"--port={port}",
       f"--workdir={tmp_path / 'run'}", f"--tfds_dir={tmp_path / 'tfds'}",
       f"--output={output}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=240)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f"process {i} exited with {proc.returncode}:\n{logs[i][-3000:]}"

  result = np.load(output)
  for split in ("train", "validation"):
    expected = len(sources.get_source({"tfds_dir": str(tmp_path / "tfds_single")}, split))
    assert int(result[f"{split}_records"]) == expected, split
  reference = make_experiment(1, 1, 1)
  losses, norms, state, _ = worker.train_steps(reference)
  np.testing.assert_allclose(result["losses"], losses, rtol=2e-6)
  np.testing.assert_allclose(result["grad_norms"], norms, rtol=2e-5)
  assert int(result["cache_size"]) == 1
  for name, value in host_params(state).items():
    np.testing.assert_allclose(result[f"params/{name}"], value, rtol=1e-4, atol=1e-5,
                               err_msg=name)
  # Process 0 alone wrote the metrics file: one record, not two.
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    assert len(f.readlines()) == 1


# -- Bad mesh configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("mesh, overrides, message", [
    ((3, 1, 1), {}, r"multiply to 3, but there are 8 devices.*--config\.mesh\.data=-1"),
    ((-1, 3, 1), {}, r"cannot fill 8 devices because 8 is not divisible by 3"),
    ((-1, -1, 1), {}, r"at most one of"),
    ((8, 1, 1), {"train.batch_size": 12},
     r"--config\.train\.batch_size=12 .*8 devices.*multiple of 8"),
    ((2, 1, 4), {}, r"--config\.model\.num_heads=2 cannot be split over mesh axis 'tensor' "
                    r"\(size 4\).*multiple of 4, e\.g\. 4.*--config\.mesh\.tensor=2"),
    ((4, 1, 2), {"model.mlp_dim": 91}, r"--config\.model\.mlp_dim=91 .*'tensor' \(size 2\)"
                                       r".*e\.g\. 92"),
    ((4, 1, 2), {"tokenizer.vocab_size": 401}, r"--config\.tokenizer\.vocab_size=401 .*e\.g\. 402"),
    ((2, 4, 1), {"model.width": 50}, r"--config\.model\.width=50 .*'fsdp' \(size 4\).*e\.g\. 52"
                                     r".*--config\.mesh\.fsdp=2"),
])
def test_bad_mesh_config_message(mesh, overrides, message):
  data, fsdp, tensor = mesh
  config = worker.tiny_config(data=data, fsdp=fsdp, tensor=tensor)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value

  class Tokenizer:
    vocab_size = config.tokenizer.vocab_size

  with pytest.raises(ConfigError, match=message):
    Experiment(config, Tokenizer())


def test_logical_axis_without_rule_is_rejected():
  config = worker.tiny_config(data=8)
  config.mesh.axis_rules = tuple(rule for rule in config.mesh.axis_rules if rule[0] != "mlp")
  with pytest.raises(ConfigError, match=r"logical axis 'mlp', which has no rule"):
    Experiment(config, worker.FakeTokenizer())


# -- Memory planner ------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 4, 2)])
def test_planner_matches_sharded_arrays(runs, mesh):
  data, fsdp, tensor = mesh
  config = worker.tiny_config(data=data, fsdp=fsdp, tensor=tensor)
  plan = plan_lib.make_plan(config, num_devices=8)
  if mesh in runs:
    state = runs[mesh][3]
  else:
    state = make_experiment(*mesh).init_state()
  assert plan.mesh == {"data": data, "fsdp": fsdp, "tensor": tensor}
  assert plan.num_params == sum(x.size for x in jax.tree.leaves(state["params"]))
  assert plan.param_bytes == per_device_bytes(state["params"])
  assert plan.opt_state_bytes == per_device_bytes(state["opt_state"])
  assert plan.ema_bytes == per_device_bytes(state["ema"])
  assert plan.param_bytes < plan.param_bytes_total / 2
  # Every device has an equal share.
  for leaf in jax.tree.leaves(state):
    assert len({s.data.nbytes for s in leaf.addressable_shards}) == 1


def test_planner_scales_to_devices_not_present():
  config = worker.tiny_config(data=1, fsdp=-1)
  config.model.width = 128
  config.train.batch_size = 64
  single, slice_64 = plan_lib.make_plan(config, 1), plan_lib.make_plan(config, 64)
  assert slice_64.mesh == {"data": 1, "fsdp": 64, "tensor": 1}
  assert slice_64.param_bytes < single.param_bytes / 8
  assert slice_64.activation_bytes == pytest.approx(single.activation_bytes / 64, rel=1e-6)
  assert single.param_bytes == single.param_bytes_total
  assert math.isclose(single.flops_per_token, slice_64.flops_per_token)


def test_plan_command_prints_per_device_bytes():
  result = subprocess.run(
      [sys.executable, "-m", "diffusion_text", "plan", "--config=experiments/large.py",
       "--devices=64", "--config.mesh.data=1", "--config.mesh.fsdp=-1"],
      capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "64 (mesh data=1, fsdp=64, tensor=1)" in result.stdout
  assert "494,874,880" in result.stdout
  for row in ("parameters", "optimiser state", "EMA parameters", "activations",
              "FLOPs per token"):
    assert row in result.stdout

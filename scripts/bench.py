"""Benchmark suite: hardware ceilings, training and sampling speed, quality at equal compute, memory.

    python scripts/bench.py          # full suite into docs/benchmarks.md
    python scripts/bench.py --quick  # tiny sizes into runs/bench_quick/benchmarks.md
    make bench                       # the full suite (`make bench QUICK=1`: the quick one)

On the 2-core CPU machine the project is developed on, the quick suite took 2.5 to 4 min,
depending on other load. The full suite is estimated at 30 to 35 min, from the quick run and
from timing its largest cells alone.

Sections, all measured in one run so that their ratios compare like with like:

1. Ceilings: the best matrix-multiply rate (float32, bfloat16) and memory copy bandwidth.
2. Training speed: tokens/s and model FLOP utilisation (MFU) of diffusion and autoregressive
   (AR) models with the same backbone. The analytic FLOPs are checked against XLA's cost
   analysis, and the step at the larger size is split into forward, backward and optimiser.
3. Sampling speed: batch-1 latency and batch-64 throughput, diffusion at several NFE against
   AR decoding with a key/value cache (random-initialised weights: speed does not depend on them).
4. Quality at equal compute: both models trained through `python -m diffusion_text train` on
   the bundled corpus with the same training FLOPs, then validation NLL, and samples scored by
   the AR model (generative perplexity) with their unigram entropy.
5. Peak memory of one training step: the planner's estimate, XLA's memory analysis, and the
   peak resident memory of a subprocess that runs only that step.

Sections 1-3 run once per platform: always on the CPU, and again on an accelerator when JAX
finds one. Sections 4-5 run on JAX's default device. Trained runs go to `<workdir>/diffusion`
and `<workdir>/ar`. A rerun reuses a finished run whose config matches, so delete those
folders to retrain. Raw figures go to `<workdir>/results.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusion_text import checkpoint as ckpt_lib  # noqa: E402
from diffusion_text import plan as plan_lib  # noqa: E402
from diffusion_text import samplers  # noqa: E402
from diffusion_text.data import pipeline  # noqa: E402
from diffusion_text.data import sources  # noqa: E402
from diffusion_text.experiment import Experiment  # noqa: E402

import bench_report  # noqa: E402  (scripts/ is on sys.path when this file runs as a script)

DIFFUSION_CONFIG = os.path.join("experiments", "demo.py")
AR_CONFIG = os.path.join("experiments", "ar.py")
SECTIONS = ("ceilings", "training", "sampling", "quality", "memory")
KINDS = ("diffusion", "ar")


@dataclasses.dataclass(frozen=True)
class Suite:
  """Sizes and repetitions of one benchmark run."""

  name: str
  output: str  # Markdown file; the PNG plots go beside it.
  workdir: str  # Trained runs and results.json.
  matmul_sizes: tuple[int, ...]
  copy_mib: int
  # Model sizes for training speed and memory: name -> config overrides (same for both kinds).
  model_sizes: dict[str, dict[str, Any]]
  train_batch: int
  train_seq_len: int
  min_timed_seconds: float  # Each training-speed figure times steps for at least this long.
  sample_size: str  # Entry of model_sizes used for sampling speed.
  sample_lengths: tuple[int, ...]
  sample_nfe: tuple[int, ...]
  sample_batch: int  # Throughput batch; latency is measured at batch 1.
  latency_repeats: int
  # Overrides of experiments/demo.py for the quality runs; the AR run gets the same ones.
  quality_overrides: dict[str, Any]
  quality_samples: int
  quality_eval_batches: int  # 0: the whole validation split.
  kinds: tuple[str, ...] = KINDS  # Model kinds for training speed, sampling speed and memory.


FULL = Suite(
    name="full",
    output=os.path.join("docs", "benchmarks.md"),
    workdir=os.path.join("runs", "bench"),
    matmul_sizes=(512, 1024, 2048),
    copy_mib=512,
    model_sizes={
        "demo": {"model.width": 192, "model.num_layers": 4, "model.num_heads": 4,
                 "model.mlp_dim": 768},
        "large": {"model.width": 384, "model.num_layers": 6, "model.num_heads": 6,
                  "model.mlp_dim": 1536},
    },
    train_batch=32,
    train_seq_len=128,
    min_timed_seconds=20.0,
    sample_size="demo",
    sample_lengths=(128, 256, 512),
    sample_nfe=(8, 16, 32),
    sample_batch=64,
    latency_repeats=3,
    quality_overrides={},  # experiments/demo.py as it is: 600 steps of 32 x 128 tokens.
    quality_samples=32,
    quality_eval_batches=0,
)

QUICK = Suite(
    name="quick",
    output=os.path.join("runs", "bench_quick", "benchmarks.md"),
    workdir=os.path.join("runs", "bench_quick"),
    matmul_sizes=(256, 512),
    copy_mib=64,
    model_sizes={
        "tiny": {"model.width": 64, "model.num_layers": 2, "model.num_heads": 2,
                 "model.mlp_dim": 256, "model.embed_dim": 32},
        "small": {"model.width": 96, "model.num_layers": 2, "model.num_heads": 3,
                  "model.mlp_dim": 384, "model.embed_dim": 32},
    },
    train_batch=8,
    train_seq_len=64,
    min_timed_seconds=1.5,
    sample_size="tiny",
    sample_lengths=(64,),
    sample_nfe=(8, 16),
    sample_batch=8,
    latency_repeats=2,
    quality_overrides={
        "model.width": 64, "model.num_layers": 2, "model.num_heads": 2, "model.mlp_dim": 256,
        "model.embed_dim": 32, "data.seq_len": 64, "tokenizer.vocab_size": 512,
        "train.steps": 40, "train.batch_size": 8, "train.warmup_steps": 5,
        "train.log_every": 20, "train.eval_every": 40, "train.eval_batches": 2,
        "train.sample_every": 40, "train.checkpoint_every": 40, "sample.steps": 8,
        "sample.num_samples": 2,
    },
    quality_samples=8,
    quality_eval_batches=4,
)

# The quality comparison samples diffusion with these (sampler, steps, grid) settings.
QUALITY_SAMPLERS = (("euler_maruyama", 128, "t"), ("dpm_solver_pp_2", 15, "log_snr"))
LATENCY_SAMPLER = "dpm_solver_pp_2"


# -- Configs and small helpers --------------------------------------------------------------------

def load_config(path: str, overrides: dict[str, Any] | None = None):
  """Call `get_config()` of an experiment file, then set each dotted override."""
  spec = importlib.util.spec_from_file_location("bench_experiment", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for dotted, value in (overrides or {}).items():
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def kind_config(kind: str, overrides: dict[str, Any]):
  return load_config(DIFFUSION_CONFIG if kind == "diffusion" else AR_CONFIG, overrides)


@dataclasses.dataclass(frozen=True)
class VocabularyOnly:
  """Stands in for the tokenizer where only the vocabulary size matters (speed, memory)."""

  vocab_size: int
  pad_id: int = 0
  unk_id: int = 1
  bos_id: int = 2
  eos_id: int = 3


_START = time.perf_counter()


def log(message: str, *args) -> None:
  """Print a progress line with the time since the suite started."""
  elapsed = time.perf_counter() - _START
  print(f"[{int(elapsed) // 60}:{int(elapsed) % 60:02d}] bench: {message % args}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def xla_cost(compiled) -> dict[str, float]:
  """XLA's cost analysis as one dict; older JAX versions return a list with one dict per module."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    merged: dict[str, float] = {}
    for part in cost:
      for key, value in part.items():
        merged[key] = merged.get(key, 0.0) + float(value)
    return merged
  return {key: float(value) for key, value in (cost or {}).items()}


def xla_memory(compiled) -> dict[str, int] | None:
  try:
    stats = compiled.memory_analysis()
  except NotImplementedError:
    return None
  if stats is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")
  out = {name: int(getattr(stats, name, 0)) for name in fields}
  # Donated state is both an argument and an output; the alias bytes are counted once.
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(4, vocab, (batch, length), dtype=np.int32)


# -- Machine --------------------------------------------------------------------------------------

def describe_machine() -> dict[str, Any]:
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  devices = jax.devices()
  return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram_bytes / 2**30,
          "jax": jax.__version__, "backend": jax.default_backend(),
          "device_kind": devices[0].device_kind, "device_count": len(devices),
          "date": datetime.date.today().isoformat()}


def bench_devices() -> list[jax.Device]:
  """List the first CPU device, and the default device too when it is an accelerator."""
  out = [jax.devices("cpu")[0]]
  if jax.default_backend() != "cpu":
    out.append(jax.devices()[0])
  return out


# -- 1. Ceilings ----------------------------------------------------------------------------------

def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())  # Compile and warm up.
  return min(timed(fn)[1] for _ in range(repeats))


def measure_ceilings(device: jax.Device, suite: Suite, repeats: int = 10) -> dict[str, Any]:
  """Best matmul rate per dtype and size, and copy bandwidth (bytes read + written per second)."""
  matmul = jax.jit(lambda a, b: a @ b)
  rates = []
  for dtype in (jnp.float32, jnp.bfloat16):
    for size in suite.matmul_sizes:
      a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), dtype), device)
      seconds = best_seconds(lambda: matmul(a, a), repeats)
      rates.append({"dtype": jnp.dtype(dtype).name, "size": size,
                    "flops_per_s": 2.0 * size**3 / seconds})
      log("ceilings: %s matmul %d^2: %.1f GFLOP/s", jnp.dtype(dtype).name, size,
          rates[-1]["flops_per_s"] / 1e9)

  # x + 1 reads and writes every element once; it cannot be folded away like x + 0 could.
  n = suite.copy_mib * 2**20 // 4
  x = jax.device_put(jnp.zeros((n,), jnp.float32), device)
  add_one = jax.jit(lambda v: v + 1.0)
  seconds = best_seconds(lambda: add_one(x), repeats)
  bandwidth = 2 * 4 * n / seconds
  log("ceilings: copy %d MiB: %.1f GB/s read + write", suite.copy_mib, bandwidth / 1e9)
  best = lambda name: max(r["flops_per_s"] for r in rates if r["dtype"] == name)
  return {"matmul": rates, "float32_peak": best("float32"), "bfloat16_peak": best("bfloat16"),
          "copy_bytes_per_s": bandwidth, "repeats": repeats}


# -- 2. Training speed ----------------------------------------------------------------------------

def speed_config(kind: str, suite: Suite, size: str):
  overrides = {**suite.model_sizes[size], "train.batch_size": suite.train_batch,
               "data.seq_len": suite.train_seq_len}
  return kind_config(kind, overrides)


def time_train_steps(compiled, state, batch, rng, min_seconds: float, min_steps: int = 3):
  """Run two warm-up steps, then steps for at least `min_seconds`; return (state, s per step)."""
  for _ in range(2):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  steps, start = 0, time.perf_counter()
  while steps < min_steps or time.perf_counter() - start < min_seconds:
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    steps += 1
  return state, (time.perf_counter() - start) / steps


def bench_train_step(kind: str, size: str, suite: Suite, device: jax.Device, peak: float,
                     profile: bool) -> dict[str, Any]:
  """Compile one training step, time it, and compare analytic FLOPs with XLA's count."""
  config = speed_config(kind, suite, size)
  experiment = Experiment(config, VocabularyOnly(config.tokenizer.vocab_size), devices=[device])
  state = experiment.init_state()
  batch = {"tokens": jax.device_put(
      random_tokens(suite.train_batch, suite.train_seq_len, config.tokenizer.vocab_size),
      experiment.batch_sharding)}
  rng = jax.random.key(0)
  start = time.perf_counter()
  compiled = experiment.make_train_step().lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  cost = xla_cost(compiled)

  state, step_s = time_train_steps(compiled, state, batch, rng, suite.min_timed_seconds)
  tokens = suite.train_batch * suite.train_seq_len
  train_flops = experiment.train_flops_per_token()
  forward_flops = experiment.flops_per_token()
  # XLA counts a lax.cond at its costlier branch, so self-conditioning (a conditional extra
  # forward pass) is compared at probability 1, not at its expected share.
  self_cond = config.loss.get("self_cond_prob", 0.0) if kind == "diffusion" else 0.0
  comparable = (3.0 + (1.0 if self_cond > 0 else 0.0)) * forward_flops * tokens
  result = {
      "kind": kind, "size": size, "platform": device.platform, "params": experiment.num_params(),
      "forward_flops_per_token": forward_flops, "train_flops_per_token": train_flops,
      "step_s": step_s, "compile_s": compile_s, "tokens_per_s": tokens / step_s,
      "mfu": train_flops * tokens / step_s / peak,
      "xla_flops": cost.get("flops"), "xla_bytes": cost.get("bytes accessed"),
      "analytic_over_xla": comparable / cost["flops"] if cost.get("flops") else None,
      "memory": xla_memory(compiled),
  }
  log("training: %s %s on %s: %.0f tokens/s, MFU %.1f%%, %.3f s/step, analytic/XLA FLOPs %s",
      kind, size, device.platform, result["tokens_per_s"], 100 * result["mfu"], step_s,
      f"{result['analytic_over_xla']:.3f}" if result["analytic_over_xla"] else "n/a")
  if profile:
    result["profile"] = profile_step(experiment, state, batch, rng, step_s, peak, suite)
  return result


def profile_step(experiment, state, batch, rng, step_s: float, peak: float,
                 suite: Suite) -> dict[str, float]:
  """Time the loss alone and the loss with its gradient, on the batch the step was timed on.

  Each call folds its index into the random key, as the training step folds in the step
  number, so the self-conditioning branch is taken on about the same share of calls.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  config, model, schedule = experiment.config, experiment.model, experiment.schedule
  tokens = batch["tokens"]
  mask = jnp.ones(tokens.shape, jnp.float32)

  def loss(params, key):
    value, _ = experiment.loss_fn(model, params, schedule, tokens, mask, key,
                                  self_cond_prob=config.loss.self_cond_prob, train=True)
    return value

  params = state["params"]
  with jax.set_mesh(experiment.mesh), nn.logical_axis_rules(experiment.rules):
    forward = jax.jit(loss).lower(params, rng).compile()
    backward = jax.jit(jax.value_and_grad(loss)).lower(params, rng).compile()
  calls = max(8, int(suite.min_timed_seconds / max(step_s, 1e-3)))
  forward_s = mean_seconds(lambda i: forward(params, jax.random.fold_in(rng, i)), calls)
  backward_s = mean_seconds(lambda i: backward(params, jax.random.fold_in(rng, i)), calls)
  forward_flops = experiment.flops_per_token() * tokens.size
  # Expected forward passes per loss evaluation: self-conditioning adds one on its share.
  passes = 1.0 + (config.loss.self_cond_prob if experiment.kind == "diffusion" else 0.0)
  out = {
      "forward_s": forward_s, "forward_backward_s": backward_s, "step_s": step_s,
      "forward_ideal_s": passes * forward_flops / peak,
      "forward_backward_ideal_s": experiment.train_flops_per_token() * tokens.size / peak,
      "hlo_dots": forward.as_text().count(" dot("),
  }
  log("profile: forward %.3f s, forward+backward %.3f s, whole step %.3f s (at the matmul "
      "ceiling: %.3f s and %.3f s)", forward_s, backward_s, step_s, out["forward_ideal_s"],
      out["forward_backward_ideal_s"])
  return out


def mean_seconds(call: Callable[[int], Any], calls: int) -> float:
  """Mean time of call(0), ..., call(calls - 1) after one warm-up call."""
  jax.block_until_ready(call(calls))
  start = time.perf_counter()
  for i in range(calls):
    jax.block_until_ready(call(i))
  return (time.perf_counter() - start) / calls


def measure_training(suite: Suite, device: jax.Device, peak: float) -> list[dict[str, Any]]:
  rows = []
  largest = list(suite.model_sizes)[-1]
  for size in suite.model_sizes:
    for kind in suite.kinds:
      rows.append(bench_train_step(kind, size, suite, device, peak,
                                   profile=size == largest))
  return rows


# -- 3. Sampling speed ----------------------------------------------------------------------------

def steps_for_nfe(sampler: str, nfe: int) -> int:
  """Largest step count whose NFE (every step plus the rounding pass) is at most `nfe`."""
  per_step = samplers.nfe(sampler, 1) - 1
  return max(1, (nfe - 1) // per_step)


def time_sampler(experiment, params, batch: int, repeats: int, **options) -> dict[str, float]:
  fn = experiment.make_sampler(num_samples=batch, **options)
  rng = jax.random.key(0)
  start = time.perf_counter()
  compiled = fn.lower(params, rng).compile()
  compile_s = time.perf_counter() - start
  if repeats > 1:
    seconds = best_seconds(lambda: compiled(params, rng), repeats)
  else:  # One timed call of an already compiled function; long calls need no warm-up.
    seconds = timed(lambda: compiled(params, rng))[1]
  return {"seconds": seconds, "compile_s": compile_s}


def measure_sampling(suite: Suite, device: jax.Device) -> list[dict[str, Any]]:
  rows = []
  for length in suite.sample_lengths:
    for kind in suite.kinds:
      overrides = {**suite.model_sizes[suite.sample_size], "data.seq_len": length}
      config = kind_config(kind, overrides)
      experiment = Experiment(config, VocabularyOnly(config.tokenizer.vocab_size),
                              devices=[device])
      params = experiment.init_state()["params"]
      settings = ([(LATENCY_SAMPLER, steps_for_nfe(LATENCY_SAMPLER, nfe))
                   for nfe in suite.sample_nfe] if kind == "diffusion"
                  else [(config.sample.sampler, config.sample.steps)])
      for sampler, steps in settings:
        row = {"kind": kind, "length": length, "platform": device.platform,
               "forward_flops_per_token": experiment.flops_per_token(),
               "sampler": sampler if kind == "diffusion" else "kv_cache",
               "nfe": samplers.nfe(sampler, steps) if kind == "diffusion" else length}
        for batch, repeats in ((1, suite.latency_repeats), (suite.sample_batch, 1)):
          timing = time_sampler(experiment, params, batch, repeats, sampler=sampler, steps=steps)
          row[f"batch{batch}_s"] = timing["seconds"]
          row[f"batch{batch}_tokens_per_s"] = batch * length / timing["seconds"]
        row["throughput_batch"] = suite.sample_batch
        rows.append(row)
        log("sampling: %s L=%d NFE %s on %s: batch 1 %.3f s, batch %d %.0f tokens/s", kind,
            length, row["nfe"], device.platform, row["batch1_s"], suite.sample_batch,
            row[f"batch{suite.sample_batch}_tokens_per_s"])
  return rows


# -- 4. Quality at equal compute ------------------------------------------------------------------

def to_flags(overrides: dict[str, Any]) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides.items()]


def train_run(config_file: str, workdir: str, overrides: dict[str, Any]) -> None:
  """Train (or resume, or find complete) a run through the command line, as a user would."""
  command = [sys.executable, "-m", "diffusion_text", "train", f"--config={config_file}",
             f"--workdir={workdir}", *to_flags(overrides)]
  log("quality: %s", shlex.join(command))
  subprocess.run(command, cwd=ROOT, check=True)


def sequence_bits(nll_fn, params, tokens_bt: np.ndarray) -> np.ndarray:
  """Bits per token of each row under the AR model."""
  mask = np.ones(tokens_bt.shape, np.float32)
  nats_b = np.asarray(jax.device_get(nll_fn(params, jnp.asarray(tokens_bt), jnp.asarray(mask))))
  return nats_b / tokens_bt.shape[1] / math.log(2)


def unigram_entropy(rows: np.ndarray) -> float:
  """Entropy in bits of the empirical distribution of all tokens in `rows`."""
  _, counts = np.unique(rows, return_counts=True)
  shares = counts / counts.sum()
  return float(-(shares * np.log2(shares)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def score_rows(name: str, rows: np.ndarray, nll_fn, params) -> dict[str, Any]:
  bits = sequence_bits(nll_fn, params, rows)
  return {"source": name, "rows": len(rows), "bits": float(bits.mean()),
          "stderr": float(bits.std(ddof=1) / math.sqrt(len(bits))) if len(bits) > 1 else 0.0,
          "entropy_bits": unigram_entropy(rows)}


def check_steps(workdir: str, planned: int) -> None:
  """Raise SystemExit unless the newest checkpoint in `workdir` is at step `planned`.

  The trainer continues a run to a larger `train.steps` but keeps one that went further, which
  would break the equal-compute comparison.
  """
  step, _ = ckpt_lib.require_checkpoint(workdir)
  if step != planned:
    raise SystemExit(f"{workdir} contains a run at step {step}, but the equal-compute budget needs "
                     f"{planned} steps; delete {workdir} (or pass another --workdir) and rerun.")


def measure_quality(suite: Suite) -> dict[str, Any]:
  """Train both kinds on the same FLOPs budget, then evaluate and score samples with the AR run."""
  from diffusion_text import inference  # pylint: disable=import-outside-toplevel

  diffusion_dir = os.path.join(suite.workdir, "diffusion")
  ar_dir = os.path.join(suite.workdir, "ar")
  diffusion_config = kind_config("diffusion", suite.quality_overrides)
  ar_config = kind_config("ar", suite.quality_overrides)
  stand_in = VocabularyOnly(diffusion_config.tokenizer.vocab_size)
  tokens_per_step = diffusion_config.train.batch_size * diffusion_config.data.seq_len
  diffusion_flops = Experiment(diffusion_config, stand_in).train_flops_per_token()
  ar_flops = Experiment(ar_config, stand_in).train_flops_per_token()
  budget = diffusion_config.train.steps * tokens_per_step * diffusion_flops
  ar_steps = max(1, round(budget / (ar_flops * tokens_per_step)))
  ar_overrides = {**suite.quality_overrides, "train.steps": ar_steps}
  log("quality: budget %.3g FLOPs: diffusion %d steps, AR %d steps", budget,
      diffusion_config.train.steps, ar_steps)

  train_run(DIFFUSION_CONFIG, diffusion_dir, suite.quality_overrides)
  check_steps(diffusion_dir, diffusion_config.train.steps)
  # The AR run reuses the diffusion run's tokenizer, so both score the same token ids.
  os.makedirs(ar_dir, exist_ok=True)
  tokenizer_path = os.path.join(ar_dir, "tokenizer.model")
  if not os.path.exists(tokenizer_path):
    with open(os.path.join(diffusion_dir, "tokenizer.model"), "rb") as f:
      data = f.read()
    with open(tokenizer_path, "wb") as f:
      f.write(data)
  train_run(AR_CONFIG, ar_dir, ar_overrides)
  check_steps(ar_dir, ar_steps)

  result = {"budget_flops": budget, "tokens_per_step": tokens_per_step,
            "diffusion_train_flops_per_token": diffusion_flops,
            "ar_train_flops_per_token": ar_flops, "evaluation": {}}
  for kind, workdir in (("diffusion", diffusion_dir), ("ar", ar_dir)):
    evaluation = inference.evaluate(workdir, split="validation",
                                    max_batches=suite.quality_eval_batches)
    result["evaluation"][kind] = {key: evaluation[key] for key in (
        "total_bits_per_token", "total_stderr", "sequences", "tokens", "step")}
    log("quality: %s validation %.4f +- %.4f bits/token", kind,
        evaluation["total_bits_per_token"], evaluation["total_stderr"])
  result["ar_steps"] = ar_steps
  result["diffusion_steps"] = diffusion_config.train.steps
  result["scores"] = score_samples(suite, diffusion_dir, ar_dir)
  return result


def validation_windows(experiment, count: int) -> np.ndarray:
  config = experiment.config
  batches = pipeline.make_eval_batches(sources.get_source(config.data, "validation"),
                                       experiment.tokenizer, seq_len=config.data.seq_len,
                                       batch_size=config.train.batch_size)
  windows = []
  for batch in batches:
    windows.extend(batch["tokens"][batch["mask"].all(axis=1)])
    if len(windows) >= count:
      break
  return np.stack(windows[:count])


def score_samples(suite: Suite, diffusion_dir: str, ar_dir: str) -> list[dict[str, Any]]:
  """Generative perplexity (under the AR model) and unigram entropy of each kind of text."""
  from diffusion_text import inference  # pylint: disable=import-outside-toplevel

  ar_experiment, ar_state, _ = inference.load_run(ar_dir)
  diffusion_experiment, diffusion_state, _ = inference.load_run(diffusion_dir)
  if (ar_experiment.tokenizer.serialized()
      != diffusion_experiment.tokenizer.serialized()):
    raise SystemExit(f"{ar_dir} and {diffusion_dir} use different tokenizers, so the AR model "
                     "cannot score the diffusion samples token for token; delete both and rerun.")
  nll_fn = ar_experiment.make_token_nll()
  params = ar_state["ema"]
  count = suite.quality_samples
  rows = [score_rows("validation text", validation_windows(ar_experiment, count), nll_fn, params)]
  for sampler, steps, grid in QUALITY_SAMPLERS:
    fn = inference.make_sampler(diffusion_experiment, sampler=sampler, steps=steps,
                                num_samples=count, grid=grid)
    tokens, seconds = timed(lambda: fn(diffusion_state["ema"], jax.random.key(1))[0])
    name = f"diffusion, {sampler}, {samplers.nfe(sampler, steps)} NFE"
    rows.append({**score_rows(name, np.asarray(tokens), nll_fn, params), "seconds": seconds})
  ar_config = ar_experiment.config
  fn = ar_experiment.make_sampler(sampler=ar_config.sample.sampler, steps=ar_config.sample.steps,
                                  num_samples=count)
  tokens, seconds = timed(lambda: fn(params, jax.random.key(1))[0])
  name = (f"AR, temperature {ar_config.sample.get('temperature', 1.0)}, "
          f"top_p {ar_config.sample.get('top_p', 1.0)}")
  rows.append({**score_rows(name, np.asarray(tokens), nll_fn, params), "seconds": seconds})
  for row in rows:
    log("quality: %s: %.3f +- %.3f bits/token under AR, entropy %.2f bits", row["source"],
        row["bits"], row["stderr"], row["entropy_bits"])
  return rows


# -- 5. Peak memory -------------------------------------------------------------------------------

def process_memory_bytes(field: str) -> int:
  """Read a field of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (peak resident).

  Used instead of `ru_maxrss`, which on Linux keeps the parent's peak across fork and exec, so
  a subprocess of a large benchmark process would report the parent's figure.
  """
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field} line")


def memory_child(spec: dict[str, Any]) -> None:
  """Subprocess body: build one config, compile its step, run it once, print memory as JSON."""
  if spec.get("baseline"):
    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones((8,))))
    print(json.dumps({"peak_rss_bytes": process_memory_bytes("VmHWM")}))
    return
  config = kind_config(spec["kind"], spec["overrides"])
  experiment = Experiment(config, VocabularyOnly(config.tokenizer.vocab_size))
  state = experiment.init_state()
  batch = {"tokens": jax.device_put(
      random_tokens(config.train.batch_size, config.data.seq_len, config.tokenizer.vocab_size),
      experiment.batch_sharding)}
  compiled = experiment.make_train_step().lower(state, batch, jax.random.key(0)).compile()
  before_step = process_memory_bytes("VmRSS")
  peak_before = process_memory_bytes("VmHWM")
  jax.block_until_ready(compiled(state, batch, jax.random.key(0)))
  print(json.dumps({"rss_before_step_bytes": before_step, "peak_before_step_bytes": peak_before,
                    "peak_rss_bytes": process_memory_bytes("VmHWM")}))


def run_memory_child(spec: dict[str, Any]) -> dict[str, int]:
  command = [sys.executable, os.path.abspath(__file__), f"--memory_child={json.dumps(spec)}"]
  done = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def measure_memory(suite: Suite, training_rows: list[dict[str, Any]]) -> dict[str, Any]:
  compiled_memory = {(r["kind"], r["size"]): r["memory"] for r in training_rows
                     if r["platform"] == jax.devices()[0].platform}
  rows = []
  for size in suite.model_sizes:
    for kind in suite.kinds:
      overrides = {**suite.model_sizes[size], "train.batch_size": suite.train_batch,
                   "data.seq_len": suite.train_seq_len}
      plan = plan_lib.make_plan(kind_config(kind, overrides), 1)
      child = run_memory_child({"kind": kind, "overrides": overrides})
      rows.append({"kind": kind, "size": size, "plan_state_bytes": plan.state_bytes,
                   "plan_activation_bytes": plan.activation_bytes,
                   "plan_total_bytes": plan.total_bytes,
                   "xla": compiled_memory.get((kind, size)), **child})
      log("memory: %s %s: plan %.1f MiB, process peak %.1f MiB", kind, size,
          plan.total_bytes / 2**20, child["peak_rss_bytes"] / 2**20)
  baseline = run_memory_child({"baseline": True})
  return {"rows": rows, "baseline_peak_rss_bytes": baseline["peak_rss_bytes"]}


# -- Main -----------------------------------------------------------------------------------------

def run_suite(suite: Suite, sections: tuple[str, ...], command: str) -> dict[str, Any]:
  start = time.perf_counter()
  results: dict[str, Any] = {"machine": describe_machine(), "command": command,
                             "suite": dataclasses.asdict(suite),
                             "latency_sampler": LATENCY_SAMPLER}
  devices = bench_devices()
  peaks = {}
  if {"ceilings", "training", "sampling"} & set(sections):
    results["ceilings"] = {}
    for device in devices:
      log("== ceilings on %s (%s)", device.platform, device.device_kind)
      results["ceilings"][device.platform] = measure_ceilings(device, suite)
      peaks[device.platform] = results["ceilings"][device.platform]
  if "training" in sections:
    results["training"] = {}
    for device in devices:
      log("== training speed on %s", device.platform)
      ceilings = peaks[device.platform]
      rows = measure_training(suite, device, ceilings["float32_peak"])
      for row in rows:
        row["copy_bytes_per_s"] = ceilings["copy_bytes_per_s"]
      results["training"][device.platform] = rows
  if "sampling" in sections:
    results["sampling"] = {}
    for device in devices:
      log("== sampling speed on %s", device.platform)
      results["sampling"][device.platform] = measure_sampling(suite, device)
  if "quality" in sections:
    log("== quality at equal compute")
    results["quality"] = measure_quality(suite)
  if "memory" in sections:
    log("== peak memory")
    training_rows = [r for rows in results.get("training", {}).values() for r in rows]
    results["memory"] = measure_memory(suite, training_rows)
  results["total_s"] = time.perf_counter() - start
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, short training, fewer lengths and NFE (under 5 min)")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {','.join(SECTIONS)}")
  parser.add_argument("--output", default=None,
                      help="markdown file to write; the PNGs go beside it (default: "
                           f"{FULL.output}, or {QUICK.output} with --quick)")
  parser.add_argument("--workdir", default=None,
                      help=f"folder for the trained runs and results.json (default: "
                           f"{FULL.workdir}, or {QUICK.workdir} with --quick)")
  parser.add_argument("--kinds", default=",".join(KINDS),
                      help="comma-separated model kinds for the speed and memory sections "
                           "(diffusion, ar); the quality section always trains both")
  parser.add_argument("--from_results", default=None,
                      help="results.json of an earlier run: rewrite the markdown and plots from "
                           "it without measuring anything")
  parser.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.memory_child:
    memory_child(json.loads(args.memory_child))
    return
  logging.getLogger("absl").setLevel(logging.WARNING)

  sections = tuple(s for s in args.sections.split(",") if s)
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    parser.error(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
  kinds = tuple(k for k in args.kinds.split(",") if k)
  if not kinds or set(kinds) - set(KINDS):
    parser.error(f"--kinds={args.kinds}: choose one or both of {','.join(KINDS)}")
  suite = QUICK if args.quick else FULL
  suite = dataclasses.replace(suite, output=args.output or suite.output,
                              workdir=args.workdir or suite.workdir, kinds=kinds)
  output = os.path.join(ROOT, suite.output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  os.makedirs(os.path.join(ROOT, suite.workdir), exist_ok=True)
  os.chdir(ROOT)  # Config files and run folders are named relative to the repository.
  command = shlex.join(["python", "scripts/bench.py", *sys.argv[1:]])

  if args.from_results:
    with open(args.from_results, encoding="utf-8") as f:
      results = json.load(f)
  else:
    results = run_suite(suite, sections, command)
  prefix = os.path.splitext(os.path.basename(output))[0]
  results["plots"] = bench_report.write_plots(results, os.path.dirname(output), prefix)
  bench_report.write_markdown(results, output)
  if not args.from_results:
    with open(os.path.join(suite.workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1, default=str)
  relative = lambda path: os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
  written = ", ".join(relative(path) for path in [output, *results["plots"].values()])
  if args.from_results:
    print(f"bench: wrote {written} from {args.from_results}")
  else:
    print(f"bench: wrote {written}; the suite took {results['total_s'] / 60:.1f} min")


if __name__ == "__main__":
  main()

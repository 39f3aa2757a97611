"""Progress lines, metrics.jsonl, TensorBoard events, sample files and PNG plots.

Only process 0 writes; on other processes every method returns without doing anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/events/` (TensorBoard)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "events"))

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(),
              **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def write_samples(self, step: int, texts: list[str], header: str = "") -> str | None:
    """Write samples to `<workdir>/samples/step_<step>.txt` and TensorBoard; return the path."""
    if not self.enabled:
      return None
    directory = os.path.join(self.workdir, "samples")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"step_{step}.txt")
    separator = "\n" + "=" * 72 + "\n"
    body = separator.join(texts)
    with open(path, "w", encoding="utf-8") as f:
      f.write((header + "\n" if header else "") + body + "\n")
    self._tb.add_text("samples", "\n\n---\n\n".join(f"    {t}" for t in texts), step)
    self._tb.flush()
    return path

  def plot(self) -> list[str]:
    """Draw the curves in metrics.jsonl into `<workdir>/plots/*.png`; return the paths."""
    if not self.enabled:
      return []
    return plot_metrics(self.workdir)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(workdir: str) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  records = read_metrics(workdir)
  groups = {
      "loss": ["train/loss", "eval/loss"],
      "loss_by_t": sorted({k for r in records for k in r if k.startswith("train/loss_by_t/")}),
      "throughput": ["perf/tokens_per_s"],
  }
  directory = os.path.join(workdir, "plots")
  os.makedirs(directory, exist_ok=True)
  paths = []
  for name, keys in groups.items():
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for key in keys:
      points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=key, marker="o" if len(points) < 30 else None)
        drawn = True
    if drawn:
      ax.set_xlabel("step")
      ax.set_title(name)
      ax.grid(alpha=0.3)
      ax.legend()
      path = os.path.join(directory, f"{name}.png")
      fig.savefig(path, dpi=100, bbox_inches="tight")
      paths.append(path)
    plt.close(fig)
  return paths


class Progress:
  """Tracks throughput and time left; formats one readable line per logging interval."""

  def __init__(self, total_steps: int, start_step: int, tokens_per_step: int,
               flops_per_step: float, peak_flops: float):
    self.total_steps = total_steps
    self.tokens_per_step = tokens_per_step
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.start_time = time.perf_counter()
    self._mark_time = self.start_time
    self._mark_step = start_step
    self.train_seconds = 0.0

  def restart_clock(self, step: int) -> None:
    """Exclude time spent outside training steps (compile, evaluation, sampling)."""
    self._mark_time = time.perf_counter()
    self._mark_step = step

  def measure(self, step: int) -> dict[str, float]:
    """Throughput since the clock was last restarted; empty when no step was timed since."""
    now = time.perf_counter()
    seconds = max(now - self._mark_time, 1e-9)
    steps = step - self._mark_step
    self.train_seconds += seconds
    self._mark_time, self._mark_step = now, step
    if steps == 0:  # Only the compiling step ran, and compile time is not counted.
      return {}
    step_time = seconds / steps
    return {
        "perf/step_time_s": step_time,
        "perf/tokens_per_s": self.tokens_per_step / step_time,
        "perf/model_flops_per_s": self.flops_per_step / step_time,
        "perf/mfu": self.flops_per_step / step_time / self.peak_flops if self.peak_flops else 0.0,
        "perf/eta_s": step_time * (self.total_steps - step),
    }

  def line(self, step: int, scalars: dict[str, float]) -> str:
    elapsed = time.perf_counter() - self.start_time
    text = f"step {step}/{self.total_steps}  loss {scalars['train/loss']:.4f}  "
    if "perf/tokens_per_s" in scalars:
      text += (f"{scalars['perf/tokens_per_s']:,.0f} tok/s  MFU {100 * scalars['perf/mfu']:.1f}%  "
               f"elapsed {format_duration(elapsed)}  left {format_duration(scalars['perf/eta_s'])}")
    else:
      text += f"elapsed {format_duration(elapsed)} (compiling; no throughput yet)"
    return text


def measure_matmul_flops(size: int = 512, repeats: int = 5) -> float:
  """Measure this device's float32 matrix-multiply rate in FLOP/s (the MFU denominator)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def to_host(tree) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(tree).items()}


# -- Health of a run: signs of the known failure modes of embedding diffusion. -----------------

# Thresholds for warnings. Distances are relative to sqrt(2 * embed_dim), the distance between
# two orthogonal rows of norm sqrt(embed_dim).
MIN_DISTANCE_WARNING = 0.05
MEAN_DISTANCE_WARNING = 0.5
EMPTY_SAMPLES_WARNING = 0.5
REPEATED_NGRAMS_WARNING = 0.5
NGRAM = 4


def embedding_health(table_vd: np.ndarray, max_rows: int = 1024) -> dict[str, float]:
  """Mean and minimum pairwise distance of embedding rows, relative to sqrt(2 * dim).

  Collapse (rows drifting together) makes tokens indistinguishable under noise. Large
  vocabularies are measured on an evenly spaced subset of at most `max_rows` rows.
  """
  table = np.asarray(table_vd, np.float64)
  rows = table[np.linspace(0, len(table) - 1, min(max_rows, len(table))).astype(int)]
  squared = np.sum(rows**2, axis=1)
  dist2 = squared[:, None] + squared[None, :] - 2.0 * rows @ rows.T
  dist = np.sqrt(np.maximum(dist2[np.triu_indices(len(rows), k=1)], 0.0))
  scale = np.sqrt(2.0 * table.shape[1])
  return {"health/embedding_mean_distance": float(dist.mean() / scale),
          "health/embedding_min_distance": float(dist.min() / scale)}


def sample_health(tokens_bl: np.ndarray, tokenizer) -> dict[str, float]:
  """Share of samples that are only padding/end-of-text, and the repeated 4-gram rate."""
  tokens_bl = np.asarray(tokens_bl)
  special = np.isin(tokens_bl, [tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id])
  empty = float(np.mean(np.all(special, axis=1)))
  repeats, total = 0, 0
  for row in tokens_bl:
    grams = [tuple(row[i:i + NGRAM]) for i in range(len(row) - NGRAM + 1)]
    repeats += len(grams) - len(set(grams))
    total += len(grams)
  return {"health/empty_samples": empty,
          "health/repeated_ngrams": repeats / total if total else 0.0}


def health_warnings(scalars: dict[str, float]) -> list[str]:
  """Messages for every health metric past its threshold."""
  checks = [
      ("health/embedding_min_distance", lambda v: v < MIN_DISTANCE_WARNING,
       "two embedding rows are within {v:.3f} x sqrt(2 dim) of each other: tokens may be "
       "collapsing together"),
      ("health/embedding_mean_distance", lambda v: v < MEAN_DISTANCE_WARNING,
       "embedding rows are on average only {v:.3f} x sqrt(2 dim) apart: the embedding may be "
       "collapsing"),
      ("health/empty_samples", lambda v: v > EMPTY_SAMPLES_WARNING,
       "{v:.0%} of samples decode to only padding or end-of-text"),
      ("health/repeated_ngrams", lambda v: v > REPEATED_NGRAMS_WARNING,
       "{v:.0%} of the 4-grams in samples repeat an earlier one: samples are degenerate"),
  ]
  return [message.format(v=scalars[key]) for key, bad, message in checks
          if key in scalars and bad(scalars[key])]

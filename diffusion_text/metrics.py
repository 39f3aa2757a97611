"""Progress lines, metrics.jsonl, TensorBoard events, sample files and PNG plots.

Only process 0 writes; on other processes every method returns without doing anything. The
workdir may be a local folder or a `gs://` URL, and every file goes through `etils.epath`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time

from etils import epath
import jax
import numpy as np

from diffusion_text import paths

METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "events"


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and `<workdir>/events/` (TensorBoard).

  A Cloud Storage object cannot be appended to, and tensorboardX would open a `gs://` URL with
  its own client instead of epath. So for a URL workdir the writer keeps metrics.jsonl in memory
  and uploads all of it at every write, and TensorBoard writes into a local temporary folder
  whose event files are uploaded to `<workdir>/events/` after every flush.
  """

  def __init__(self, workdir: str):
    self.workdir = epath.Path(workdir)
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._remote = paths.is_url(workdir)
    self._metrics_text = ""  # For a URL workdir: the whole of metrics.jsonl.
    self._staging: tempfile.TemporaryDirectory | None = None
    self._uploaded_sizes: dict[str, int] = {}
    if self.enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      if self._remote:
        metrics_path = self.workdir / METRICS_FILE
        if metrics_path.exists():  # A resumed run continues the file.
          self._metrics_text = metrics_path.read_text()
        self._staging = tempfile.TemporaryDirectory(prefix="diffusion_text_events_")
        events_dir = self._staging.name
      else:
        events_dir = os.fspath(self.workdir / EVENTS_DIR)
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(events_dir)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(),
              **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
    self._append_metrics(json.dumps(record) + "\n")
    for name, value in clean.items():
      if math.isfinite(value):
        self._tb.add_scalar(name, value, step)
    self._flush_events()

  def _append_metrics(self, line: str) -> None:
    path = self.workdir / METRICS_FILE
    if self._remote:
      self._metrics_text += line
      path.write_text(self._metrics_text)
    else:
      with path.open("a") as f:
        f.write(line)

  def _flush_events(self) -> None:
    self._tb.flush()
    self._upload_events()

  def _upload_events(self) -> None:
    """For a URL workdir, upload each local event file that grew since its last upload.

    tensorboardX writes events from a background thread and only appends to a file. So an
    upload may miss the newest events, but it never contains wrong bytes, and the next upload
    or `close` sends the rest. Each upload sends the whole file, which stays small for scalars
    and text.
    """
    if self._staging is None:
      return
    events = self.workdir / EVENTS_DIR
    for name in sorted(os.listdir(self._staging.name)):
      local = os.path.join(self._staging.name, name)
      if self._uploaded_sizes.get(name) == os.path.getsize(local):
        continue
      with open(local, "rb") as f:
        data = f.read()
      if not self._uploaded_sizes:
        events.mkdir(parents=True, exist_ok=True)
      (events / name).write_bytes(data)
      self._uploaded_sizes[name] = len(data)

  def write_samples(self, step: int, texts: list[str], header: str = "") -> str | None:
    """Write samples to `<workdir>/samples/step_<step>.txt` and TensorBoard; return the path."""
    if not self.enabled:
      return None
    directory = self.workdir / "samples"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step}.txt"
    separator = "\n" + "=" * 72 + "\n"
    body = separator.join(texts)
    path.write_text((header + "\n" if header else "") + body + "\n")
    self._tb.add_text("samples", "\n\n---\n\n".join(f"    {t}" for t in texts), step)
    self._flush_events()
    return str(path)

  def plot(self) -> list[str]:
    """Draw the curves in metrics.jsonl into `<workdir>/plots/*.png`; return the paths."""
    if not self.enabled:
      return []
    return plot_metrics(str(self.workdir))

  def close(self) -> None:
    if self._tb is None:
      return
    self._tb.close()  # Writes every queued event.
    self._upload_events()
    if self._staging is not None:
      self._staging.cleanup()
      self._staging = None
    self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(workdir: str) -> list[str]:
  """Draw loss, loss-by-time and throughput curves into `<workdir>/plots/*.png`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  records = read_metrics(workdir)
  groups = {
      "loss": ["train/loss", "eval/loss"],
      "loss_by_t": sorted({k for r in records for k in r if k.startswith("train/loss_by_t/")}),
      "throughput": ["perf/tokens_per_s"],
  }
  directory = epath.Path(workdir) / "plots"
  directory.mkdir(parents=True, exist_ok=True)
  written = []
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
      # Rendered in memory, so the same write works for a local folder and a bucket.
      png = io.BytesIO()
      fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
      path = directory / f"{name}.png"
      path.write_bytes(png.getvalue())
      written.append(str(path))
    plt.close(fig)
  return written


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


def measure_matmul_flops(size: int = 512, repeats: int = 20) -> float:
  """Measure this device's float32 matrix-multiply rate in FLOP/s (the MFU denominator).

  It takes the best of `repeats` calls, because on a busy CPU single calls often run well below
  the steady rate.
  """
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

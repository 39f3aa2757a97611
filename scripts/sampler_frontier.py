"""Sample quality against network evaluations (NFE) for every sampler of a trained run.

    python scripts/sampler_frontier.py --workdir=runs/demo --judge=runs/ar

For each sampler and NFE budget the script draws `--num_samples` sequences with the EMA
weights and scores them with an independent judge: a trained autoregressive run
(`experiments/ar.py`) on the same corpus, which reads the decoded text with its own tokenizer.
It reports the judge's negative log-likelihood of the samples (generative perplexity, in bits
per judge token; lower is more like the training text) and the unigram entropy of the sampled
tokens (bits, which collapses when a sampler repeats a few tokens). Real validation text gives
the reference values. The table goes to docs/samplers.md and the plot to
docs/samplers_frontier.png.

A budget of B evaluations runs max(1, (B - 1) // k) steps, where k is the sampler's network
calls per step (2 for Heun), because the rounding pass at t_min costs one more call. The table
lists the NFE each run actually used.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusion_text import inference  # noqa: E402
from diffusion_text import registry  # noqa: E402
from diffusion_text import samplers  # noqa: E402
from diffusion_text.data import pipeline  # noqa: E402
from diffusion_text.data import sources  # noqa: E402
from diffusion_text.errors import ConfigError  # noqa: E402
from diffusion_text.experiment import KIND_NAMES  # noqa: E402

SAMPLERS = ("euler_maruyama", "ode_euler", "ode_heun", "ddpm", "dpm_solver_pp_1",
            "dpm_solver_pp_2", "dpm_solver_pp_3")
NFE_BUDGETS = (4, 8, 16, 32, 64, 128, 256)


def unigram_entropy(rows: np.ndarray) -> float:
  """Entropy in bits of the empirical distribution of all tokens in `rows`."""
  _, counts = np.unique(rows, return_counts=True)
  shares = counts / counts.sum()
  return float(-(shares * np.log2(shares)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def natural_grid(sampler: str) -> str:
  return "log_snr" if sampler.startswith("dpm_solver") else "t"


def validation_windows(experiment) -> np.ndarray:
  """Full windows of the validation split, the reference that samples are compared with."""
  config = experiment.config
  batches = pipeline.make_eval_batches(sources.get_source(config.data, "validation"),
                                       experiment.tokenizer,
                                       seq_len=config.data.seq_len,
                                       batch_size=config.train.batch_size, max_batches=4)
  return np.concatenate([b["tokens"][b["mask"].all(axis=1)] for b in batches])


def run_frontier(workdir: str, judge_workdir: str, sampler_names, budgets, num_samples: int,
                 seed: int):
  experiment, state, step = inference.load_run(workdir)
  if experiment.kind != "diffusion":
    raise ConfigError(f"--workdir={workdir} is a run of {KIND_NAMES[experiment.kind]}, but the "
                      "frontier compares diffusion samplers; pass a diffusion run.")
  try:
    judge = inference.TextJudge(judge_workdir)
  except ConfigError as exc:
    message = str(exc).replace(f"--workdir={judge_workdir}", judge_workdir)
    raise ConfigError(f"--judge: {message}") from exc
  data, judge_data = experiment.config.data, judge.experiment.config.data
  if (data.name, data.files) != (judge_data.name, judge_data.files):
    logging.warning("the judge was trained on other data (%s) than the run (%s), so its scores "
                    "measure closeness to that data", judge_data.files or judge_data.name,
                    data.files or data.name)
  windows = validation_windows(experiment)
  real = judge.score(experiment.decode(windows))
  reference = {"judge_bits": real["total_bits_per_token"], "judge_stderr": real["total_stderr"],
               "entropy_bits": unigram_entropy(windows), "windows": len(windows),
               "judge_step": judge.step}
  rows = []
  for name in sampler_names:
    per_step = registry.get("sampler", name).evals_per_step
    for budget in budgets:
      steps = max(1, (budget - 1) // per_step)
      sample_fn = inference.make_sampler(experiment, sampler=name, steps=steps,
                                         num_samples=num_samples, grid=natural_grid(name))
      rng = jax.random.key(seed)
      sample_fn = sample_fn.lower(state["ema"], rng).compile()
      start = time.perf_counter()
      tokens, _ = sample_fn(state["ema"], rng)
      tokens = np.asarray(jax.device_get(tokens))
      seconds = time.perf_counter() - start
      score = judge.score(experiment.decode(tokens))
      rows.append({"sampler": name, "budget": budget, "steps": steps,
                   "nfe": samplers.nfe(name, steps), "judge_bits": score["total_bits_per_token"],
                   "judge_stderr": score["total_stderr"],
                   "entropy_bits": unigram_entropy(tokens), "seconds": seconds})
      logging.info("%s", rows[-1])
  return rows, reference, step


def matching_nfe(rows, sampler: str, target: dict) -> int | None:
  """Smallest NFE at which `sampler`'s judge NLL is within one standard error of `target`'s."""
  for row in sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"]):
    if row["judge_bits"] <= target["judge_bits"] + target["judge_stderr"]:
      return row["nfe"]
  return None


def write_plot(rows, reference, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_nll, ax_entropy) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name in dict.fromkeys(r["sampler"] for r in rows):
    mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
    nfe = [r["nfe"] for r in mine]
    ax_nll.errorbar(nfe, [r["judge_bits"] for r in mine], [r["judge_stderr"] for r in mine],
                    marker="o", ms=3, capsize=2, label=name)
    ax_entropy.plot(nfe, [r["entropy_bits"] for r in mine], marker="o", ms=3, label=name)
  for ax, key, label in ((ax_nll, "judge_bits", "judge NLL (bits/token)"),
                         (ax_entropy, "entropy_bits", "unigram entropy (bits)")):
    ax.axhline(reference[key], color="black", ls="--", lw=1, label="validation text")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  ax_entropy.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_markdown(rows, reference, step, args, path: str, plot_path: str) -> None:
  budgets = sorted({r["budget"] for r in rows})
  names = list(dict.fromkeys(r["sampler"] for r in rows))
  cell = {(r["sampler"], r["budget"]): r for r in rows}
  lines = [
      "# Samplers: quality against network evaluations",
      "",
      f"Run `{args.workdir}` at step {step}, EMA weights, {args.num_samples} samples per cell, "
      f"seed {args.seed}. Written by `python {' '.join(sys.argv)}`.",
      "",
      "Each cell is `judge NLL +- standard error / unigram entropy`, both in bits. The judge is "
      f"the autoregressive run `{args.judge}` (step {reference['judge_step']}, EMA weights), "
      "which reads the decoded samples with its own tokenizer. Lower NLL means the samples look "
      "more like training text to it (generative perplexity is 2 to that power). The entropy of "
      "the sampled tokens shows whether a low NLL comes from repeating a few common tokens. DPM-Solver++ "
      "runs on a grid even in log-SNR, the others on a grid even in t. Column headers are NFE "
      "budgets; a run uses max(1, (budget - 1) // k) steps of k network calls (k = 2 for "
      "Heun), plus one rounding call.",
      "",
      f"Validation text ({reference['windows']} windows): judge NLL "
      f"{reference['judge_bits']:.3f} +- {reference['judge_stderr']:.3f} bits/token, unigram "
      f"entropy {reference['entropy_bits']:.3f} bits.",
      "",
      "| sampler | " + " | ".join(str(b) for b in budgets) + " |",
      "| --- |" + " --- |" * len(budgets),
  ]
  for name in names:
    cells = []
    for b in budgets:
      r = cell.get((name, b))
      cells.append("" if r is None else
                   f"{r['judge_bits']:.3f} +- {r['judge_stderr']:.3f} / {r['entropy_bits']:.2f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", f"![judge NLL and entropy against NFE]({os.path.basename(plot_path)})", ""]

  reference_rows = [r for r in rows if r["sampler"] == "euler_maruyama" and r["budget"] == 256]
  if reference_rows:
    target = reference_rows[0]
    lines.append(f"Euler-Maruyama at {target['nfe']} NFE scores {target['judge_bits']:.3f} +- "
                 f"{target['judge_stderr']:.3f} bits/token.")
    for name in ("dpm_solver_pp_1", "dpm_solver_pp_2", "dpm_solver_pp_3"):
      if name in names:
        nfe = matching_nfe(rows, name, target)
        reached = (f"reaches it (within one standard error) at {nfe} NFE" if nfe else
                   "does not reach it at any budget tried")
        lines.append(f"- {name} {reached}.")
    lines.append("")
  total = sum(r["seconds"] for r in rows)
  lines.append(f"Sampling took {total:.0f} s in all, on {jax.devices()[0].device_kind} "
               f"({jax.device_count()} device(s)), excluding compilation.")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="run directory of a trained model")
  parser.add_argument("--judge", required=True,
                      help="run directory of a trained autoregressive model on the same corpus")
  parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated names")
  parser.add_argument("--nfe", default=",".join(map(str, NFE_BUDGETS)),
                      help="comma-separated NFE budgets")
  parser.add_argument("--num_samples", type=int, default=4,
                      help="sequences per cell; the default keeps a 2-core CPU run near 10 min")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default="docs/samplers.md", help="markdown file to write")
  parser.add_argument("--plot", default="docs/samplers_frontier.png", help="PNG file to write")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

  try:
    rows, reference, step = run_frontier(args.workdir, args.judge, args.samplers.split(","),
                                         [int(b) for b in args.nfe.split(",")], args.num_samples,
                                         args.seed)
  except ConfigError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
  write_plot(rows, reference, args.plot)
  write_markdown(rows, reference, step, args, args.output, args.plot)
  print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
  main()

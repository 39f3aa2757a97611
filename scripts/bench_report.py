"""Markdown tables and PNG plots of a benchmark run of scripts/bench.py.

Every function reads the `results` dict that `bench.run_suite` returns (also saved as
`results.json`), so a report can be rewritten from saved figures without measuring again.
"""

from __future__ import annotations

import os
from typing import Any


def perplexity(bits: float) -> str:
  value = 2.0 ** min(bits, 1000.0)
  return f"{value:,.1f}" if value < 1e6 else f"{value:.3g}"


def mib(n: float | None) -> str:
  return "n/a" if n is None else f"{n / 2**20:,.1f}"


def machine_line(machine: dict[str, Any], command: str) -> str:
  return (f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.1f} GiB "
          f"RAM; JAX {machine['jax']}, {machine['device_count']} x {machine['device_kind']} "
          f"({machine['backend']} backend); {machine['date']}. Command: `{command}`.")


def ceilings_section(results, head: str) -> list[str]:
  lines = ["## 1. Ceilings", "", head, ""]
  for platform_name, ceilings in results["ceilings"].items():
    lines += [f"Platform `{platform_name}`. Each figure is the best of {ceilings['repeats']} "
              "timed calls after a warm-up call, with `block_until_ready`.", "",
              "| matmul | size | GFLOP/s |", "| --- | --- | --- |"]
    lines += [f"| {r['dtype']} | {r['size']}^2 | {r['flops_per_s'] / 1e9:,.1f} |"
              for r in ceilings["matmul"]]
    lines += ["", f"Copy bandwidth (jitted `x + 1` on {results['suite']['copy_mib']} MiB of "
              f"float32, bytes read + written): {ceilings['copy_bytes_per_s'] / 1e9:,.1f} GB/s.",
              "", f"The float32 ceiling used as the MFU denominator below is "
              f"{ceilings['float32_peak'] / 1e9:,.1f} GFLOP/s (the best float32 size); "
              f"bfloat16 reaches {ceilings['bfloat16_peak'] / ceilings['float32_peak']:.2f} x "
              "that rate.", ""]
  return lines


def training_section(results, head: str) -> list[str]:
  suite = results["suite"]
  lines = ["## 2. Training speed", "", head, "",
           f"Batch {suite['train_batch']} x {suite['train_seq_len']} tokens, float32, "
           "random tokens, one device. Each figure times whole training steps (loss, gradient, "
           f"AdamW, EMA) for at least {suite['min_timed_seconds']:g} s after two warm-up steps. "
           "MFU = analytic training FLOPs per token x tokens/s / the measured float32 matmul "
           "ceiling of section 1. The analytic count covers matrix products only; diffusion "
           "counts self-conditioning's extra forward pass at its probability (0.5). XLA's cost "
           "analysis counts every operation and a `lax.cond` at its costlier branch, so the "
           "analytic/XLA column compares against the analytic count with self-conditioning "
           "always on.", "",
           "Sizes (both kinds; `large` here is a CPU-sized model, not experiments/large.py): "
           + "; ".join(f"`{name}` = " + ", ".join(f"{key.split('.')[-1]} {value}"
                                                  for key, value in dims.items())
                       for name, dims in suite["model_sizes"].items()) + ".", ""]
  for platform_name, rows in results["training"].items():
    lines += [f"Platform `{platform_name}`.", "",
              "| size | model | parameters | train GFLOP/token | tokens/s | MFU | s/step | "
              "analytic/XLA FLOPs | compile s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
      ratio = "n/a" if r["analytic_over_xla"] is None else f"{r['analytic_over_xla']:.3f}"
      lines.append(f"| {r['size']} | {r['kind']} | {r['params']:,} | "
                   f"{r['train_flops_per_token'] / 1e9:.4f} | {r['tokens_per_s']:,.0f} | "
                   f"{100 * r['mfu']:.1f}% | {r['step_s']:.3f} | {ratio} | "
                   f"{r['compile_s']:.1f} |")
    lines.append("")
    by_size = {}
    for r in rows:
      by_size.setdefault(r["size"], {})[r["kind"]] = r
    for size, pair in by_size.items():
      if len(pair) == 2:
        lines.append(f"- {size}: AR trains {pair['ar']['tokens_per_s'] / pair['diffusion']['tokens_per_s']:.2f} "
                     "x as many tokens per second as diffusion.")
    lines.append("")
    lines += profile_lines(rows)
  lines += [f"![training speed]({os.path.basename(results['plots']['training'])})", ""]
  return lines


def profile_lines(rows) -> list[str]:
  """Write the MFU target statement for diffusion and a table of where each profiled step's
  time goes."""
  profiled = [r for r in rows if r.get("profile")]
  if not profiled:
    return []

  lines = []
  for r in profiled:
    if r["kind"] == "diffusion":
      target = "meets" if r["mfu"] >= 0.5 else "misses"
      lines += [f"Diffusion at size `{r['size']}` reaches {100 * r['mfu']:.1f}% MFU, so it "
                f"{target} the target of 50% of the measured matmul ceiling.", ""]

  lines += [
      f"Where one step's time goes at size `{profiled[0]['size']}`. The loss and the loss with "
      "its gradient are compiled on their own. Each is timed as the mean of several calls with "
      "different random keys, so self-conditioning runs on about its training share of calls. "
      "The second column of each model is the time its analytic FLOPs would take at the "
      "float32 matmul ceiling. The optimiser row is the difference between two separately "
      "compiled programs, so it carries their timing noise and any difference in how XLA fuses "
      "the whole step: treat it as an estimate.", "",
      "| part | " + " | ".join(f"{r['kind']} s | {r['kind']} at ceiling s" for r in profiled)
      + " |",
      "| --- |" + " --- | --- |" * len(profiled)]

  parts = (
      ("loss (forward; diffusion includes self-conditioning at its probability)",
       lambda p: p["forward_s"], lambda p: p["forward_ideal_s"]),
      ("gradient (forward + backward minus forward)",
       lambda p: p["forward_backward_s"] - p["forward_s"],
       lambda p: p["forward_backward_ideal_s"] - p["forward_ideal_s"]),
      ("clipping, AdamW, EMA, finiteness check (step minus forward + backward)",
       lambda p: p["step_s"] - p["forward_backward_s"], lambda p: 0.0),
      ("whole step", lambda p: p["step_s"], lambda p: p["forward_backward_ideal_s"]),
  )
  for name, measured, ideal in parts:
    cells = [f"{measured(r['profile']):.3f} | {ideal(r['profile']):.3f}" for r in profiled]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines.append("")

  for r in profiled:
    if not r.get("xla_bytes"):
      continue
    memory_s = r["xla_bytes"] / r["copy_bytes_per_s"]
    lines.append(
        f"- {r['kind']}: XLA's cost analysis counts {r['xla_bytes'] / 2**30:.2f} GiB of memory "
        f"accesses in the step, {memory_s:.3f} s at the copy bandwidth of section 1 "
        f"({memory_s / r['step_s']:.0%} of the step); the compiled loss contains "
        f"{r['profile']['hlo_dots']} dot operations.")
  lines += ["", "The memory count includes accesses that stay in cache, so it is an upper bound "
            "on the time spent waiting for memory. Time beyond the matmul-ceiling column goes "
            "to element-wise work (layer norms, GELU, softmax, the adaptive-norm modulation of "
            "diffusion), to the optimiser's passes over the parameters, and to matrix products "
            "too small to reach the ceiling.", ""]
  return lines


def sampling_section(results, head: str) -> list[str]:
  suite = results["suite"]
  size = suite["model_sizes"][suite["sample_size"]]
  dims = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in size.items())
  lines = ["## 3. Sampling speed", "", head, "",
           f"Model size `{suite['sample_size']}` ({dims}), random-initialised weights (speed does "
           "not depend on the weights), float32. Diffusion uses "
           f"`{results['latency_sampler']}`; NFE counts every network call including the final "
           "rounding pass (`samplers.nfe`). AR decodes "
           "one token per step of a `lax.scan` with a key/value cache, so its NFE equals the "
           f"length. Latency: best of {suite['latency_repeats']} calls at batch 1 after a warm-up "
           f"call. Throughput: one call at batch {suite['sample_batch']}. Compilation excluded.",
           ""]
  for platform_name, rows in results["sampling"].items():
    batch = suite["sample_batch"]
    lines += [f"Platform `{platform_name}`.", "",
              f"| L | model | NFE | batch 1 latency s | batch {batch} tokens/s | latency / AR |",
              "| --- | --- | --- | --- | --- | --- |"]
    ar_latency = {r["length"]: r["batch1_s"] for r in rows if r["kind"] == "ar"}
    for r in rows:
      ratio = r["batch1_s"] / ar_latency[r["length"]] if r["length"] in ar_latency else None
      lines.append(f"| {r['length']} | {r['kind']} | {r['nfe']} | {r['batch1_s']:.3f} | "
                   f"{r[f'batch{batch}_tokens_per_s']:,.0f} | "
                   f"{'n/a' if ratio is None else f'{ratio:.2f}'} |")
    peak = results.get("ceilings", {}).get(platform_name, {}).get("float32_peak")
    lines += [""] + target_lines(rows, batch, peak)
  lines += [f"![sampling speed]({os.path.basename(results['plots']['sampling'])})", ""]
  return lines


def target_lines(rows, batch: int, peak: float | None) -> list[str]:
  """Compare diffusion with AR latency at 16 NFE and 256 tokens (or the nearest measured cell)."""
  diffusion = [r for r in rows if r["kind"] == "diffusion"]
  ar = {r["length"]: r for r in rows if r["kind"] == "ar"}
  if not diffusion:
    return []
  cell = min(diffusion, key=lambda r: (abs(r["nfe"] - 16), abs(r["length"] - 256)))
  if cell["length"] not in ar:
    return []

  other = ar[cell["length"]]
  length = cell["length"]
  ratio = cell["batch1_s"] / other["batch1_s"]
  met = "meets" if ratio <= 0.5 else "misses"
  throughput = cell[f"batch{batch}_tokens_per_s"] / other[f"batch{batch}_tokens_per_s"]

  # FLOPs of one sequence: NFE passes over all L positions against L single-token AR steps.
  # Both per-token figures count attention over the whole length, as the KV cache computes it.
  diffusion_flops = cell["nfe"] * length * cell["forward_flops_per_token"]
  ar_flops = length * other["forward_flops_per_token"]
  work = diffusion_flops / ar_flops

  lines = [
      f"Target: diffusion at 16 NFE produces 256 tokens at batch 1 in at most half the AR "
      f"latency. Measured at {cell['nfe']} NFE and L = {length}: diffusion takes {ratio:.2f} x "
      f"the AR latency, so it {met} the target. At batch {batch} diffusion produces "
      f"{throughput:.2f} x AR's tokens per second.", "",
      f"Why: one sequence costs diffusion {cell['nfe']} network passes over all {length} "
      f"positions, {work:.1f} x the arithmetic of AR, which runs the network once per token. "
      f"To take half AR's time, diffusion must therefore run at {2 * work:.0f} x AR's FLOP rate."]

  if peak:
    diffusion_rate = diffusion_flops / cell["batch1_s"] / peak
    ar_rate = ar_flops / other["batch1_s"] / peak
    lines[-1] += (
        f" At batch 1 diffusion runs at {diffusion_rate:.1%} of the float32 matmul ceiling and AR "
        f"at {ar_rate:.1%} ({1e3 * other['batch1_s'] / length:.2f} ms per token), a ratio of "
        f"{diffusion_rate / ar_rate:.1f}. AR's single-token steps are matrix-vector products "
        "whose time goes to reading the weights and the cache, and to the fixed cost of each "
        "scan step; diffusion's passes are matrix products over the whole sequence. The "
        f"target needs that ratio to reach {2 * work:.0f}.")
  return lines + [""]


def quality_section(results, head: str) -> list[str]:
  q = results["quality"]
  ev = q["evaluation"]
  lines = ["## 4. Quality at equal compute", "", head, "",
           f"Budget: {q['diffusion_steps']} diffusion steps x {q['tokens_per_step']:,} tokens x "
           f"{q['diffusion_train_flops_per_token'] / 1e9:.4f} GFLOP/token = "
           f"{q['budget_flops'] / 1e12:.2f} TFLOP. AR at {q['ar_train_flops_per_token'] / 1e9:.4f} "
           f"GFLOP/token gets {q['ar_steps']} steps of the same batch. Runs: "
           f"`{results['suite']['workdir']}/diffusion` and `{results['suite']['workdir']}/ar`, "
           "trained with `python -m diffusion_text train` (the exact flags are in the log); the AR "
           "run uses the diffusion run's tokenizer. EMA weights.", "",
           "| model | validation bits/token | perplexity (2^bits) | sequences | tokens |",
           "| --- | --- | --- | --- | --- |"]
  for kind, label in (("ar", "AR, exact NLL"), ("diffusion", "diffusion, NLL bound (ELBO)")):
    e = ev[kind]
    lines.append(f"| {label} | {e['total_bits_per_token']:.3f} +- {e['total_stderr']:.3f} | "
                 f"{perplexity(e['total_bits_per_token'])} | {int(e['sequences']):,} | "
                 f"{int(e['tokens']):,} |")
  lines += ["", "+- is one standard error over sequences. The diffusion figure estimates the "
            "variational bound with one draw of t per sequence: the bound itself is at least the "
            "model's NLL, and the estimate carries the standard error shown.",
            "", "Samples scored by the AR model (generative perplexity; lower means the AR model "
            "finds the text more likely) and the unigram entropy of their tokens (it collapses "
            "when a sampler repeats a few tokens):", "",
            "| text | rows | AR bits/token | generative perplexity | unigram entropy bits |",
            "| --- | --- | --- | --- | --- |"]
  for r in q["scores"]:
    lines.append(f"| {r['source']} | {r['rows']} | {r['bits']:.3f} +- {r['stderr']:.3f} | "
                 f"{perplexity(r['bits'])} | {r['entropy_bits']:.2f} |")
  lines += ["", "AR samples scored by the AR model itself are favoured by construction: at "
            "temperature 1 their expected score is the model's own entropy rate.", ""]
  return lines


def memory_section(results, head: str) -> list[str]:
  m = results["memory"]
  suite = results["suite"]
  lines = ["## 5. Peak memory of a training step", "", head, "",
           f"One device, batch {suite['train_batch']} x {suite['train_seq_len']} tokens, float32. "
           "Planner: `plan.make_plan(config, 1)`, exact state (parameters, AdamW moments, EMA) "
           "plus its activation estimate, which follows the diffusion network and is rougher for "
           "AR. XLA: `compiled.memory_analysis()` of the training step, arguments + outputs - "
           "donated aliases + temporaries. Process: the peak resident memory (`VmHWM`) of a "
           "subprocess that only builds the state, compiles the step and runs it once, and its "
           "resident memory just before the step. (`ru_maxrss` would report the bench "
           "process' own peak, because Linux carries it over to a child through fork and exec.) A subprocess that only imports JAX and runs a trivial "
           f"jit peaks at {mib(m['baseline_peak_rss_bytes'])} MiB, the runtime's own share. "
           "All figures in MiB. The process figures are host memory; on an accelerator the "
           "planner and XLA figures are device memory.", "",
           "| size | model | plan state | plan activations | plan total | XLA temporaries | "
           "XLA total | process before step | process peak |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in m["rows"]:
    xla = r["xla"] or {}
    lines.append(f"| {r['size']} | {r['kind']} | {mib(r['plan_state_bytes'])} | "
                 f"{mib(r['plan_activation_bytes'])} | {mib(r['plan_total_bytes'])} | "
                 f"{mib(xla.get('temp_size_in_bytes'))} | {mib(xla.get('total_bytes'))} | "
                 f"{mib(r['rss_before_step_bytes'])} | {mib(r['peak_rss_bytes'])} |")
  lines.append("")
  return lines


def write_plots(results, directory: str, prefix: str) -> dict[str, str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  paths = {}
  if results.get("training"):
    fig, (ax_speed, ax_mfu) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {"diffusion": "tab:blue", "ar": "tab:orange"}
    for platform_name, rows in results["training"].items():
      labels = [f"{r['size']}\n{r['kind']}\n{platform_name}" for r in rows]
      bar_colours = [colours[r["kind"]] for r in rows]
      ax_speed.bar(labels, [r["tokens_per_s"] for r in rows], color=bar_colours)
      ax_mfu.bar(labels, [100 * r["mfu"] for r in rows], color=bar_colours)
    ax_speed.set_ylabel("training tokens/s")
    ax_mfu.set_ylabel("MFU (% of measured float32 matmul rate)")
    ax_mfu.axhline(50, color="black", ls="--", lw=1)
    for ax in (ax_speed, ax_mfu):
      ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths["training"] = os.path.join(directory, f"{prefix}_training.png")
    fig.savefig(paths["training"], dpi=110)
    plt.close(fig)
  if results.get("sampling"):
    fig, (ax_latency, ax_throughput) = plt.subplots(1, 2, figsize=(10, 3.8))
    batch = results["suite"]["sample_batch"]
    for platform_name, rows in results["sampling"].items():
      series = {}
      for r in rows:
        label = f"AR ({platform_name})" if r["kind"] == "ar" else f"diffusion {r['nfe']} NFE ({platform_name})"
        series.setdefault(label, []).append(r)
      for label, points in series.items():
        lengths = [r["length"] for r in points]
        ax_latency.plot(lengths, [r["batch1_s"] for r in points], marker="o", label=label)
        ax_throughput.plot(lengths, [r[f"batch{batch}_tokens_per_s"] for r in points],
                           marker="o", label=label)
    ax_latency.set_ylabel("latency at batch 1 (s)")
    ax_throughput.set_ylabel(f"tokens/s at batch {batch}")
    for ax in (ax_latency, ax_throughput):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("generated length L")
      ax.grid(alpha=0.3)
    ax_throughput.legend(fontsize=7)
    fig.tight_layout()
    paths["sampling"] = os.path.join(directory, f"{prefix}_sampling.png")
    fig.savefig(paths["sampling"], dpi=110)
    plt.close(fig)
  return paths


def write_markdown(results, path: str) -> None:
  machine = results["machine"]
  head = machine_line(machine, results["command"])
  lines = ["# Benchmarks", "",
           f"Written by `{results['command']}` ({results['suite']['name']} suite) in "
           f"{results['total_s'] / 60:.1f} min. {head}", "",
           "Ratios within one run are the figures to compare: every number here comes from the "
           "same process on the same machine, and absolute times are context only. The machine "
           "may have been shared with other work.", ""]
  if results["suite"]["name"] == "quick":
    lines += ["This is the quick suite: tiny models and a short training run check that every "
              "section runs. Its figures say nothing about the speed or quality of real models; "
              "`make bench` runs the full suite.", ""]
  builders = {"ceilings": ceilings_section, "training": training_section,
              "sampling": sampling_section, "quality": quality_section,
              "memory": memory_section}
  for name, build in builders.items():
    if results.get(name):
      lines += build(results, head)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")

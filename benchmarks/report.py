"""Render the benchmark page (Markdown) and its chart (PNG) from a results.json value.

`write(results, readme_path, chart_path)` is all `run.py` calls; the page links
the chart by its path relative to the page's folder.
"""

import io
import os

import files
import flops

LABELS = {
    "jax-lora": "jaxlora LoRA",
    "jax-full": "jaxlora full",
    "torch-lora": "PyTorch + peft LoRA",
    "torch-full": "PyTorch full",
}

# The PyTorch configuration each jaxlora configuration is compared with.
COUNTERPARTS = {"jax-lora": "torch-lora", "jax-full": "torch-full"}

COLORS = {"jax": "#1f77b4", "torch": "#ff7f0e"}


def write(results: dict, readme_path: str, chart_path: str) -> None:
  """Write the chart to `chart_path` and the page to `readme_path`, each atomically."""
  files.write_bytes(chart_path, chart_png(results))
  link = os.path.relpath(os.path.abspath(chart_path), os.path.dirname(os.path.abspath(readme_path)))
  files.write_text(readme_path, markdown(results, link))


def chart_png(results: dict) -> bytes:
  """Return a PNG with two bar charts: tokens/s (one dot per round) and peak resident memory."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  summary = results["summary"]["configs"]
  configs = results["configs"]
  labels = [LABELS[config].replace(" + ", "\n+ ") for config in configs]
  colors = [COLORS[summary[config]["stack"]] for config in configs]
  positions = range(len(configs))

  figure, (speed, memory) = pyplot.subplots(1, 2, figsize=(11, 4.2))
  speed.bar(positions, [summary[c]["tokens_per_s"] for c in configs], color=colors)
  for position, config in zip(positions, configs):
    rounds = summary[config]["tokens_per_s_rounds"]
    speed.plot([position] * len(rounds), rounds, "k.", markersize=5)
  speed.set_ylabel("training tokens/s (median; dots: rounds)")
  memory.bar(positions, [summary[c]["peak_mib"] for c in configs], color=colors)
  memory.set_ylabel("peak resident memory (MiB)")
  for axis in (speed, memory):
    axis.set_xticks(list(positions), labels, fontsize=8)
    axis.grid(axis="y", alpha=0.3)

  settings = results["settings"]
  figure.suptitle(
      f"{_model_name(settings['model'])}: {settings['batch']} x {settings['seq_len']} tokens"
      f" per step, float32, {settings['threads']} threads"
  )
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=110)
  pyplot.close(figure)
  return buffer.getvalue()


def markdown(results: dict, chart_link: str) -> str:
  """Return the benchmark page."""
  settings = results["settings"]
  summary = results["summary"]
  sections = [
      "# Benchmarks: jaxlora against PyTorch and peft\n",
  ]
  if results.get("note"):
    sections.append(f"> {results['note']}\n")
  source = " (GGUF, dequantized to float32)" if settings["model"].endswith(".gguf") else ""
  sections.append(
      f"Training speed and memory of {_model_name(settings['model'])}{source} with"
      " jaxlora and with PyTorch (transformers, peft), from one run of"
      f" `benchmarks/run.py` on {results['machine']['date']}. Every configuration"
      f" trains on the same token ids: {settings['batch']} rows of"
      f" {settings['seq_len']} tokens per step, float32 weights and products,"
      f" {settings['threads']} threads, AdamW with clipping at norm 1. LoRA is"
      f" rank {settings['rank']}, alpha {settings['alpha']:g} on"
      f" {', '.join(settings['targets'])} in both stacks."
      + _options_sentence(settings) + "\n"
  )
  sections.append(_results_section(results, chart_link))
  sections.append(_targets_section(summary))
  sections.append(_method_section(results))
  sections.append(_command_section(results))
  sections.append(_machine_section(results))
  return "\n".join(sections)


def _options_sentence(settings):
  options = settings.get("train_options") or {}
  if not options:
    return ""
  text = ", ".join(f"`{key}={value}`" for key, value in sorted(options.items()))
  return f" The jaxlora configurations ran with the TrainConfig settings {text}."


def _results_section(results, chart_link):
  settings = results["settings"]
  summary = results["summary"]
  configs = results["configs"]
  rows = [
      "| configuration | tokens/s | tokens/s per round | first step s | peak MiB |"
      " model GFLOP/s | fraction of matmul rate | jaxlora / PyTorch tokens/s |"
      " jaxlora / PyTorch peak |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for config in configs:
    entry = summary["configs"][config]
    speed_ratio = memory_ratio = ""
    counterpart = COUNTERPARTS.get(config)
    if counterpart in summary["configs"]:
      other = summary["configs"][counterpart]
      speed_ratio = f"{entry['tokens_per_s'] / other['tokens_per_s']:.2f}x"
      memory_ratio = f"{entry['peak_mib'] / other['peak_mib']:.2f}x"
    per_round = ", ".join(f"{value:.1f}" for value in entry["tokens_per_s_rounds"])
    rows.append(
        f"| {LABELS[config]} | {entry['tokens_per_s']:.1f} | {per_round} |"
        f" {entry['first_step_s']:.1f} | {entry['peak_mib']:.0f} |"
        f" {entry['achieved_gflop_per_s']:.1f} | {entry['flop_fraction']:.2f} |"
        f" {speed_ratio} | {memory_ratio} |"
    )

  matmul = summary["matmul_gflop_per_s"]
  rates = ", ".join(
      f"{stack} {matmul[stack]:.0f} GFLOP/s" for stack in ("jax", "torch") if stack in matmul
  )
  losses = ", ".join(
      f"{LABELS[config]} {summary['configs'][config]['first_loss']:.4f}" for config in configs
  )
  size = settings["matmul_size"]
  return "\n".join([
      "## Results\n",
      "\n".join(rows) + "\n",
      f"![tokens/s and peak memory per configuration]({chart_link})\n",
      f"Medians over {_count(settings['rounds'], 'interleaved round')}. A round's"
      f" tokens/s is B x T over the median step time of steps {settings['warmup'] + 1}"
      f" to {settings['warmup'] + settings['steps']}, which leaves out"
      f" {_count(settings['warmup'], 'leading step')} (compilation and warm-up).\n",
      f"Float32 matrix product `[{size}, {size}] @ [{size}, {size}]` in the same"
      f" run, median of every worker's measurement: {rates}. The fraction column"
      f" divides each configuration's model FLOP/s by the faster,"
      f" {matmul['machine']:.0f} GFLOP/s. Model FLOPs per token: {flops.FORMULA_TEXT}.\n",
      f"Loss of the first step, a check that every configuration starts from the"
      f" same weights and tokens: {losses}.\n",
  ])


def _targets_section(summary):
  rows = ["| target | measured | bound | met |", "| --- | ---: | --- | --- |"]
  for record in summary["targets"]:
    value = "not measured" if record["value"] is None else f"{record['value']:.3f}"
    met = {True: "yes", False: "no", None: "not measured"}[record["met"]]
    rows.append(f"| {record['target']} | {value} | {record['bound']} | {met} |")
  return "\n".join([
      "## Targets\n",
      "Ratios are jaxlora over PyTorch (or LoRA over full for the step time);"
      " first steps are in seconds.\n",
      "\n".join(rows) + "\n",
      "NOTES.md logs each speed change with its predicted and measured effect,"
      " and what limits the targets that are not met.\n",
  ])


def _method_section(results):
  threads = _thread_record(results)
  return "\n".join([
      "## How each number is measured\n",
      "- Each configuration of each round runs in a fresh worker process"
      " (`benchmarks/worker.py`), so compilation starts cold and the peak"
      " memory is the worker's own.",
      "- **tokens/s**: tokens processed per second of training step, padding"
      " included (there is none: every token is real and scored). A step"
      " ends when its loss is on the host: `fit`'s per-step metrics read for"
      " jaxlora, `loss.item()` for PyTorch.",
      "- **first step s**: from the start of the step setup (adding adapters,"
      " building the optimizer, compiling) to the end of the first step;"
      " model loading is not included.",
      "- **peak MiB**: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the worker"
      " at its end, model loading and the matrix-product timing included.",
      f"- **threads**: each worker is pinned to CPUs {threads['cpus']} with"
      " `os.sched_setaffinity` before jax or torch is imported; torch also gets"
      f" `torch.set_num_threads({threads['threads']})`, and"
      f" OMP_NUM_THREADS={threads['OMP_NUM_THREADS']}."
      f" XLA_FLAGS={threads['XLA_FLAGS'] or 'unset'}.",
      "- jaxlora runs `jaxlora.train.fit` (cosine learning rate decay, AdamW,"
      " clipping); PyTorch runs a plain loop with `torch.optim.AdamW`,"
      " `clip_grad_norm_` and the same decay, and peft's `get_peft_model`"
      f" for LoRA. transformers' attention implementation: {_attention(results)}.\n",
  ])


def _command_section(results):
  minutes = results["wall_s"] / 60
  return "\n".join([
      "## Command\n",
      "```",
      results["command"],
      "```\n",
      f"The whole run took {minutes:.1f} minutes.\n",
  ])


def _machine_section(results):
  described = results["machine"]
  versions = ", ".join(
      f"{name} {version}" for name, version in described["versions"].items() if version
  )
  features = ", ".join(described["vector_features"]) or "none listed"
  memory = described["memory_gib"]
  memory_text = f"{memory:.1f} GiB" if memory is not None else "unknown"
  return "\n".join([
      "## Machine\n",
      f"- CPU: {described['cpu_model']}, {described['logical_cpus']} logical CPUs"
      f" ({described['available_cpus']} available to the run); AVX-512 and AMX"
      f" features: {features}.",
      f"- Memory: {memory_text}.",
      f"- Software: Python {described['python']}, {versions}; {described['platform']}.",
      f"- Date: {described['date']}.\n",
  ])


def _count(number, noun):
  return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _thread_record(results):
  return results["runs"][0]["threads"]


def _attention(results):
  names = sorted({str(run.get("attention_implementation")) for run in results["runs"] if run["stack"] == "torch"})
  return ", ".join(names) if names else "not measured"


def _model_name(path):
  return os.path.basename(os.path.normpath(path))

"""The report of `jaxlora compare`: a verdict from the numbers, Markdown, JSON and PNG charts.

`write_report(summary, folder)` writes, each file atomically:

    loss_curves.png   training loss per step and held-out loss of the best
                      run of each method, on one plot
    costs.png         bars: peak memory, tokens/s and saved size
    before_after.png  bars: domain and general-text loss before and after
    report.json       `summary`, every number of the comparison
    report.md         the verdict, tables of the best runs and of every run,
                      the charts, failures and sample answers

`summary` is the dict that `jaxlora.train.compare.build_report` assembles.
Each record in `summary["runs"]` has `name`, `method` ("lora" or "full"),
`learning_rate`, `status` ("ok", "diverged" or "failed"), `error`,
`parameters` {trainable, total}, `memory` {peak_host_mib, host_source,
peak_device_mib}, `tokens_per_s`, `saved` {kind, path, bytes, files, dtype},
`domain` and `general` {loss_before, loss_after, perplexity_before,
perplexity_after}, `qa` (or None) {items, exact_match_before,
exact_match_after, token_f1_before, token_f1_after, answers_after} and
`history`, the per-step records of `train.fit`. `summary["best"]` maps each
method to the name of its best run, or None.

`verdict(summary)` derives every sentence from these numbers; nothing in it
is fixed in advance except the wording.
"""

import io
import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxlora.train.config import write_atomically

logger = logging.getLogger(__name__)

METHODS = ("lora", "full")
LABELS = {"lora": "LoRA", "full": "full fine-tuning"}
COLORS = {"lora": "tab:blue", "full": "tab:orange"}
# Final held-out losses closer than this, in nats per token, count as a tie.
TIE_NATS = 0.01
# Answers shown per method in report.md.
SAMPLE_ANSWERS = 5


# ------------------------------------------------------------------- verdict


def best_runs(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any] | None]:
  """Return `{method: its best run's record, or None}` from `summary["best"]`."""
  by_name = {run["name"]: run for run in summary["runs"]}
  return {method: by_name.get(summary["best"].get(method)) for method in METHODS}


def memory_mib(run: Mapping[str, Any]) -> tuple[float | None, str]:
  """Return `(peak memory in MiB, "device" or "host")`: the device's where it was measured."""
  memory = run.get("memory") or {}
  if memory.get("peak_device_mib") is not None:
    return memory["peak_device_mib"], "device"
  return memory.get("peak_host_mib"), "host"


def verdict(summary: Mapping[str, Any]) -> list[str]:
  """Return the verdict's sentences, each computed from the numbers in `summary`.

  The sentences name the method with the lower held-out domain loss and the
  margin, and what that cost in peak memory, speed, saved size and
  forgetting. They also give the Q/A scores, list the failed or diverged
  runs, and flag a best run that did not lower the loss or a best rate at
  the edge of its sweep.
  """
  best = best_runs(summary)
  sentences = _failure_sentences(summary["runs"])
  finished = [method for method in METHODS if best[method] is not None]
  if not finished:
    sentences.append("Neither method finished a run, so there is nothing to compare; the errors are listed below.")
    return sentences
  if len(finished) == 1:
    method = finished[0]
    other = LABELS[METHODS[1 - METHODS.index(method)]]
    domain = best[method]["domain"]
    sentences.append(
        f"Only {LABELS[method]} finished a run, so it is not compared with {other}:"
        f" its held-out loss went from {domain['loss_before']:.4f} to {domain['loss_after']:.4f}."
    )
  else:
    sentences.extend(_comparison_sentences(best["lora"], best["full"]))
  sentences.extend(_qa_sentence(best))
  for method in finished:
    sentences.extend(_own_sentences(summary, method, best[method]))
  return sentences


def _failure_sentences(runs):
  sentences = []
  for method in METHODS:
    tried = [run for run in runs if run["method"] == method]
    failed = [run for run in tried if run["status"] != "ok"]
    if failed:
      listed = ", ".join(f"{run['learning_rate']:g} {run['status']}" for run in failed)
      sentences.append(f"{_capital(LABELS[method])}: {len(failed)} of {len(tried)} runs did not finish ({listed}).")
  return sentences


def _comparison_sentences(lora, full):
  loss = {"lora": lora["domain"]["loss_after"], "full": full["domain"]["loss_after"]}
  runs = {"lora": lora, "full": full}
  winner = min(METHODS, key=lambda method: loss[method])
  other = "full" if winner == "lora" else "lora"
  gap = loss[other] - loss[winner]
  if gap < TIE_NATS:
    sentences = [
        f"LoRA and full fine-tuning reached about the same held-out domain loss:"
        f" {loss['lora']:.4f} and {loss['full']:.4f} nats per token (within {TIE_NATS} nats),"
        f" at learning rates {lora['learning_rate']:g} and {full['learning_rate']:g}."
    ]
    subject = "Full fine-tuning"
    winner, other = "full", "lora"
  else:
    sentences = [
        f"{_capital(LABELS[winner])} reached the lower held-out domain loss:"
        f" {loss[winner]:.4f} against {loss[other]:.4f} nats per token for {LABELS[other]}"
        f" ({gap:.4f} lower; perplexity {runs[winner]['domain']['perplexity_after']:.2f}"
        f" against {runs[other]['domain']['perplexity_after']:.2f}), at learning rate"
        f" {runs[winner]['learning_rate']:g} against {runs[other]['learning_rate']:g}."
    ]
    subject = "It"
  sentences.append(_cost_sentence(subject, runs[winner], runs[other], LABELS[other]))
  sentences.append(_forgetting_sentence(lora, full))
  return sentences


def _cost_sentence(subject, run, other_run, other_label):
  parts = []
  memory, where = memory_mib(run)
  other_memory, other_where = memory_mib(other_run)
  if memory is not None and other_memory is not None and where == other_where:
    parts.append(
        f"used {_times(memory, other_memory)} the peak {where} memory of {other_label}"
        f" ({memory:,.0f} against {other_memory:,.0f} MiB)"
    )
  if run.get("tokens_per_s") and other_run.get("tokens_per_s"):
    parts.append(
        f"trained at {_times(run['tokens_per_s'], other_run['tokens_per_s'])} its speed"
        f" ({run['tokens_per_s']:,.0f} against {other_run['tokens_per_s']:,.0f} tokens/s)"
    )
  if run.get("saved") and other_run.get("saved"):
    parts.append(
        f"saved {_times(run['saved']['bytes'], other_run['saved']['bytes'])} the bytes"
        f" ({format_bytes(run['saved']['bytes'])} against {format_bytes(other_run['saved']['bytes'])})"
    )
  if not parts:
    return f"{subject} has no cost measurements to compare."
  listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
  return f"{subject} {listed}."


def _forgetting_sentence(lora, full):
  change = {
      "lora": lora["general"]["loss_after"] - lora["general"]["loss_before"],
      "full": full["general"]["loss_after"] - full["general"]["loss_before"],
  }
  described = " and ".join(
      f"{_direction(change[method])} with {LABELS[method]}" for method in METHODS
  )
  sentence = f"On the general text, the loss {described}"
  if max(change.values()) <= 0:
    return f"{sentence}, so neither method lost fit to general text."
  if abs(change["lora"] - change["full"]) < TIE_NATS:
    return f"{sentence}, so both forgot about as much."
  less = min(METHODS, key=lambda method: change[method])
  return f"{sentence}, so {LABELS[less]} forgot less."


def _direction(change):
  if change >= 0:
    return f"rose by {change:.4f} nats"
  return f"fell by {-change:.4f} nats"


def _qa_sentence(best):
  scored = [method for method in METHODS if best[method] is not None and best[method].get("qa")]
  if not scored:
    return []
  first = best[scored[0]]["qa"]
  parts = [
      f"{best[method]['qa']['exact_match_after']:.0%} with {LABELS[method]}"
      f" (token F1 {best[method]['qa']['token_f1_after']:.2f})"
      for method in scored
  ]
  return [
      f"Exact match on {first['items']} held-out questions went from"
      f" {first['exact_match_before']:.0%} (token F1 {first['token_f1_before']:.2f}) before training"
      f" to {' and '.join(parts)}."
  ]


def _own_sentences(summary, method, run):
  sentences = []
  domain = run["domain"]
  if not domain["loss_after"] < domain["loss_before"]:
    sentences.append(
        f"The best {LABELS[method]} run did not lower the held-out loss"
        f" ({domain['loss_before']:.4f} to {domain['loss_after']:.4f}); try other"
        " learning rates or more steps."
    )
  rates = sorted({r["learning_rate"] for r in summary["runs"] if r["method"] == method})
  if len(rates) > 1 and run["learning_rate"] in (rates[0], rates[-1]):
    edge = "largest" if run["learning_rate"] == rates[-1] else "smallest"
    beyond = "larger" if edge == "largest" else "smaller"
    sentences.append(
        f"The best {LABELS[method]} learning rate, {run['learning_rate']:g}, is the {edge}"
        f" tried; a {beyond} one may do better."
    )
  return sentences


def _times(value, reference):
  if not reference:
    return "an unmeasurable multiple of"
  return f"{value / reference:.2f} times"


def _capital(text):
  return text[:1].upper() + text[1:]


def format_bytes(size: int) -> str:
  """Return a size in bytes as text, such as "3.2 MiB" or "812 KiB"."""
  if size >= 2**30:
    return f"{size / 2**30:.2f} GiB"
  if size >= 2**20:
    return f"{size / 2**20:.1f} MiB"
  if size >= 2**10:
    return f"{size / 2**10:.0f} KiB"
  return f"{size} B"


# -------------------------------------------------------------------- charts


def _new_figure(width, height):
  # The object-oriented API draws without pyplot, so no global backend is set.
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  return Figure(figsize=(width, height))


def _png_bytes(figure):
  buffer = io.BytesIO()
  figure.tight_layout()
  figure.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()


def plot_loss_curves(summary: Mapping[str, Any]) -> bytes | None:
  """Return the PNG of the best runs' training and held-out losses, or None without a finished run."""
  best = {method: run for method, run in best_runs(summary).items() if run is not None}
  if not best:
    return None
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel

  figure = _new_figure(8, 4.5)
  axes = figure.subplots()
  before = summary["baseline"]["domain"]["loss"]
  for method, run in best.items():
    history = run["history"]
    label = f"{LABELS[method]}, lr {run['learning_rate']:g}"
    axes.plot(
        [record["step"] for record in history], [record["loss"] for record in history],
        color=COLORS[method], alpha=0.8, label=f"{label}: training loss",
    )
    evals = [(0, before)] + [(record["step"], record["eval_loss"]) for record in history if "eval_loss" in record]
    axes.plot(
        [step for step, _ in evals], [loss for _, loss in evals], "o--",
        color=COLORS[method], label=f"{label}: held-out loss",
    )
  axes.set_title("Loss of the best learning rate of each method")
  axes.set_xlabel("optimizer step")
  axes.xaxis.set_major_locator(MaxNLocator(integer=True))
  axes.set_ylabel("cross entropy (nats per token)")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=8)
  return _png_bytes(figure)


def plot_costs(summary: Mapping[str, Any]) -> bytes | None:
  """Return the PNG of the peak memory, tokens/s and saved size bars, or None without a finished run."""
  best = {method: run for method, run in best_runs(summary).items() if run is not None}
  if not best:
    return None
  methods = list(best)
  labels = [LABELS[method] for method in methods]
  colors = [COLORS[method] for method in methods]
  memory = [memory_mib(best[method]) for method in methods]
  where = "device" if all(place == "device" for _, place in memory) else "host"
  panels = (
      (f"peak {where} memory (MiB)", [_memory_value(best[m], where) for m in methods], False),
      ("training speed (tokens/s)", [best[m].get("tokens_per_s") or 0.0 for m in methods], False),
      ("saved size (MiB, log scale)", [best[m]["saved"]["bytes"] / 2**20 for m in methods], True),
  )
  figure = _new_figure(11, 3.8)
  for axes, (title, values, log) in zip(figure.subplots(1, 3), panels):
    bars = axes.bar(labels, values, color=colors)
    axes.bar_label(bars, labels=[_short_number(value) for value in values], fontsize=8)
    if log:
      axes.set_yscale("log")
    axes.set_title(title, fontsize=10)
    axes.tick_params(axis="x", labelsize=8)
  return _png_bytes(figure)


def _memory_value(run, where):
  memory = run.get("memory") or {}
  value = memory.get("peak_device_mib" if where == "device" else "peak_host_mib")
  return 0.0 if value is None else value


def _short_number(value):
  if value >= 100:
    return f"{value:,.0f}"
  if value >= 1:
    return f"{value:.2f}"
  return f"{value:.3g}"


def plot_before_after(summary: Mapping[str, Any]) -> bytes | None:
  """Return the PNG of domain and general-text loss before and after, or None without a finished run."""
  best = {method: run for method, run in best_runs(summary).items() if run is not None}
  if not best:
    return None
  methods = list(best)
  figure = _new_figure(10, 3.8)
  width = 0.38
  for axes, key, title in zip(
      figure.subplots(1, 2), ("domain", "general"),
      ("held-out domain loss", "general-text loss (forgetting)"),
  ):
    positions = list(range(len(methods)))
    before = [best[m][key]["loss_before"] for m in methods]
    after = [best[m][key]["loss_after"] for m in methods]
    low = axes.bar([p - width / 2 for p in positions], before, width, color="tab:gray", label="before")
    high = axes.bar(
        [p + width / 2 for p in positions], after, width,
        color=[COLORS[m] for m in methods], label="after",
    )
    axes.bar_label(low, labels=[f"{value:.3f}" for value in before], fontsize=8)
    axes.bar_label(high, labels=[f"{value:.3f}" for value in after], fontsize=8)
    axes.set_xticks(positions, [LABELS[m] for m in methods], fontsize=8)
    axes.set_ylabel("cross entropy (nats per token)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
  return _png_bytes(figure)


CHARTS = {
    "loss_curves": plot_loss_curves,
    "costs": plot_costs,
    "before_after": plot_before_after,
}


# ------------------------------------------------------------------ markdown


def render_markdown(summary: Mapping[str, Any], charts: Sequence[str]) -> str:
  """Return report.md; `charts` names the PNG files written beside it, without ".png"."""
  best = best_runs(summary)
  lines = [f"# LoRA or full fine-tuning: {summary['model']}", ""]
  lines += [f"- {sentence}" for sentence in summary["verdict"]]
  lines += [""] + _setup_lines(summary)
  lines += ["", "## The best learning rate of each method", ""] + _best_table(summary, best)
  titles = {"loss_curves": "loss curves", "costs": "costs", "before_after": "loss before and after"}
  for chart in charts:
    lines += ["", f"![{titles[chart]}]({chart}.png)"]
  lines += ["", "## Every run", ""] + _runs_table(summary["runs"])
  failed = [run for run in summary["runs"] if run["status"] != "ok"]
  if failed:
    lines += ["", "## Runs that did not finish", ""]
    for run in failed:
      lines.append(f"- `{run['name']}` {run['status']}: {_one_line(run['error'])} (log: `{run['log_file']}`)")
  lines += _answer_lines(summary, best)
  lines += ["", "## How the numbers were measured", ""] + _method_lines(summary)
  return "\n".join(lines) + "\n"


def _setup_lines(summary):
  data, budget, lora = summary["data"], summary["budget"], summary["lora"]
  rates = summary["learning_rates"]
  eval_file = data["eval_file"] or "a held-out share of the training file"
  return [
      "## Setup",
      "",
      f"- Model: `{summary['model']}`.",
      f"- Domain data: `{data['train_file']}`, held-out loss on {data['eval_examples']} examples of `{eval_file}`.",
      f"- General text (forgetting): `{data['general_eval_file']}`, {data['general_tokens']:,} tokens.",
      f"- Token budget per run: {budget['steps']} steps x {_micro_batches(budget['grad_accum_steps'])}"
      f"{budget['batch_size']} rows x {budget['seq_len']} tokens = {budget['token_slots']:,} token slots.",
      f"- LoRA: rank {lora['rank']}, alpha {lora['alpha']:g}, targets {lora['targets']}.",
      f"- Learning rates: LoRA {', '.join(f'{r:g}' for r in rates['lora'])};"
      f" full fine-tuning {', '.join(f'{r:g}' for r in rates['full'])}.",
      f"- Wall time of the whole comparison: {summary.get('wall_seconds', 0.0):.0f} s.",
  ]


def _micro_batches(count):
  return "" if count == 1 else f"{count} micro-batches x "


def _best_table(summary, best):
  methods = [method for method in METHODS if best[method] is not None]
  if not methods:
    return ["No run finished."]
  rows = [
      ("learning rate", lambda r: f"{r['learning_rate']:g}"),
      ("trainable parameters", lambda r: f"{r['parameters']['trainable']:,}"),
      ("total parameters", lambda r: f"{r['parameters']['total']:,}"),
      ("peak host memory", lambda r: f"{r['memory']['peak_host_mib']:,.0f} MiB"),
      ("peak device memory", lambda r: _optional_mib(r["memory"]["peak_device_mib"])),
      ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
      ("saved", lambda r: f"{format_bytes(r['saved']['bytes'])} ({r['saved']['bytes']:,} bytes, {r['saved']['kind']}, {r['saved']['dtype']})"),
      ("domain loss", lambda r: _arrow(r["domain"], "loss", ".4f")),
      ("domain perplexity", lambda r: _arrow(r["domain"], "perplexity", ".2f")),
      ("general-text loss", lambda r: _arrow(r["general"], "loss", ".4f")),
      ("general-text perplexity", lambda r: _arrow(r["general"], "perplexity", ".2f")),
      ("exact match", lambda r: _qa(r, "exact_match", ".0%")),
      ("token F1", lambda r: _qa(r, "token_f1", ".2f")),
      ("training time", lambda r: f"{r['train_seconds']:.0f} s"),
  ]
  lines = ["| | " + " | ".join(LABELS[m] for m in methods) + " |", "| --- |" + " --- |" * len(methods)]
  for title, cell in rows:
    lines.append(f"| {title} | " + " | ".join(cell(best[m]) for m in methods) + " |")
  return lines


def _optional_mib(value):
  return "not measured (no device statistics)" if value is None else f"{value:,.0f} MiB"


def _arrow(values, key, spec):
  return f"{values[f'{key}_before']:{spec}} -> {values[f'{key}_after']:{spec}}"


def _qa(run, key, spec):
  qa = run.get("qa")
  if not qa:
    return "no Q/A items"
  return f"{qa[f'{key}_before']:{spec}} -> {qa[f'{key}_after']:{spec}}"


def _runs_table(runs):
  lines = [
      "| run | status | domain loss after | general loss after | exact match | peak host MiB | tokens/s | saved | seconds |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for run in runs:
    seconds = f"{run['worker_seconds']:.0f}"
    if run["status"] != "ok":
      lines.append(f"| `{run['name']}` | {run['status']} | | | | | | | {seconds} |")
      continue
    qa = run.get("qa")
    cells = [
        f"`{run['name']}`",
        "ok",
        f"{run['domain']['loss_after']:.4f}",
        f"{run['general']['loss_after']:.4f}",
        f"{qa['exact_match_after']:.0%}" if qa else "",
        f"{run['memory']['peak_host_mib']:,.0f}",
        f"{run['tokens_per_s']:,.0f}",
        format_bytes(run["saved"]["bytes"]),
        seconds,
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _answer_lines(summary, best):
  baseline_qa = summary["baseline"].get("qa")
  if not baseline_qa:
    note = summary["data"].get("qa_note")
    return ["", "## Held-out questions", "", f"No question/answer items were scored. {note or ''}".rstrip()]
  sample_count = min(SAMPLE_ANSWERS, baseline_qa["items"])
  lines = ["", f"## Held-out questions ({sample_count} of {baseline_qa['items']})", ""]
  for index, example in enumerate(baseline_qa["examples"][:sample_count]):
    lines += [
        f"**Q:** {_one_line(example['question'])}",
        "",
        f"- reference: {_one_line(example['reference'])}",
        f"- before training: {_one_line(example['answer'])}",
    ]
    for method in METHODS:
      run = best[method]
      if run is not None and run.get("qa"):
        lines.append(f"- {LABELS[method]}: {_one_line(run['qa']['answers_after'][index])}")
    lines.append("")
  return lines[:-1]


def _one_line(text):
  return " ".join(str(text).split()) or "(empty)"


def _method_lines(summary):
  sources = {
      run["memory"]["host_source"] for run in summary["runs"]
      if run["status"] == "ok" and run.get("memory")
  }
  host = {
      "VmHWM": "VmHWM, the high-water mark of the worker's resident memory in /proc/self/status",
      "ru_maxrss": "getrusage's ru_maxrss",
  }
  described = "; ".join(host.get(source, source) for source in sorted(sources)) or "not measured"
  return [
      "- Every run is a separate process started from the same config; only the"
      " training mode and the learning rate differ. Peak memory is read after"
      f" training, before the evaluation and saving that follow it: host memory from {described},"
      " device memory from the device's `peak_bytes_in_use` where the backend reports it.",
      "- Tokens/s counts real (non-padding) tokens per second of training step"
      " time, as `train.fit` records it; the table shows the median over the"
      " steps after the first, whose time includes compilation.",
      "- Saved size is the total size of the regular files in the folder each"
      " method writes: a peft adapter folder (adapter_config.json and"
      " adapter_model.safetensors) for LoRA, a Hugging Face model folder"
      " (config.json and safetensors weights, no tokenizer files) for full fine-tuning.",
      "- Losses are token-mean cross entropy in nats over the scored tokens;"
      " perplexity is its exponential. Forgetting is the change of the loss on"
      " the general text, which no run trains on.",
      "- Exact match compares the greedy answer with the reference after"
      " lower-casing and collapsing whitespace; token F1 is the overlap of"
      " their words, counted with multiplicity.",
      "- The best learning rate of a method is the finished run with the lowest"
      " held-out domain loss after training. Every number is in report.json.",
  ]


# ------------------------------------------------------------------- writing


def write_report(summary: Mapping[str, Any], folder: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Write the charts, report.json and report.md into `folder`, each atomically.

  `summary` must contain "verdict" (see `verdict`). report.md is written
  last and links only the charts that were drawn.

  Returns:
    `{"markdown": path, "json": path, chart name: path, ...}`.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  files = {}
  for name, draw in CHARTS.items():
    png = draw(summary)
    path = folder / f"{name}.png"
    if png is None:
      path.unlink(missing_ok=True)
      continue
    write_atomically(path, png)
    files[name] = path

  files["json"] = folder / "report.json"
  write_json(files["json"], summary)
  files["markdown"] = folder / "report.md"
  charts = [name for name in CHARTS if name in files]
  write_atomically(files["markdown"], render_markdown(summary, charts).encode("utf-8"))
  logger.info("Wrote the comparison report to %s.", files["markdown"])
  return files


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Write `value` as indented JSON, atomically; NaN and infinities become null."""
  text = json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n"
  write_atomically(path, text.encode("utf-8"))


def finite_or_none(value: Any) -> Any:
  """Return `value` with every NaN or infinite float inside it replaced by None."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Mapping):
    return {key: finite_or_none(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [finite_or_none(item) for item in value]
  return value

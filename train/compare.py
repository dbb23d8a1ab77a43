"""LoRA against full fine-tuning, measured on one model, one data set and one token budget.

    prepare the data once (the pydoc Q/A files, or a row split of the training file)
      -> baseline worker: held-out domain loss, general-text loss and Q/A
         answers of the untrained model
      -> one training worker per method ("lora", "full") and learning rate:
         fit, then the same evaluation, the saved files, the peak memory
      -> the best learning rate of each method, by held-out domain loss
      -> report.md, report.json and PNG charts (`jaxlora.train.report`)

Both methods train with the same model, data order, steps, batch shape and
evaluation; only `train.mode` and `train.learning_rate` differ between runs.

Every worker is a new process (`python -m jaxlora.train.compare --worker
SPEC.json`), so its peak memory and compiled programs are its own. The
parent process never initializes a device, so it holds no accelerator memory
while a worker runs. A worker writes `result.json` in its run folder. Status
"diverged" means a non-finite loss or gradient norm (`FloatingPointError`),
and "failed" means any other error or an exit without a result. Both appear
in the report with their message, never dropped.

Everything lands in `compare.output_dir`:

    report.md, report.json, loss_curves.png, costs.png, before_after.png
    data/                 the Q/A files, or the training file split by rows
    runs/baseline/        spec.json, result.json, worker.log
    runs/lora-lr0.001/    ... plus metrics.jsonl and adapter/ (peft adapter)
    runs/full-lr3e-05/    ... plus metrics.jsonl and model/ (Hugging Face folder)
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

import jaxlora
from jaxlora import models
from jaxlora.train import config as config_lib
from jaxlora.train import data as data_lib
from jaxlora.train import generate, loop, metrics, pydoc_qa, report, run, sources, step

logger = logging.getLogger(__name__)

METHODS = ("lora", "full")
METHOD_NAMES = {"lora": "LoRA", "full": "full fine-tuning"}
# Tokens generated per Q/A answer beyond the longest reference answer.
QA_EXTRA_TOKENS = 8
# Characters of a failed worker's log quoted in its error message.
LOG_TAIL_CHARS = 2000
RESULT_FILE = "result.json"
SPEC_FILE = "spec.json"
LOG_FILE = "worker.log"
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class CompareResult:
  """The outcome of `main`.

  Attributes:
    output_dir: the folder of the report and the runs.
    report: every number of the comparison, as written to report.json.
    files: `{"markdown": path, "json": path, "loss_curves": path, ...}`, the
      files written; charts with nothing to draw are left out.
    best: `{method: run record or None}`, the best learning rate's run of
      each method, None when none of its runs finished.
    verdict: the sentences of the verdict, computed from the numbers.
  """

  output_dir: pathlib.Path
  report: dict[str, Any]
  files: dict[str, pathlib.Path]
  best: dict[str, dict[str, Any] | None]
  verdict: list[str]


def main(config: config_lib.RunConfig) -> CompareResult:
  """Train both methods at every learning rate of `config.compare` and write the report.

  Args:
    config: the run's config. Its `train` section sets the steps, batch and
      optimizer of every run, except `mode` and `learning_rate`, which come
      from the compare section. Checkpoints and TensorBoard files are not
      written.

  Returns:
    A `CompareResult`.

  Raises:
    ValueError: if the config leaves no held-out data or repeats a learning
      rate, or if the baseline worker fails because the model or the data
      cannot be loaded. Nothing is trained then.
  """
  start = time.perf_counter()
  _check_config(config)
  output_dir = pathlib.Path(config.compare.output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)

  worker_config, qa_rows, qa_note = prepare_data(config, output_dir / "data")
  general_file = config.compare.general_eval_file or default_general_text()
  common = {
      "config": worker_config.to_dict(),
      "general_file": os.fspath(general_file),
      "qa_rows": qa_rows,
  }

  runs_dir = output_dir / "runs"
  plan = [(method, rate) for method in METHODS for rate in learning_rates(config, method)]
  logger.info(
      "Comparing LoRA and full fine-tuning: a baseline and %d training runs in %s.",
      len(plan), output_dir,
  )
  baseline = run_worker(runs_dir / "baseline", {"role": "baseline", **common})
  if baseline["status"] != "ok":
    raise ValueError(
        f"The baseline evaluation of the untrained model failed, so nothing was"
        f" trained: {baseline['error']} (log: {baseline['log_file']})."
    )

  runs = []
  for index, (method, rate) in enumerate(plan, start=1):
    name = run_name(method, rate)
    logger.info("Run %d of %d: %s at learning rate %g.", index, len(plan), METHOD_NAMES[method], rate)
    spec = {"role": "train", "method": method, "learning_rate": rate, **common}
    result = run_worker(runs_dir / name, spec)
    record = run_record(name, method, rate, result, baseline)
    _log_run(record)
    runs.append(record)

  best = pick_best(runs)
  summary = build_report(config, worker_config, general_file, qa_note, baseline, runs, best)
  summary["wall_seconds"] = time.perf_counter() - start
  summary["verdict"] = report.verdict(summary)
  files = report.write_report(summary, output_dir)
  for sentence in summary["verdict"]:
    logger.info("Verdict: %s", sentence)
  logger.info("Wrote %s in %.0f s.", files["markdown"], summary["wall_seconds"])

  best_runs = {method: _run_by_name(runs, name) for method, name in best.items()}
  return CompareResult(output_dir, summary, files, best_runs, summary["verdict"])


def default_general_text() -> pathlib.Path:
  """Return the path of the general English text shipped with jaxlora.train."""
  return pathlib.Path(__file__).parent / "resources" / "general_text.md"


def learning_rates(config: config_lib.RunConfig, method: str) -> list[float]:
  """Return the learning rates `config.compare` lists for `method`."""
  return list(getattr(config.compare, f"{method}_learning_rates"))


def run_name(method: str, rate: float) -> str:
  """Return the run's folder name, such as "lora-lr0.0003" or "full-lr3e-05"."""
  return f"{method}-lr{rate:g}"


def _check_config(config):
  for method in METHODS:
    names = [run_name(method, rate) for rate in learning_rates(config, method)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
      raise ValueError(
          f"compare.{method}_learning_rates lists the same rate twice"
          f" ({', '.join(repeated)}); give each rate once."
      )
  data = config.data
  if data.train_file != config_lib.PYDOC_QA and data.eval_file is None and not data.resolved_eval_fraction():
    raise ValueError(
        "The comparison needs held-out data for its domain loss, but"
        " data.eval_file is null and data.eval_fraction is 0. Set"
        " data.eval_file, or data.eval_fraction such as 0.1."
    )


# ---------------------------------------------------------------------- data


def prepare_data(config, data_dir):
  """Write the data files every worker reads, and pick the held-out Q/A rows.

  With "pydoc-qa", the Q/A files are written once here. A training file
  whose held-out share is split off (no `data.eval_file`) is split by rows
  into `data_dir/train.jsonl` and `data_dir/eval.jsonl` when it contains
  prompt/completion or chat rows, so that the held-out questions are known.
  A text source keeps the example-level split of `prepare_data`, and has no
  Q/A items.

  Returns:
    `(worker_config, qa_rows, qa_note)`: the config with the data files the
    workers read, up to `compare.qa_items` Q/A items `{"prompt", "question",
    "reference", "chat"}`, and a sentence on why there are none (or None).
  """
  data = config.data
  train_file, eval_file = data.train_file, data.eval_file
  if train_file == config_lib.PYDOC_QA:
    train_file, eval_file = pydoc_qa.write_pydoc_qa(data_dir, eval_fraction=data.resolved_eval_fraction())
  elif eval_file is None:
    train_file, eval_file = split_rows(data, data_dir)

  changes = {"train_file": os.fspath(train_file)}
  if eval_file is not None:
    changes.update(eval_file=os.fspath(eval_file), eval_fraction=None)
  worker_config = dataclasses.replace(config, data=dataclasses.replace(data, **changes))

  if config.compare.qa_items == 0:
    return worker_config, [], "compare.qa_items is 0."
  if eval_file is None:
    return worker_config, [], "The held-out examples are pieces of a text source, not question/answer pairs."
  rows, note = qa_items(eval_file, data, config.compare.qa_items)
  return worker_config, rows, note


def split_rows(data, data_dir):
  """Split a prompt/completion or chat source by rows; return `(train_path, eval_path)`.

  The held-out rows are `round(eval_fraction * n)` rows (at least one) chosen
  by a permutation from `data.seed`, each set in its original order. A text
  source is returned as `(train_file, None)`, unsplit.

  Raises:
    ValueError: if the source cannot be read, its format cannot be found,
      or the split leaves no training row.
  """
  dataset = sources.read_dataset(data.train_file)
  data_format, _ = sources.resolve_format(
      dataset.column_names, data_format=data.data_format, columns=data.columns or None,
      source=data.train_file,
  )
  if data_format == "text" or sources.is_text_file(data.train_file):
    return data.train_file, None

  count = len(dataset)
  fraction = data.resolved_eval_fraction()
  eval_count = max(1, round(fraction * count))
  if eval_count >= count:
    raise ValueError(
        f"data.eval_fraction={fraction} of {count} rows in {data.train_file}"
        " leaves no training row; lower it or set data.eval_file."
    )
  order = np.random.default_rng(data.seed).permutation(count)
  paths = {}
  for name, indices in (("train", order[eval_count:]), ("eval", order[:eval_count])):
    path = pathlib.Path(data_dir) / f"{name}.jsonl"
    rows = dataset.select(np.sort(indices).tolist())
    pydoc_qa.write_jsonl(path, (dict(row) for row in rows))
    paths[name] = path
  logger.info(
      "Split %s by rows: %d training and %d held-out rows in %s.",
      data.train_file, count - eval_count, eval_count, data_dir,
  )
  return paths["train"], paths["eval"]


def qa_items(eval_file, data, limit):
  """Return `(items, note)`: up to `limit` question/answer items of the held-out rows.

  A chat row gives its messages before the last assistant message as the
  prompt and that message as the reference answer. A prompt/completion row
  gives its prompt and completion. Rows without an assistant message after
  another message are skipped. `note` is the reason no item was found, or None.
  """
  dataset = sources.read_dataset(eval_file)
  data_format, role_columns = sources.resolve_format(
      dataset.column_names, data_format=data.data_format, columns=data.columns or None,
      source=os.fspath(eval_file),
  )
  if data_format == "text" or sources.is_text_file(eval_file):
    return [], "The held-out data is text, not question/answer pairs."

  items = []
  for row in dataset:
    if len(items) == limit:
      break
    if data_format == "prompt_completion":
      prompt, completion = row[role_columns["prompt"]], row[role_columns["completion"]]
      if isinstance(prompt, str) and isinstance(completion, str):
        items.append({"prompt": prompt, "question": prompt, "reference": completion, "chat": False})
      continue
    item = _chat_item(row[role_columns["messages"]])
    if item is not None:
      items.append(item)
  if not items:
    return [], f"No held-out row of {os.fspath(eval_file)} has a question followed by an answer."
  return items, None


def _chat_item(messages):
  if not isinstance(messages, list):
    return None
  messages = [
      {key: value for key, value in message.items() if value is not None}
      for message in messages if isinstance(message, Mapping)
  ]
  replies = [index for index, message in enumerate(messages) if message.get("role") == "assistant"]
  if not replies or replies[-1] == 0:
    return None
  prompt = messages[:replies[-1]]
  users = [message["content"] for message in prompt if message.get("role") == "user"]
  return {
      "prompt": prompt,
      "question": users[-1] if users else prompt[-1].get("content", ""),
      "reference": messages[replies[-1]].get("content", ""),
      "chat": True,
  }


# ------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
  """Return `text` lower-cased, with runs of whitespace made one space, stripped."""
  return " ".join(text.lower().split())


def answer_tokens(text: str) -> list[str]:
  """Return the words of `text` for token F1: lower case, split on whitespace, outer punctuation removed."""
  words = (word.strip(".,;:!?\"'()[]{}`") for word in normalize_answer(text).split(" "))
  return [word for word in words if word]


def token_f1(prediction: str, reference: str) -> float:
  """Return the F1 of the word overlap between `prediction` and `reference`, in [0, 1].

  Words are counted with multiplicity; two empty answers score 1.
  """
  predicted, expected = answer_tokens(prediction), answer_tokens(reference)
  if not predicted or not expected:
    return float(predicted == expected)
  remaining = list(expected)
  common = 0
  for word in predicted:
    if word in remaining:
      remaining.remove(word)
      common += 1
  if common == 0:
    return 0.0
  precision, recall = common / len(predicted), common / len(expected)
  return 2 * precision * recall / (precision + recall)


def score_answers(answers: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Return `{"exact_match", "token_f1"}`, each the mean over items, in [0, 1].

  Exact match compares `normalize_answer` of both texts.
  """
  if len(answers) != len(references):
    raise ValueError(f"{len(answers)} answers for {len(references)} references; pass one answer per reference.")
  if not references:
    raise ValueError("No references to score; pass at least one question/answer item.")
  exact = [normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, references)]
  f1 = [token_f1(a, r) for a, r in zip(answers, references)]
  return {"exact_match": sum(exact) / len(exact), "token_f1": sum(f1) / len(f1)}


# ------------------------------------------------------------- orchestration


def run_worker(run_dir: pathlib.Path, spec: Mapping[str, Any]) -> dict[str, Any]:
  """Run one worker process on `spec` and return its result.

  The worker's stdout and stderr go to `run_dir/worker.log`. A worker that
  exits without writing its result (killed, out of memory) yields status
  "failed" with its exit code and the end of its log.
  """
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  for stale in (RESULT_FILE, METRICS_FILE):
    (run_dir / stale).unlink(missing_ok=True)
  spec_path = run_dir / SPEC_FILE
  report.write_json(spec_path, {**spec, "run_dir": os.fspath(run_dir)})

  log_path = run_dir / LOG_FILE
  command = [sys.executable, "-m", "jaxlora.train.compare", "--worker", os.fspath(spec_path)]
  start = time.perf_counter()
  with open(log_path, "wb") as log:
    process = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
  seconds = time.perf_counter() - start

  result_path = run_dir / RESULT_FILE
  if result_path.is_file():
    with open(result_path, encoding="utf-8") as file:
      result = json.load(file)
  else:
    result = {
        "status": "failed",
        "error": (
            f"the worker exited with code {process.returncode} without a result;"
            f" the end of its log: {_log_tail(log_path)}"
        ),
    }
  result.update(exit_code=process.returncode, worker_seconds=seconds, log_file=os.fspath(log_path))
  return result


def _log_tail(path):
  text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
  return text[-LOG_TAIL_CHARS:].strip() or "(empty)"


def run_record(name, method, rate, result, baseline):
  """Return the report's record of one training run, with the baseline's values as "before"."""
  record = {
      "name": name,
      "method": method,
      "learning_rate": rate,
      "status": result["status"],
      "error": result.get("error"),
      "exit_code": result.get("exit_code"),
      "log_file": result.get("log_file"),
      "worker_seconds": result.get("worker_seconds"),
      "parameters": result.get("parameters"),
      "memory": result.get("memory"),
      "tokens_per_s": result.get("tokens_per_s"),
      "tokens_per_s_steps": result.get("tokens_per_s_steps"),
      "real_tokens": result.get("real_tokens"),
      "train_seconds": result.get("train_seconds"),
      "saved": result.get("saved"),
      "metrics_file": result.get("metrics_file"),
      "history": result.get("history") or [],
      "domain": _before_after(baseline["domain_loss"], result.get("domain_loss")),
      "general": _before_after(baseline["general_loss"], result.get("general_loss")),
      "qa": None,
  }
  answers = result.get("qa_answers")
  if baseline.get("qa_answers") and answers is not None:
    record["qa"] = _qa_record(baseline, answers)
  return record


def _before_after(before, after):
  return {
      "loss_before": before,
      "loss_after": after,
      "perplexity_before": perplexity(before),
      "perplexity_after": perplexity(after),
  }


def perplexity(loss: float | None) -> float | None:
  """Return exp(loss), the perplexity of a token-mean cross entropy in nats; None for None."""
  if loss is None:
    return None
  return math.exp(min(loss, 700.0))


def _qa_record(baseline, answers):
  references = [row["reference"] for row in baseline["qa_rows"]]
  before = score_answers(baseline["qa_answers"], references)
  after = score_answers(answers, references)
  return {
      "items": len(references),
      "max_new_tokens": baseline.get("qa_max_new_tokens"),
      "exact_match_before": before["exact_match"],
      "exact_match_after": after["exact_match"],
      "token_f1_before": before["token_f1"],
      "token_f1_after": after["token_f1"],
      "answers_after": list(answers),
  }


def _log_run(record):
  if record["status"] == "ok":
    logger.info(
        "%s finished in %.0f s: held-out loss %.4f -> %.4f, general-text loss %.4f -> %.4f.",
        record["name"], record["worker_seconds"], record["domain"]["loss_before"],
        record["domain"]["loss_after"], record["general"]["loss_before"], record["general"]["loss_after"],
    )
  else:
    logger.warning("%s %s: %s (log: %s)", record["name"], record["status"], record["error"], record["log_file"])


def pick_best(runs: Sequence[Mapping[str, Any]]) -> dict[str, str | None]:
  """Return `{method: name of its finished run with the lowest held-out domain loss, or None}`."""
  best = {}
  for method in METHODS:
    finished = [run for run in runs if run["method"] == method and run["status"] == "ok"]
    best[method] = min(finished, key=lambda run: run["domain"]["loss_after"])["name"] if finished else None
  return best


def _run_by_name(runs, name):
  return next((run for run in runs if run["name"] == name), None)


def build_report(config, worker_config, general_file, qa_note, baseline, runs, best):
  """Return the report dict written to report.json (see `jaxlora.train.report`)."""
  train, data = config.train, config.data
  qa_rows = baseline.get("qa_rows") or []
  baseline_qa = None
  if qa_rows:
    scores = score_answers(baseline["qa_answers"], [row["reference"] for row in qa_rows])
    baseline_qa = {
        "items": len(qa_rows),
        "max_new_tokens": baseline.get("qa_max_new_tokens"),
        **scores,
        "examples": [
            {"question": row["question"], "reference": row["reference"], "answer": answer}
            for row, answer in zip(qa_rows, baseline["qa_answers"])
        ],
    }
  return {
      "model": config.model.path,
      "data": {
          "train_file": worker_config.data.train_file,
          "eval_file": worker_config.data.eval_file,
          "eval_examples": baseline.get("eval_examples"),
          "general_eval_file": os.fspath(general_file),
          "general_tokens": baseline.get("general_tokens"),
          "qa_note": qa_note,
      },
      "budget": {
          "steps": train.steps,
          "grad_accum_steps": train.grad_accum_steps,
          "batch_size": data.batch_size,
          "seq_len": data.seq_len,
          "token_slots": train.steps * train.grad_accum_steps * data.batch_size * data.seq_len,
      },
      "lora": {"rank": config.lora.rank, "alpha": config.lora.alpha, "targets": config.lora.targets},
      "learning_rates": {method: learning_rates(config, method) for method in METHODS},
      "baseline": {
          "domain": {"loss": baseline["domain_loss"], "perplexity": perplexity(baseline["domain_loss"])},
          "general": {"loss": baseline["general_loss"], "perplexity": perplexity(baseline["general_loss"])},
          "qa": baseline_qa,
          "worker_seconds": baseline.get("worker_seconds"),
          "log_file": baseline.get("log_file"),
      },
      "runs": runs,
      "best": best,
  }


# ------------------------------------------------------------------- workers


def peak_host_memory_mib() -> tuple[float, str]:
  """Return `(peak resident memory of this process in MiB, its source)`.

  On Linux the source is "VmHWM" from /proc/self/status, the high-water mark
  of this process's own address space. getrusage's `ru_maxrss` is used
  elsewhere, and it also counts the pages this process shared with its
  parent when it was forked.
  """
  try:
    with open("/proc/self/status", encoding="ascii") as status:
      for line in status:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024, "VmHWM"
  except OSError:
    pass
  import resource  # pylint: disable=import-outside-toplevel

  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  # macOS reports bytes, Linux kibibytes.
  return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "ru_maxrss"


def peak_device_memory_mib() -> float | None:
  """Return the largest `peak_bytes_in_use` over the local devices in MiB, or None.

  None means the backend keeps no memory statistics, as XLA's CPU backend.
  """
  peaks = []
  for device in jax.local_devices():
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / 2**20 if peaks else None


def folder_bytes(folder: str | os.PathLike) -> tuple[int, int]:
  """Return `(total size in bytes, file count)` of the regular files under `folder`."""
  total = count = 0
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      if os.path.isfile(path) and not os.path.islink(path):
        total += os.path.getsize(path)
        count += 1
  return total, count


def median_tokens_per_s(history: Sequence[Mapping[str, Any]]) -> tuple[float | None, str]:
  """Return `(median tokens/s, which steps it covers)`.

  The first step's time includes compiling the step, so it is left out
  unless it is the only step.
  """
  if not history:
    return None, "none"
  later = [record["tokens_per_s"] for record in history[1:]]
  if later:
    return statistics.median(later), f"steps 2-{len(history)}"
  return history[0]["tokens_per_s"], "step 1, compilation included"


class CountingBatches:
  """Iterates over training batches and counts the real tokens of those taken.

  Attributes:
    real_tokens: the sum of `attention_mask` over the batches taken so far.
  """

  def __init__(self, batches: Iterable[Mapping[str, np.ndarray]]):
    self._batches = iter(batches)
    self.real_tokens = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._batches)
    self.real_tokens += int(np.sum(batch["attention_mask"]))
    return batch


def _method_config(config, method, rate):
  """Return `config` for one training run: its mode and rate, no checkpoints."""
  changes = {"mode": method, "learning_rate": rate}
  if method == "full":
    # frozen_dtype applies to the frozen base of LoRA; full mode has none.
    changes["frozen_dtype"] = None
  return dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))


class _Evaluation:
  """The model, data and evaluation shared by the baseline and the training workers."""

  def __init__(self, spec, config):
    self.config = config
    self.pretrained = run.load_model(config.model)
    tokenizer = self.pretrained.tokenizer
    self.train_examples, eval_examples = run.load_data(
        config, tokenizer, self.pretrained.config.max_position_embeddings
    )
    section = config.data
    self.eval_examples = eval_examples
    self.eval_batches = data_lib.eval_batches(eval_examples, batch_size=section.batch_size, pack=section.pack)
    general = data_lib.load_examples(spec["general_file"], tokenizer, seq_len=section.seq_len, data_format="text")
    self.general_tokens = general.scored_token_count()
    self.general_batches = data_lib.eval_batches(general, batch_size=section.batch_size)
    self.qa_rows = spec["qa_rows"]

  def domain_loss(self, model, params):
    logger.info("Measuring the held-out domain loss on %d batches.", len(self.eval_batches))
    return step.evaluate(step.make_eval_step(model), params, self.eval_batches)

  def general_loss(self, model, params):
    logger.info("Measuring the general-text loss on %d batches.", len(self.general_batches))
    return step.evaluate(step.make_eval_step(model), params, self.general_batches)

  def qa_max_new_tokens(self):
    tokenizer = self.pretrained.tokenizer
    longest = max(len(tokenizer(row["reference"], add_special_tokens=False)["input_ids"]) for row in self.qa_rows)
    return min(longest + QA_EXTRA_TOKENS, self.config.data.seq_len)

  def answer(self, model, params):
    """Return the greedy answers to the Q/A rows, chat rows and plain rows each in one call."""
    max_new_tokens = self.qa_max_new_tokens()
    logger.info("Answering %d held-out questions, at most %d tokens each.", len(self.qa_rows), max_new_tokens)
    answers = [None] * len(self.qa_rows)
    for chat in (True, False):
      indices = [i for i, row in enumerate(self.qa_rows) if row["chat"] == chat]
      if not indices:
        continue
      replies = generate.generate(
          model, params, self.pretrained.tokenizer, [self.qa_rows[i]["prompt"] for i in indices],
          max_new_tokens=max_new_tokens, chat=chat,
          generation_config=self.pretrained.generation_config,
      )
      for index, reply in zip(indices, replies):
        answers[index] = reply
    return answers


def _baseline_worker(spec):
  config = config_lib.config_from_dict(spec["config"])
  config = _method_config(config, "full", config.train.learning_rate)
  evaluation = _Evaluation(spec, config)
  model = run.build_model(config, evaluation.pretrained)
  # NOTE: the untrained tree is not placed on the config's mesh, so these
  # evaluations run on one device; a model that only fits sharded fails here.
  params = evaluation.pretrained.params

  result = {
      "status": "ok",
      "eval_examples": len(evaluation.eval_examples),
      "general_tokens": evaluation.general_tokens,
      "domain_loss": evaluation.domain_loss(model, params),
      "general_loss": evaluation.general_loss(model, params),
      "qa_rows": evaluation.qa_rows,
      "qa_answers": None,
      "qa_max_new_tokens": None,
  }
  if evaluation.qa_rows:
    result["qa_max_new_tokens"] = evaluation.qa_max_new_tokens()
    result["qa_answers"] = evaluation.answer(model, params)
  return result


def _train_worker(spec):
  method = spec["method"]
  config = _method_config(config_lib.config_from_dict(spec["config"]), method, spec["learning_rate"])
  run_dir = pathlib.Path(spec["run_dir"])
  evaluation = _Evaluation(spec, config)
  pretrained = evaluation.pretrained
  params, lora_config = run.build_params(config, pretrained)
  model = run.build_model(config, pretrained)
  mask = jaxlora.adapter_mask(params) if method == "lora" else jaxlora.full_mask(params)
  count = jaxlora.count_parameters(params, trainable_mask=mask)

  metrics_path = run_dir / METRICS_FILE
  train_config = config.train.to_train_config(
      metrics_path=metrics_path, checkpoint_dir=None, tensorboard_dir=None, progress=False,
  )
  batches = CountingBatches(data_lib.train_batches(
      evaluation.train_examples, batch_size=config.data.batch_size, seed=config.data.seed,
      pack=config.data.pack,
  ))
  result = {
      "status": "ok",
      "parameters": {"trainable": count.trainable, "total": count.total},
      "metrics_file": os.fspath(metrics_path),
  }
  try:
    fitted = loop.fit(
        model, params, batches, evaluation.eval_batches, train_config,
        lora_config=lora_config, model_info=run.model_info(pretrained),
    )
  except FloatingPointError as error:
    logger.error("Training diverged: %s", error)
    history = metrics.read_metrics(metrics_path) if metrics_path.exists() else []
    return {**result, "status": "diverged", "error": str(error), "history": history, "memory": _memory()}

  result["memory"] = _memory()
  history = fitted.history
  trained = fitted.params
  # Frees the optimizer state before the evaluation and saving that follow.
  del fitted
  tokens_per_s, steps = median_tokens_per_s(history)
  result.update(
      history=history,
      real_tokens=batches.real_tokens,
      tokens_per_s=tokens_per_s,
      tokens_per_s_steps=steps,
      train_seconds=history[-1]["elapsed_s"],
      domain_loss=history[-1]["eval_loss"],
      general_loss=evaluation.general_loss(model, trained),
      qa_answers=evaluation.answer(model, trained) if evaluation.qa_rows else None,
  )
  non_finite = [name for name in ("domain_loss", "general_loss") if not math.isfinite(result[name])]
  if non_finite:
    result.update(status="diverged", error=f"{' and '.join(non_finite)} after training are not finite.")

  if method == "lora":
    folder = run_dir / "adapter"
    models.save_peft_adapter(
        folder, pretrained.config, trained, lora_config,
        base_model_name_or_path=str(pretrained.path), overwrite=True,
    )
    kind, dtype = "peft adapter folder", "float32"
  else:
    folder = run_dir / "model"
    dtype = config.output.export_dtype or pretrained.source_dtype
    models.save_pretrained(folder, pretrained.config, trained, dtype=dtype, overwrite=True)
    kind = "Hugging Face model folder without tokenizer files"
  size, files = folder_bytes(folder)
  result["saved"] = {"kind": kind, "path": os.fspath(folder), "bytes": size, "files": files, "dtype": dtype}
  result["memory"]["worker_peak_host_mib"] = peak_host_memory_mib()[0]
  return result


def _memory():
  host, source = peak_host_memory_mib()
  return {"peak_host_mib": host, "host_source": source, "peak_device_mib": peak_device_memory_mib()}


def worker_main(argv: Sequence[str] | None = None) -> int:
  """Run one worker from its spec file, write its result.json, and return the exit status.

  The status is 0 when the result was written with status "ok" or
  "diverged", and 1 when the worker failed (the error is in the result).
  """
  parser = argparse.ArgumentParser(description="One worker of `jaxlora compare`.")
  parser.add_argument("--worker", required=True, metavar="SPEC.json", help="the worker's spec file.")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

  with open(args.worker, encoding="utf-8") as file:
    spec = json.load(file)
  result_path = pathlib.Path(spec["run_dir"]) / RESULT_FILE
  start = time.perf_counter()
  try:
    result = _baseline_worker(spec) if spec["role"] == "baseline" else _train_worker(spec)
    code = 0
  except Exception as error:  # pylint: disable=broad-except
    # The parent reports every failure with its message instead of dropping the run.
    logger.exception("The worker failed.")
    result = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    code = 1
  result["seconds"] = time.perf_counter() - start
  report.write_json(result_path, result)
  return code


if __name__ == "__main__":
  sys.exit(worker_main())

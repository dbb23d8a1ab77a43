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

This module contains the parent side: the config checks, the data preparation,
the Q/A scoring, the sweep, the choice of the best runs and the report dict.
Every worker is a new process (`python -m jaxlora.train.compare_worker
SPEC.json`, code in `jaxlora.train.compare_worker`), so its peak memory and
compiled programs are its own. The parent process never initializes a
device, so it holds no accelerator memory while a worker runs. A worker
writes `result.json` in its run folder. Status
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

import dataclasses
import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxlora.train import config as config_lib
from jaxlora.train import pydoc_qa, report, sources

logger = logging.getLogger(__name__)

METHODS = ("lora", "full")
METHOD_NAMES = {"lora": "LoRA", "full": "full fine-tuning"}
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
  command = [sys.executable, "-m", "jaxlora.train.compare_worker", os.fspath(spec_path)]
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

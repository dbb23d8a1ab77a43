"""The worker process of `jaxlora compare`: one evaluation or one training run.

`jaxlora.train.compare` starts each worker as `python -m
jaxlora.train.compare_worker SPEC.json`, with the spec it wrote in the run
folder. The spec's "role" picks the work:

    "baseline"  load the untrained model and data, measure the held-out
                domain loss and the general-text loss, answer the Q/A rows
    "train"     fit with the spec's method ("lora" or "full") and learning
                rate, measure the same, save the adapter or the model, and
                record the peak host and device memory

The worker writes `result.json` in the run folder. When the work raises, the
result has status "failed" with the error, and the exit status is 1. Only
the worker initializes a device, because the parent process must hold no
accelerator memory while a worker runs.
"""

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import statistics
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
from jaxlora.train import generate, loop, metrics, report, run, step
from jaxlora.train.compare import METRICS_FILE, RESULT_FILE

logger = logging.getLogger(__name__)

# Tokens generated per Q/A answer beyond the longest reference answer.
QA_EXTRA_TOKENS = 8


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
  # evaluations run on one device. A model that only fits sharded fails here.
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
  parser.add_argument("spec", metavar="SPEC.json", help="path of the JSON spec that `jaxlora.train.compare.run_worker` wrote.")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)

  with open(args.spec, encoding="utf-8") as file:
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

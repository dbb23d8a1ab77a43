"""Benchmark jaxlora against PyTorch and peft: LoRA and full fine-tuning, side by side.

    python benchmarks/run.py [--steps 10 --warmup 2 --batch 4 --seq-len 256
                              --threads N --rounds 2 --out benchmarks/results]

On SmolLM2-135M-Instruct (the cached GGUF file, dequantized to float32) by
default, every configuration trains on the same token ids, batch size,
sequence length, dtype and thread count:

    jax-lora    jaxlora `train.fit`, LoRA on `--targets` with `--rank`, `--alpha`
    jax-full    jaxlora `train.fit`, every weight trains
    torch-lora  transformers + peft, the same adapters
    torch-full  transformers, every weight trains

All use AdamW (no weight decay), gradient clipping at norm 1 and a cosine
learning rate decay. Each configuration runs in its own worker process
(`worker.py`), in interleaved rounds (A, B, C, D, A, B, C, D, ...) so that
drift on a shared machine hits every configuration alike. Each worker also
times its stack's float32 matrix product, the machine's reference rate.

The script writes `--out`/results.json (settings, every worker's
measurements, the summary), `--out`/chart.png, and `--readme` (by default
benchmarks/README.md) from them. `--report-only` renders the README and
chart again from an existing results.json.
"""

import argparse
import dataclasses
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time

import files
import flops
import machine
import report
import worker

logger = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results")
DEFAULT_README = os.path.join(HERE, "README.md")
DEFAULT_CONFIGS = ("jax-lora", "jax-full", "torch-lora", "torch-full")

# A random Llama model for smoke runs (`--tiny`), with every size different.
TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

# Targets, each as (description, ratio or value name, comparison, bound).
TARGETS = (
    ("jaxlora LoRA tokens/s at least 1.0x peft's", "lora_speed_vs_peft", ">=", 1.0),
    ("jaxlora LoRA peak memory no higher than peft's", "lora_memory_vs_peft", "<=", 1.0),
    ("jaxlora LoRA tokens/s at least 1.5x peft's", "lora_speed_vs_peft", ">=", 1.5),
    ("jaxlora full tokens/s at least 1.0x PyTorch's", "full_speed_vs_torch", ">=", 1.0),
    ("jaxlora LoRA step at most 0.75x its full step", "lora_step_vs_full_step", "<=", 0.75),
    ("jaxlora LoRA first step under 30 s", "jax_lora_first_step_s", "<", 30.0),
    ("jaxlora full first step under 30 s", "jax_full_first_step_s", "<", 30.0),
)


def build_parser() -> argparse.ArgumentParser:
  """Return the command-line parser; `build_settings` checks the values it parses."""
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )

  shape = parser.add_argument_group("steps and shapes")
  shape.add_argument("--steps", type=int, default=10, help="measured steps per worker, after warm-up")
  shape.add_argument("--warmup", type=int, default=2, help="leading steps left out of the median (the first compiles)")
  shape.add_argument("--batch", type=int, default=4, help="rows per step, B")
  shape.add_argument("--seq-len", type=int, default=256, help="tokens per row, T")
  shape.add_argument(
      "--threads", type=int, default=len(machine.available_cpus()),
      help="CPUs each worker is pinned to, and torch's thread count",
  )
  shape.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the configurations")
  shape.add_argument(
      "--configs", default=",".join(DEFAULT_CONFIGS),
      help=f"comma-separated configurations, from {', '.join(worker.CONFIGS)}",
  )
  shape.add_argument("--matmul-size", type=int, default=2048, help="n of the [n, n] @ [n, n] float32 reference product")

  model = parser.add_argument_group("model and training")
  model.add_argument("--model", default=None, help="GGUF file or Hugging Face folder; default: the cached SmolLM2-135M GGUF")
  model.add_argument("--tiny", action="store_true", help="use a tiny random Llama model instead (smoke runs)")
  model.add_argument("--rank", type=int, default=16, help="LoRA rank r")
  model.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; the adapter scale is alpha / r")
  model.add_argument("--targets", default="q_proj,v_proj", help="comma-separated LoRA target modules")
  model.add_argument("--learning-rate", type=float, default=1e-4, help="peak AdamW learning rate")
  model.add_argument("--seed", type=int, default=0, help="seed of the shared token ids")
  model.add_argument(
      "--train-option", action="append", default=[], metavar="KEY=VALUE",
      help="a jaxlora TrainConfig field for the jax configurations, such as remat=true or"
      " compute_dtype=bfloat16 (repeatable; VALUE is read as JSON, else as a string)",
  )

  output = parser.add_argument_group("output")
  output.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds before a worker is stopped")
  output.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json, chart.png and worker logs")
  output.add_argument("--readme", default=DEFAULT_README, help="the Markdown page to write")
  output.add_argument("--note", default=None, help="a sentence printed at the top of the README, such as 'Provisional: ...'")
  output.add_argument("--report-only", action="store_true", help="render the README and chart from --out/results.json and exit")
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

  results_path = os.path.join(args.out, "results.json")
  chart_path = os.path.join(args.out, "chart.png")
  if args.report_only:
    report.write(files.read_json(results_path), args.readme, chart_path)
    logger.info("Wrote %s and %s.", args.readme, chart_path)
    return 0

  try:
    configs = parse_configs(args.configs)
    settings = build_settings(args)
    check_model_flags(args)
  except ValueError as error:
    parser.error(str(error))

  started = time.time()
  os.makedirs(args.out, exist_ok=True)
  settings["model"] = resolve_model(args)
  settings_path = os.path.join(args.out, "settings.json")
  files.write_json(settings_path, settings)

  runs = []
  for round_index in range(1, args.rounds + 1):
    for config in configs:
      run = run_worker(config, round_index, settings_path, args.out, args.worker_timeout)
      runs.append(run)

  results = {
      "command": "python benchmarks/run.py " + shlex.join(argv),
      "note": args.note,
      "settings": settings,
      "configs": configs,
      "machine": machine.describe(),
      "wall_s": time.time() - started,
      "runs": runs,
  }
  results["summary"] = summarize(runs, configs, settings["seq_len"])
  files.write_json(results_path, results)
  report.write(results, args.readme, chart_path)
  logger.info(
      "Finished in %.0f s; wrote %s, %s and %s.",
      results["wall_s"], results_path, chart_path, args.readme,
  )
  return 0


def parse_configs(text: str) -> list[str]:
  """Return the configuration names of a comma-separated list.

  Raises:
    ValueError: for an unknown, repeated or missing name.
  """
  names = [name.strip() for name in text.split(",") if name.strip()]
  unknown = [name for name in names if name not in worker.CONFIGS]
  if unknown or not names:
    raise ValueError(
        f"--configs {text!r} names unknown configurations {unknown}; choose from"
        f" {', '.join(worker.CONFIGS)}."
    )
  if len(set(names)) != len(names):
    raise ValueError(f"--configs {text!r} repeats a configuration; name each once.")
  return names


def build_settings(args) -> dict:
  """Return the settings every worker reads, checked.

  Raises:
    ValueError: for a value out of range or a malformed `--train-option`.
  """
  for name, minimum in (
      ("steps", 1), ("warmup", 1), ("batch", 1), ("seq_len", 2), ("rounds", 1),
      ("rank", 1), ("matmul_size", 1),
  ):
    value = getattr(args, name)
    if value < minimum:
      flag = "--" + name.replace("_", "-")
      reason = " (the first step compiles, so it is never measured)" if name == "warmup" else ""
      raise ValueError(f"{flag} must be at least {minimum}{reason}, got {value}.")
  if not args.alpha > 0 or not args.learning_rate > 0:
    raise ValueError(
        f"--alpha and --learning-rate must be positive, got {args.alpha} and {args.learning_rate}."
    )
  cpus = len(machine.available_cpus())
  if not 1 <= args.threads <= cpus:
    raise ValueError(f"--threads must be from 1 to {cpus} (the CPUs available here), got {args.threads}.")
  targets = [name.strip() for name in args.targets.split(",") if name.strip()]
  if not targets:
    raise ValueError(f"--targets {args.targets!r} names no module; pass names such as q_proj,v_proj.")

  return {
      "steps": args.steps,
      "warmup": args.warmup,
      "batch": args.batch,
      "seq_len": args.seq_len,
      "threads": args.threads,
      "rounds": args.rounds,
      "rank": args.rank,
      "alpha": args.alpha,
      "targets": targets,
      "learning_rate": args.learning_rate,
      "seed": args.seed,
      "matmul_size": args.matmul_size,
      "train_options": parse_train_options(args.train_option),
      "dtype": "float32",
  }


def parse_train_options(options: list[str]) -> dict:
  """Return `{field: value}` from `KEY=VALUE` strings, reading each VALUE as JSON if it parses.

  Raises:
    ValueError: for an option without `=`, or a KEY that is not a
      `TrainConfig` field the benchmark leaves free.
  """
  from jaxlora import train  # pylint: disable=g-import-not-at-top

  free = sorted(
      field.name for field in dataclasses.fields(train.TrainConfig)
      if field.name not in worker.RESERVED_TRAIN_FIELDS
  )
  parsed = {}
  for option in options:
    key, sep, text = option.partition("=")
    if not sep or not key:
      raise ValueError(f"--train-option {option!r} is not KEY=VALUE, such as remat=true.")
    if key not in free:
      raise ValueError(
          f"--train-option {option!r}: {key!r} is not a TrainConfig field that the"
          f" benchmark leaves free; use one of {', '.join(free)}."
      )
    try:
      parsed[key] = json.loads(text)
    except json.JSONDecodeError:
      parsed[key] = text
  return parsed


def check_model_flags(args) -> None:
  """Raise `ValueError` if `--tiny` and `--model` are both given or `--model` does not exist."""
  if args.tiny and args.model:
    raise ValueError("Pass either --tiny or --model, not both.")
  if args.model and not os.path.exists(args.model):
    raise ValueError(f"--model {args.model!r} does not exist; pass a GGUF file or a Hugging Face folder.")


def resolve_model(args) -> str:
  """Return the model path: `--model`, a tiny random model for `--tiny`, else the SmolLM2 GGUF."""
  if args.model:
    return os.path.abspath(args.model)
  if args.tiny:
    return write_tiny_model(os.path.join(args.out, "tiny-model"), args.seq_len)

  from jaxlora.models import smollm2  # pylint: disable=g-import-not-at-top

  return os.fspath(smollm2.fetch_smollm2())


def write_tiny_model(folder: str, seq_len: int) -> str:
  """Write a random `TINY_LLAMA` model as a Hugging Face folder and return its path."""
  # pylint: disable=g-import-not-at-top
  import jax

  from jaxlora import models
  # pylint: enable=g-import-not-at-top

  fields = dict(TINY_LLAMA, max_position_embeddings=max(TINY_LLAMA["max_position_embeddings"], seq_len))
  config = models.LlamaConfig.from_hf(fields)
  params = models.init_params(config, jax.random.PRNGKey(0))
  models.save_pretrained(folder, config, params, overwrite=True)
  return os.path.abspath(folder)


def run_worker(config: str, round_index: int, settings_path: str, out: str, timeout: float) -> dict:
  """Run one worker process and return its measurements with the round number.

  Raises:
    RuntimeError: if the worker fails or runs past `timeout` seconds; the
      message names its log file and ends with the log's last lines.
  """
  logs = os.path.join(out, "workers")
  os.makedirs(logs, exist_ok=True)
  stem = os.path.join(logs, f"{config}-round{round_index}")
  result_path, log_path = stem + ".json", stem + ".log"
  if os.path.exists(result_path):
    os.remove(result_path)

  command = [
      sys.executable, os.path.join(HERE, "worker.py"), config,
      "--settings", settings_path, "--result", result_path,
  ]
  logger.info("Round %d: running %s.", round_index, config)
  start = time.perf_counter()
  with open(log_path, "w", encoding="utf-8") as log:
    try:
      completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
      raise RuntimeError(
          f"Worker {config} (round {round_index}) timed out after {timeout:.0f} s and"
          f" was stopped; raise --worker-timeout or lower --steps. Log: {log_path}\n{_tail(log_path)}"
      ) from error
  if completed.returncode != 0 or not os.path.exists(result_path):
    raise RuntimeError(
        f"Worker {config} (round {round_index}) failed with exit status"
        f" {completed.returncode}. Log: {log_path}\n{_tail(log_path)}"
    )

  run = files.read_json(result_path)
  run["round"] = round_index
  run["wall_s"] = time.perf_counter() - start
  logger.info(
      "Round %d: %s took %.0f s: %.1f tokens/s, first step %.1f s, peak %.0f MiB.",
      round_index, config, run["wall_s"], run["tokens_per_s"], run["first_step_s"], run["peak_mib"],
  )
  return run


def _tail(path, lines=25):
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def summarize(runs: list[dict], configs: list[str], seq_len: int) -> dict:
  """Return the medians over rounds per configuration, the matmul rates, ratios and targets.

  FLOP/s fractions divide each configuration's model FLOP/s (see `flops`) by
  the machine's rate, the faster of the two stacks' median matmul rates.
  """
  matmul = {}
  for stack in ("jax", "torch"):
    rates = [run["matmul"]["gflop_per_s"] for run in runs if run["stack"] == stack]
    if rates:
      matmul[stack] = statistics.median(rates)
  machine_rate = max(matmul.values())

  per_config = {}
  for config in configs:
    own = [run for run in runs if run["config"] == config]
    per_config[config] = _summarize_config(own, machine_rate, seq_len)

  ratios = _ratios(per_config)
  return {
      "matmul_gflop_per_s": dict(matmul, machine=machine_rate),
      "configs": per_config,
      "ratios": ratios,
      "targets": _check_targets(ratios),
  }


def _summarize_config(runs, machine_rate, seq_len):
  first = runs[0]
  shape = first["model"]
  mode = first["mode"]
  tokens_per_s = [run["tokens_per_s"] for run in runs]
  flops_per_token = flops.training_flops_per_token(
      mode=mode,
      matmul_params=flops.matmul_parameters(
          total=shape["base_params"], embedding=shape["vocab"] * shape["hidden"], tied=shape["tied"],
      ),
      adapter_params=shape["trainable_params"] if mode == flops.LORA else 0,
      layers=shape["layers"],
      seq_len=seq_len,
      attention_width=shape["attention_width"],
  )
  median_tokens = statistics.median(tokens_per_s)
  achieved = median_tokens * flops_per_token
  return {
      "stack": first["stack"],
      "mode": mode,
      "rounds": len(runs),
      "tokens_per_s": median_tokens,
      "tokens_per_s_rounds": tokens_per_s,
      "median_step_s": statistics.median(run["median_step_s"] for run in runs),
      "first_step_s": statistics.median(run["first_step_s"] for run in runs),
      "peak_mib": statistics.median(run["peak_mib"] for run in runs),
      "load_peak_mib": statistics.median(run["load_peak_mib"] for run in runs),
      "load_s": statistics.median(run["load_s"] for run in runs),
      "flops_per_token": flops_per_token,
      "achieved_gflop_per_s": achieved / 1e9,
      "flop_fraction": achieved / (machine_rate * 1e9),
      "first_loss": first["losses"][0],
      "trainable_params": shape["trainable_params"],
      "base_params": shape["base_params"],
  }


def _ratios(per_config):
  """Return the jaxlora-to-PyTorch ratios and the first-step times the targets need."""

  def ratio(numerator, denominator, field):
    if numerator not in per_config or denominator not in per_config:
      return None
    return per_config[numerator][field] / per_config[denominator][field]

  ratios = {
      "lora_speed_vs_peft": ratio("jax-lora", "torch-lora", "tokens_per_s"),
      "lora_memory_vs_peft": ratio("jax-lora", "torch-lora", "peak_mib"),
      "lora_first_step_vs_peft": ratio("jax-lora", "torch-lora", "first_step_s"),
      "full_speed_vs_torch": ratio("jax-full", "torch-full", "tokens_per_s"),
      "full_memory_vs_torch": ratio("jax-full", "torch-full", "peak_mib"),
      "full_first_step_vs_torch": ratio("jax-full", "torch-full", "first_step_s"),
      "lora_step_vs_full_step": ratio("jax-lora", "jax-full", "median_step_s"),
      "peft_step_vs_full_step": ratio("torch-lora", "torch-full", "median_step_s"),
  }
  for config, name in (("jax-lora", "jax_lora_first_step_s"), ("jax-full", "jax_full_first_step_s")):
    ratios[name] = per_config[config]["first_step_s"] if config in per_config else None
  return ratios


def _check_targets(ratios):
  """Return one record per target: its description, measured value and whether it is met."""
  compare = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
  records = []
  for description, name, operator, bound in TARGETS:
    value = ratios.get(name)
    records.append({
        "target": description,
        "value": value,
        "bound": f"{operator} {bound:g}",
        "met": None if value is None else compare[operator](value, bound),
    })
  return records


if __name__ == "__main__":
  sys.exit(main())

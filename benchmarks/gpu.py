"""Benchmark jaxlora on one GPU: Llama-3-8B LoRA and Llama-3.2-1B full fine-tuning.

    python benchmarks/gpu.py [--steps 10 --warmup 3 --time-limit 450 --json FILE]
    python benchmarks/gpu.py --smoke     # tiny shapes on the CPU, as CI runs it

Two cases, each in its own process so that its peak device memory is its own:

    lora-8b   Llama-3-8B shapes, bfloat16 weights, LoRA rank 16 on every
              linear layer but the output head, 1 row of 4096 tokens
    full-1b   Llama-3.2-1B shapes, float32 weights (every one trains),
              2 rows of 4096 tokens

Weights are random, drawn on the device (no checkpoint is read). Both cases
compute in bfloat16 through `jaxlora.train.fit` with rematerialisation
(policy `dots_with_no_batch_dims_saveable`: the outputs of the weight
products are kept, attention is recomputed). The script prints one table:
tokens/s, model FLOP utilisation (MFU, model FLOPs from `flops.py` over the
device's dense bfloat16 peak) and peak device memory (`memory_stats()`).

jax needs CUDA support on the GPU machine, for example
`pip install -U "jax[cuda12]"`. The parent process never initialises jax, so
each case's process may take the device's memory. It lets jax's allocator
reserve 90% of it (`XLA_PYTHON_CLIENT_MEM_FRACTION`, 75% by default).

NOTE: only `--smoke` has run so far. The batch sizes are estimates of what
fits in 80 GB with this remat policy, not measured on a GPU.
"""

import argparse
import dataclasses
import functools
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import time

import files
import flops
import worker

logger = logging.getLogger(__name__)

# Dense bfloat16 peak of a device, by a substring of `device.device_kind`,
# in TFLOP/s, from NVIDIA's data sheets. The first match wins, so the PCIe
# H100 comes before the SXM one. NOTE: an H100 NVL also matches "H100" but is
# rated lower; pass --peak-tflops for it and for any device not listed.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)

LLAMA_3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}

LLAMA_32_1B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}

# Shapes of `--smoke`, every size different so a swapped axis fails.
SMOKE_LLAMA = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark case.

  Attributes:
    title: the model the shapes come from.
    shapes: a config.json dict of the architecture.
    mode: "lora" or "full".
    weight_dtype: dtype of the random weights ("bfloat16" or "float32").
    batch: rows per step, B.
    seq_len: tokens per row, T.
  """

  title: str
  shapes: dict
  mode: str
  weight_dtype: str
  batch: int
  seq_len: int


CASES = {
    "lora-8b": Case("Llama-3-8B", LLAMA_3_8B, "lora", "bfloat16", batch=1, seq_len=4096),
    "full-1b": Case("Llama-3.2-1B", LLAMA_32_1B, "full", "float32", batch=2, seq_len=4096),
}
SMOKE_CASES = {
    "lora-8b": Case("tiny", SMOKE_LLAMA, "lora", "bfloat16", batch=2, seq_len=64),
    "full-1b": Case("tiny", SMOKE_LLAMA, "full", "float32", batch=2, seq_len=64),
}

LORA_RANK = 16
LORA_ALPHA = 32.0
REMAT_POLICY = "dots_with_no_batch_dims_saveable"
INIT_STDDEV = 0.02
# Seconds kept back from the time limit for starting and reporting.
RESERVE_S = 10.0
# A case is not started with less time than this left.
MIN_CASE_S = 30.0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 2 measured steps")
  parser.add_argument("--steps", type=int, default=None, help="measured steps per case (default 10, or 2 with --smoke)")
  parser.add_argument("--warmup", type=int, default=None, help="leading steps left out (default 3, or 1 with --smoke)")
  parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to run")
  parser.add_argument("--time-limit", type=float, default=450.0, help="seconds for all cases together")
  parser.add_argument("--peak-tflops", type=float, default=None, help="dense bfloat16 peak of the device, for MFU")
  parser.add_argument("--json", default=None, help="file to write every case's measurements to")
  parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

  default_steps, default_warmup = (2, 1) if args.smoke else (10, 3)
  steps = default_steps if args.steps is None else args.steps
  warmup = default_warmup if args.warmup is None else args.warmup
  if steps < 1 or warmup < 1:
    parser.error(f"--steps and --warmup must be at least 1 (the first step compiles), got {steps} and {warmup}.")
  if args.peak_tflops is not None and not args.peak_tflops > 0:
    parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}.")

  if args.case is not None:
    run_case(args.case, smoke=args.smoke, steps=steps, warmup=warmup, peak_tflops=args.peak_tflops, result_path=args.result)
    return 0

  names = [name.strip() for name in args.cases.split(",") if name.strip()]
  unknown = [name for name in names if name not in CASES]
  if unknown or not names:
    parser.error(f"--cases {args.cases!r} names unknown cases {unknown}; choose from {', '.join(CASES)}.")
  results = run_cases(names, args, steps=steps, warmup=warmup)
  if args.json:
    files.write_json(args.json, results)
  print(format_table(results))
  return 0 if all(result.get("error") is None for result in results) else 1


def run_cases(names, args, *, steps, warmup):
  """Run each case in a child process within the time limit and return their results."""
  deadline = time.monotonic() + args.time_limit - RESERVE_S
  results = []
  with tempfile.TemporaryDirectory(prefix="jaxlora-gpu-bench-") as folder:
    for name in names:
      remaining = deadline - time.monotonic()
      if remaining < MIN_CASE_S:
        results.append({"case": name, "error": f"skipped: {remaining:.0f} s left of --time-limit"})
        continue
      result_path = os.path.join(folder, f"{name}.json")
      results.append(_run_child(name, args, result_path, steps=steps, warmup=warmup, timeout=remaining))
  return results


def _run_child(name, args, result_path, *, steps, warmup, timeout):
  command = [
      sys.executable, os.path.abspath(__file__), "--case", name, "--result", result_path,
      "--steps", str(steps), "--warmup", str(warmup),
  ]
  if args.smoke:
    command.append("--smoke")
  if args.peak_tflops is not None:
    command += ["--peak-tflops", str(args.peak_tflops)]
  env = dict(os.environ)
  if args.smoke:
    env["JAX_PLATFORMS"] = "cpu"
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

  logger.info("Running case %s (at most %.0f s).", name, timeout)
  try:
    completed = subprocess.run(command, env=env, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    logger.error("Case %s timed out after %.0f s and was stopped.", name, timeout)
    return {"case": name, "error": f"timed out after {timeout:.0f} s"}
  if completed.returncode != 0 or not os.path.exists(result_path):
    logger.error("Case %s failed with exit status %d; its log is above.", name, completed.returncode)
    return {"case": name, "error": f"failed with exit status {completed.returncode} (see its log above)"}
  return files.read_json(result_path)


def run_case(name, *, smoke, steps, warmup, peak_tflops, result_path):
  """Train one case in this process and write its measurements to `result_path`."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np

  import jaxlora
  from jaxlora import models
  from jaxlora import train
  # pylint: enable=g-import-not-at-top

  if not smoke and jax.default_backend() != "gpu":
    raise SystemExit(
        f"No GPU: jax runs on {jax.default_backend()} devices ({jax.devices()}). Install"
        " jax with CUDA support (for example pip install -U 'jax[cuda12]'), or pass"
        " --smoke for tiny shapes on the CPU."
    )
  case = (SMOKE_CASES if smoke else CASES)[name]
  device = jax.local_devices()[0]
  config = models.LlamaConfig.from_hf(case.shapes)

  setup_start = time.perf_counter()
  params = random_params(config, case.weight_dtype, seed=0)
  base_params = jaxlora.count_parameters(params, trainable_mask=jaxlora.full_mask(params)).total
  if case.mode == "lora":
    params = jaxlora.apply(params, rank=LORA_RANK, alpha=LORA_ALPHA, targets=jaxlora.ALL_LINEAR)
  trainable = jaxlora.count_parameters(
      params, trainable_mask=jaxlora.adapter_mask(params) if case.mode == "lora" else jaxlora.full_mask(params)
  ).trainable
  jax.block_until_ready(params)
  init_s = time.perf_counter() - setup_start
  logger.info("Drew %s random weights in %.1f s.", case.title, init_s)

  rng = np.random.default_rng(0)
  ones = np.ones((case.batch, case.seq_len), np.int32)

  def batches():
    while True:
      ids = rng.integers(0, config.vocab_size, size=(case.batch, case.seq_len + 1), dtype=np.int32)
      yield {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": ones.astype(np.float32), "attention_mask": ones}

  timed = worker.TimedBatches(batches())
  train_config = train.TrainConfig(
      steps=warmup + steps, mode=case.mode, learning_rate=1e-4, progress=False,
      compute_dtype="bfloat16", remat=True, remat_policy=REMAT_POLICY,
  )
  step_start = time.perf_counter()
  fit_result = train.fit(models.Llama(config), params, timed, None, train_config)

  elapsed = [record["elapsed_s"] for record in fit_result.history]
  step_ends = [timed.request_times[1] + value - elapsed[0] for value in elapsed]
  result = worker.summarize_steps(step_ends, step_start, warmup, case.batch * case.seq_len)

  flops_per_token = flops.training_flops_per_token(
      mode=case.mode,
      matmul_params=flops.matmul_parameters(
          total=base_params, embedding=config.vocab_size * config.hidden_size,
          tied=config.tie_word_embeddings,
      ),
      adapter_params=trainable if case.mode == "lora" else 0,
      layers=config.num_hidden_layers,
      seq_len=case.seq_len,
      attention_width=config.num_attention_heads * config.head_dim,
  )
  peak = peak_tflops if peak_tflops is not None else device_peak_tflops(device.device_kind)
  stats = device.memory_stats() or {}
  result.update(
      case=name,
      title=case.title,
      mode=case.mode,
      batch=case.batch,
      seq_len=case.seq_len,
      weight_dtype=case.weight_dtype,
      base_params=base_params,
      trainable_params=trainable,
      init_s=init_s,
      device=device.device_kind,
      peak_tflops=peak,
      flops_per_token=flops_per_token,
      mfu=None if peak is None else result["tokens_per_s"] * flops_per_token / (peak * 1e12),
      peak_device_bytes=stats.get("peak_bytes_in_use"),
      device_bytes_limit=stats.get("bytes_limit"),
      host_peak_mib=worker.peak_rss_mib(),
      losses=[record["loss"] for record in fit_result.history],
      error=None,
  )
  files.write_json(result_path, result)


def device_peak_tflops(device_kind: str) -> float | None:
  """Return the dense bfloat16 peak of `device_kind` from `PEAK_TFLOPS`, or None if unlisted."""
  for name, tflops in PEAK_TFLOPS:
    if name in device_kind:
      return tflops
  logger.warning(
      "No bfloat16 peak is listed for %r, so MFU is not reported; pass --peak-tflops.", device_kind
  )
  return None


def random_params(config, dtype: str, *, seed: int) -> dict:
  """Return a random Llama tree for `config` with `dtype` leaves, drawn on the default device.

  Kernels and embeddings are normal with standard deviation 0.02, norm scales
  are ones. Each leaf is drawn by its own jitted call, so the temporaries of
  only one leaf are on the device at a time.
  """
  # pylint: disable=g-import-not-at-top
  import jax

  from jaxlora import models
  from jaxlora import paths
  # pylint: enable=g-import-not-at-top

  shapes = jax.eval_shape(functools.partial(models.init_params, config), jax.random.PRNGKey(0))
  base = jax.random.PRNGKey(seed)
  counter = itertools.count()

  def draw(path, leaf):
    key = jax.random.fold_in(base, next(counter))
    return _random_leaf(key, tuple(leaf.shape), dtype, path[-1] == "scale")

  return paths.map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _leaf_function(shape, dtype, ones):
  """Return a jitted `key -> leaf`, one per distinct shape, dtype and kind."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def leaf(key):
    if ones:
      return jnp.ones(shape, dtype)
    return jax.random.normal(key, shape, dtype) * jnp.asarray(INIT_STDDEV, dtype)

  return jax.jit(leaf)


def _random_leaf(key, shape, dtype, ones):
  return _leaf_function(shape, dtype, ones)(key)


def format_table(results: list[dict]) -> str:
  """Return the summary table of all cases, one row each, and the device line."""
  header = ("case", "shapes", "mode", "B x T", "tokens/s", "MFU", "peak GiB", "first step s")
  rows = [header]
  for result in results:
    if result.get("error"):
      rows.append((result["case"], "", "", "", result["error"], "", "", ""))
      continue
    peak_bytes = result["peak_device_bytes"]
    rows.append((
        result["case"],
        result["title"],
        result["mode"],
        f"{result['batch']} x {result['seq_len']}",
        f"{result['tokens_per_s']:.0f}",
        "n/a" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%",
        "n/a" if peak_bytes is None else f"{peak_bytes / 2**30:.1f}",
        f"{result['first_step_s']:.1f}",
    ))
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
  lines = ["  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip() for row in rows]
  devices = sorted({
      f"{result['device']} (bf16 peak {result['peak_tflops'] or 'unknown'} TFLOP/s)"
      for result in results if not result.get("error")
  })
  if devices:
    lines.append("device: " + "; ".join(devices))
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())

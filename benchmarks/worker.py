"""Run one benchmark configuration in this process and write its measurements as JSON.

    python benchmarks/worker.py CONFIG --settings SETTINGS.json --result RESULT.json

CONFIG is one of `CONFIGS`. `run.py` starts one worker per configuration and
round, so each measures a fresh process: compilation from cold, and a peak
resident memory (`getrusage` maxrss) of its own. The settings file is the
JSON object that `run.py` writes (model path, batch size, sequence length,
steps, threads, LoRA settings and so on).

A worker pins itself to `threads` CPUs before importing jax or torch, then:

1. times a float32 matrix product `[n, n] @ [n, n]` of its stack;
2. loads the model (float32) and records the load time and the peak so far;
3. starts the clock, builds the step (adapters, optimizer, compilation) and
   trains `warmup + steps` AdamW steps on the token ids that every
   configuration shares, recording the end of each step.
"""

import argparse
import logging
import math
import os
import resource
import statistics
import sys
import time

import files
import machine

logger = logging.getLogger(__name__)

# Configuration name -> (stack, mode).
CONFIGS = {
    "jax-lora": ("jax", "lora"),
    "jax-full": ("jax", "full"),
    "torch-lora": ("torch", "lora"),
    "torch-full": ("torch", "full"),
}

MATMUL_REPEATS = 10

# AdamW settings shared by both stacks. Weight decay is 0 because the stacks
# apply it to different sets of leaves (jaxlora skips norms and biases).
BETAS = (0.9, 0.999)
EPSILON = 1e-8
MAX_GRAD_NORM = 1.0
MIN_LR_RATIO = 0.1

# TrainConfig fields that `run_jax` sets itself, so a train option may not.
# Gradient accumulation is among them because the PyTorch loop has none.
RESERVED_TRAIN_FIELDS = (
    "steps", "mode", "learning_rate", "max_grad_norm", "weight_decay", "b1", "b2",
    "eps", "min_lr_ratio", "progress", "grad_accum_steps",
)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("config", choices=sorted(CONFIGS), help="the configuration to measure")
  parser.add_argument("--settings", required=True, help="JSON file of run settings written by run.py")
  parser.add_argument("--result", required=True, help="JSON file to write the measurements to")
  args = parser.parse_args(argv)

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  settings = files.read_json(args.settings)
  threads = machine.pin_threads(settings["threads"])

  stack, mode = CONFIGS[args.config]
  logger.info("Measuring %s on %d threads.", args.config, settings["threads"])
  if stack == "jax":
    result = run_jax(mode, settings)
  else:
    result = run_torch(mode, settings)

  result.update(config=args.config, stack=stack, mode=mode, threads=threads)
  result["peak_mib"] = peak_rss_mib()
  files.write_json(args.result, result)
  logger.info(
      "%s: %.1f tokens/s, first step %.1f s, peak %.0f MiB.",
      args.config, result["tokens_per_s"], result["first_step_s"], result["peak_mib"],
  )


def peak_rss_mib() -> float:
  """Return this process's peak resident memory so far, in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_ids(vocab_size: int, settings) -> "np.ndarray":
  """Return the shared token ids `[warmup + steps, B, T + 1]` int32.

  Every configuration draws the same ids from the seed, so all of them train
  on identical batches in the same order.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  steps = settings["warmup"] + settings["steps"]
  shape = (steps, settings["batch"], settings["seq_len"] + 1)
  return np.random.default_rng(settings["seed"]).integers(0, vocab_size, size=shape, dtype=np.int32)


def cosine_learning_rate(step: int, total_steps: int) -> float:
  """Return the fraction of the peak rate at `step`: jaxlora's cosine decay without warmup."""
  progress = min(step / total_steps, 1.0)
  return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def summarize_steps(step_ends: list[float], setup_start: float, warmup: int, tokens_per_step: int):
  """Return the timing fields of a result from the end time of every step.

  Args:
    step_ends: `time.perf_counter()` at the end of each step, in order.
    setup_start: `time.perf_counter()` when the step setup began.
    warmup: the number of leading steps left out of the median.
    tokens_per_step: B * T.
  """
  durations = [end - start for start, end in zip([setup_start] + step_ends, step_ends)]
  measured = durations[warmup:]
  median = statistics.median(measured)
  return {
      "first_step_s": step_ends[0] - setup_start,
      "step_s": durations,
      "median_step_s": median,
      "tokens_per_step": tokens_per_step,
      "tokens_per_s": tokens_per_step / median,
  }


class TimedBatches:
  """An iterator over batches that records the time of each request.

  `fit` requests a step's batch when the previous step has finished, so a
  request time marks the end of the step before it.
  """

  def __init__(self, batches):
    self._batches = iter(batches)
    self.request_times = []

  def __iter__(self):
    return self

  def __next__(self):
    self.request_times.append(time.perf_counter())
    return next(self._batches)


def run_jax(mode: str, settings) -> dict:
  """Measure jaxlora's `train.fit` in `mode` ("lora" or "full")."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxlora
  from jaxlora import models
  from jaxlora import train
  # pylint: enable=g-import-not-at-top

  matmul = _time_matmul(
      lambda x, y: x @ y,
      lambda n: jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32),
      lambda value: value.block_until_ready(),
      settings["matmul_size"],
      compile_fn=jax.jit,
  )

  start = time.perf_counter()
  pretrained = models.load(settings["model"])
  load = {"load_s": time.perf_counter() - start, "load_peak_mib": peak_rss_mib()}
  config = pretrained.config
  if not isinstance(config, models.LlamaConfig):
    raise ValueError(
        f"The benchmark runs Llama-family models; {settings['model']} is a"
        f" {type(config).__name__}."
    )

  ids = token_ids(config.vocab_size, settings)
  ones = np.ones(ids.shape[1:2] + (settings["seq_len"],), np.int32)
  batches = TimedBatches(
      {
          "input_ids": step_ids[:, :-1],
          "targets": step_ids[:, 1:],
          "loss_mask": ones.astype(np.float32),
          "attention_mask": ones,
      }
      for step_ids in ids
  )

  setup_start = time.perf_counter()
  params = pretrained.params
  if mode == "lora":
    params = jaxlora.apply(
        params, rank=settings["rank"], alpha=settings["alpha"], targets=settings["targets"]
    )
  mask = jaxlora.adapter_mask(params) if mode == "lora" else jaxlora.full_mask(params)
  count = jaxlora.count_parameters(params, trainable_mask=mask)
  train_config = train.TrainConfig(
      steps=len(ids),
      mode=mode,
      learning_rate=settings["learning_rate"],
      max_grad_norm=MAX_GRAD_NORM,
      weight_decay=0.0,
      b1=BETAS[0], b2=BETAS[1], eps=EPSILON,
      min_lr_ratio=MIN_LR_RATIO,
      progress=False,
      **settings["train_options"],
  )
  fit_result = train.fit(models.Llama(config), params, batches, None, train_config)

  # The first step ends when `fit` requests the second batch. Later steps end
  # at the times `fit` records (`elapsed_s`, from a start of its own), so the
  # work after the last step is not counted.
  elapsed = [record["elapsed_s"] for record in fit_result.history]
  first_end = batches.request_times[1]
  step_ends = [first_end + value - elapsed[0] for value in elapsed]
  result = summarize_steps(
      step_ends, setup_start, settings["warmup"], settings["batch"] * settings["seq_len"]
  )
  base_params = jaxlora.count_parameters(pretrained.params, trainable_mask=jaxlora.full_mask(pretrained.params))
  result.update(load)
  result.update(
      matmul=matmul,
      losses=[record["loss"] for record in fit_result.history],
      model=_model_shape(
          vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
          attention_width=config.num_attention_heads * config.head_dim,
          tied=config.tie_word_embeddings, base_params=base_params.total,
          trainable_params=count.trainable,
      ),
      train_options=settings["train_options"],
  )
  return result


def run_torch(mode: str, settings) -> dict:
  """Measure a plain PyTorch training loop in `mode`, with peft adapters for "lora"."""
  # pylint: disable=g-import-not-at-top
  import peft
  import torch
  import torch.nn.functional as F
  # pylint: enable=g-import-not-at-top

  torch.set_num_threads(settings["threads"])
  matmul = _time_matmul(
      torch.mm,
      lambda n: torch.randn(n, n, generator=torch.Generator().manual_seed(0)),
      lambda value: value,
      settings["matmul_size"],
  )

  start = time.perf_counter()
  model = _load_torch_model(settings["model"])
  load = {"load_s": time.perf_counter() - start, "load_peak_mib": peak_rss_mib()}
  config = model.config
  base_params = sum(p.numel() for p in model.parameters())
  ids = torch.from_numpy(token_ids(config.vocab_size, settings)).long()
  attention_mask = torch.ones(settings["batch"], settings["seq_len"], dtype=torch.long)

  setup_start = time.perf_counter()
  if mode == "lora":
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=settings["rank"], lora_alpha=settings["alpha"],
            target_modules=list(settings["targets"]), lora_dropout=0.0, bias="none",
        ),
    )
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(
      trainable, lr=settings["learning_rate"], betas=BETAS, eps=EPSILON, weight_decay=0.0
  )
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: cosine_learning_rate(step, len(ids))
  )

  losses, step_ends = [], []
  for step_ids in ids:
    logits = model(input_ids=step_ids[:, :-1], attention_mask=attention_mask).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), step_ids[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
    step_ends.append(time.perf_counter())

  result = summarize_steps(
      step_ends, setup_start, settings["warmup"], settings["batch"] * settings["seq_len"]
  )
  result.update(load)
  result.update(
      matmul=matmul,
      losses=losses,
      model=_model_shape(
          vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
          attention_width=config.num_attention_heads * _head_dim(config),
          tied=bool(config.tie_word_embeddings), base_params=base_params,
          trainable_params=sum(p.numel() for p in trainable),
      ),
      attention_implementation=getattr(config, "_attn_implementation", None),
      torch_threads=torch.get_num_threads(),
  )
  return result


def _load_torch_model(path):
  """Load a GGUF file or a Hugging Face folder with transformers, in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if os.path.isfile(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
        dtype=torch.float32,
    )
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _head_dim(config):
  head_dim = getattr(config, "head_dim", None)
  return head_dim or config.hidden_size // config.num_attention_heads


def _model_shape(*, vocab, hidden, layers, attention_width, tied, base_params, trainable_params):
  return {
      "vocab": vocab,
      "hidden": hidden,
      "layers": layers,
      "attention_width": attention_width,
      "tied": tied,
      "base_params": base_params,
      "trainable_params": trainable_params,
  }


def _time_matmul(product, random_matrix, wait, size, compile_fn=None):
  """Return the rate of `product` on two `[size, size]` float32 matrices.

  The first call (compilation, if `compile_fn` is given, and cache warm-up) is
  not timed; the median of `MATMUL_REPEATS` timed calls gives the rate.
  """
  product = compile_fn(product) if compile_fn else product
  x, y = random_matrix(size), random_matrix(size)
  wait(product(x, y))

  seconds = []
  for _ in range(MATMUL_REPEATS):
    start = time.perf_counter()
    wait(product(x, y))
    seconds.append(time.perf_counter() - start)
  return {
      "size": size,
      "seconds": seconds,
      "gflop_per_s": 2 * size**3 / statistics.median(seconds) / 1e9,
  }


if __name__ == "__main__":
  sys.exit(main())

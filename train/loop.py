"""The training loop: partition, step, evaluate, log, and join the tree again.

    params (adapted) -> partition -> (trainable, frozen)
      -> steps update trainable; frozen is only read
      -> combine(trainable, frozen) -> params (trained)
"""

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from tqdm.contrib import logging as tqdm_logging

import jaxlora
from jaxlora.train import optim
from jaxlora.train.metrics import MetricsWriter
from jaxlora.train.step import Batch, evaluate, make_eval_step, make_train_step, stack_micro_batches

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of one training run, validated on construction.

  Attributes:
    steps: number of optimizer steps. Each step consumes `grad_accum_steps`
      batches from the training iterator.
    learning_rate: peak learning rate, reached at the end of warmup.
    warmup_steps: steps of linear warmup from 0 to the peak, in [0, steps].
    min_lr_ratio: the cosine decay ends at `min_lr_ratio * learning_rate`,
      in [0, 1].
    weight_decay: decoupled AdamW weight decay on the matrices (kernels,
      embeddings, adapter A and B), not on norm scales or biases.
    max_grad_norm: clip the gradient to this global L2 norm; None turns
      clipping off.
    grad_accum_steps: micro-batches per optimizer step. The effective batch is
      `grad_accum_steps` times the iterator's batch size.
    eval_every: measure the held-out loss every this many steps; 0 measures it
      only after the last step.
    seed: seeds dropout.
    metrics_path: JSON Lines file that receives one record per step (appended
      to); None writes no file.
    b1: Adam's decay rate for the first moment.
    b2: Adam's decay rate for the second moment.
    eps: Adam's term added to the denominator.
    progress: show a tqdm progress bar.
  """

  steps: int
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  grad_accum_steps: int = 1
  eval_every: int = 0
  seed: int = 0
  metrics_path: str | os.PathLike | None = None
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  progress: bool = True

  def __post_init__(self):
    _check_int("steps", self.steps, minimum=1, fix="Train for at least one step.")
    _check_int("warmup_steps", self.warmup_steps, minimum=0, fix="Use 0 for no warmup.")
    if self.warmup_steps > self.steps:
      raise ValueError(
          f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}."
          f" Use at most {self.steps} warmup steps, or train for more steps."
      )
    _check_int(
        "grad_accum_steps", self.grad_accum_steps, minimum=1,
        fix="Use 1 for no gradient accumulation.",
    )
    _check_int(
        "eval_every", self.eval_every, minimum=0,
        fix="Use 0 to evaluate only after the last step.",
    )
    _check_int("seed", self.seed, minimum=0, fix="Use a seed such as 0.")

    _check_positive("learning_rate", self.learning_rate, fix="Use a rate such as 1e-4.")
    _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, fix="Use 0 to decay to 0.")
    _check_range(
        "weight_decay", self.weight_decay, 0.0, math.inf,
        fix="Use 0 for no weight decay.",
    )
    if self.max_grad_norm is not None:
      _check_positive(
          "max_grad_norm", self.max_grad_norm,
          fix="Use a norm such as 1.0, or None for no clipping.",
      )

    if not 0 <= self.b1 < 1:
      raise ValueError(f"b1 must be in [0, 1), got {self.b1!r}. Adam's default is 0.9.")
    if not 0 <= self.b2 < 1:
      raise ValueError(f"b2 must be in [0, 1), got {self.b2!r}. Adam's default is 0.999.")
    _check_positive("eps", self.eps, fix="Adam's default is 1e-8.")


class FitResult(NamedTuple):
  """The result of `fit`: the trained tree and the per-step records.

  Attributes:
    params: the whole trained tree, `jaxlora.combine(trainable, frozen)`; its
      frozen leaves are the arrays that were passed in.
    history: one dict per step, the records written to `metrics_path`.
  """

  params: dict[str, Any]
  history: list[dict[str, Any]]


def fit(
    model,
    params: Mapping[str, Any],
    train_batches: Iterable[Batch],
    eval_batches: Sequence[Batch] | None,
    config: TrainConfig,
    *,
    trainable_mask: Mapping[str, Any] | None = None,
) -> FitResult:
  """Train the trainable leaves of `params` for `config.steps` optimizer steps.

  The trainable leaves are copied before the first step (the step donates its
  buffers), so the caller's `params` stay valid. Frozen leaves are never
  written: the returned tree contains the very arrays that were passed in.

  Each step's record contains `step`, `loss` (token-mean cross entropy of the
  step, in nats), `grad_norm` (before clipping), `lr` (the rate the update
  used), `scored_tokens`, `tokens_per_s` and `elapsed_s` (seconds since the
  first step began), plus `eval_loss` on evaluation steps. `tokens_per_s` counts
  every real token the step processed, scored or not (the sum of
  `attention_mask`), over the wall time since the previous step ended, data
  loading included and evaluation excluded. The first step's time includes
  compilation.

  Args:
    model: the Flax module, such as `jaxlora.models.Llama(config)`.
    params: the tree to train, for LoRA with adapters added by `jaxlora.apply`.
    train_batches: an iterable of `[B, T]` batches (dicts with `input_ids`,
      `targets`, `loss_mask`, `attention_mask`) that yields at least
      `config.steps * config.grad_accum_steps` batches.
    eval_batches: held-out `[B, T]` batches, or None (or empty) for no
      evaluation.
    config: the run's settings.
    trainable_mask: True where a leaf trains. Defaults to the adapters;
      pass `jaxlora.full_mask(params)` for full fine-tuning.

  Returns:
    `FitResult(params, history)`.

  Raises:
    ValueError: if `train_batches` runs out before the last step, or a batch
      is malformed, or (from `jaxlora.partition`) the tree has no adapters and
      no mask was given.
    FloatingPointError: if the loss or the gradient norm of a step is NaN or
      infinite, naming the step.
  """
  trainable, frozen = jaxlora.partition(params, trainable_mask=trainable_mask)
  trainable = jax.tree.map(jnp.copy, trainable)
  if trainable_mask is None:
    trainable_mask = jaxlora.adapter_mask(params)
  count = jaxlora.count_parameters(params, trainable_mask=trainable_mask)
  logger.info("%s", jaxlora.format_trainable_parameters(count))

  schedule = optim.learning_rate_schedule(
      config.learning_rate,
      steps=config.steps,
      warmup_steps=config.warmup_steps,
      min_lr_ratio=config.min_lr_ratio,
  )
  tx = optim.adamw(
      schedule,
      weight_decay=config.weight_decay,
      max_grad_norm=config.max_grad_norm,
      b1=config.b1, b2=config.b2, eps=config.eps,
  )
  opt_state = tx.init(trainable)
  train_step = make_train_step(
      model, tx, grad_accum_steps=config.grad_accum_steps, schedule=schedule
  )
  eval_step = make_eval_step(model)
  eval_batches = list(eval_batches or [])
  base_rng = jax.random.PRNGKey(config.seed)
  batches = iter(train_batches)

  history = []
  with MetricsWriter(config.metrics_path) as writer, _progress_bar(config) as bar:
    start = last = time.perf_counter()
    for step in range(1, config.steps + 1):
      batch = _next_step_batch(batches, step, config)
      real_tokens = int(np.sum(batch["attention_mask"]))

      if step == 1:
        logger.info("Compiling the training step.")
      trainable, opt_state, metrics = train_step(
          trainable, frozen, opt_state, batch, jax.random.fold_in(base_rng, step)
      )
      # NOTE: reading the metrics waits for the step to finish, so the host
      # prepares the next batch only after the device is done with this one.
      metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
      now = time.perf_counter()
      if step == 1:
        logger.info(
            "Compiled and ran the first step in %.1f s; training for %d steps.",
            now - last, config.steps,
        )
      record = _step_record(step, metrics, real_tokens / max(now - last, 1e-9), now - start)

      if _is_eval_step(step, config, eval_batches):
        logger.info("Evaluating held-out loss on %d batches at step %d.", len(eval_batches), step)
        record["eval_loss"] = evaluate(
            eval_step, jaxlora.combine(trainable, frozen), eval_batches
        )
        logger.info("Step %d: eval loss %.4f.", step, record["eval_loss"])
      last = time.perf_counter()

      writer.write(record)
      history.append(record)
      bar.set_postfix(
          loss=f"{record['loss']:.4f}",
          lr=f"{record['lr']:.2e}",
          tok_s=f"{record['tokens_per_s']:.0f}",
          refresh=False,
      )
      bar.update(1)

  logger.info(
      "Trained %d steps in %.1f s; final loss %.4f.",
      config.steps, history[-1]["elapsed_s"], history[-1]["loss"],
  )
  return FitResult(jaxlora.combine(trainable, frozen), history)


def _step_record(step, metrics, tokens_per_s, elapsed_s):
  """Check a step's metrics and return its record for the history and the file."""
  _check_finite(metrics, step)
  if metrics["scored_tokens"] == 0:
    logger.warning(
        "Step %d has no scored tokens (loss_mask is 0 everywhere), so its"
        " gradient is zero.", step,
    )
  return {
      "step": step,
      "loss": metrics["loss"],
      "grad_norm": metrics["grad_norm"],
      "lr": metrics["lr"],
      "scored_tokens": metrics["scored_tokens"],
      "tokens_per_s": tokens_per_s,
      "elapsed_s": elapsed_s,
  }


def _next_step_batch(batches, step, config):
  micro_batches = list(itertools.islice(batches, config.grad_accum_steps))
  if len(micro_batches) < config.grad_accum_steps:
    consumed = (step - 1) * config.grad_accum_steps + len(micro_batches)
    raise ValueError(
        f"The training batches ran out at step {step} of {config.steps}, after"
        f" {consumed} batches; the run needs"
        f" {config.steps * config.grad_accum_steps} (steps * grad_accum_steps)."
        " Pass an iterator that repeats the data, for example over several"
        " epochs, or lower steps."
    )
  return stack_micro_batches(micro_batches)


def _is_eval_step(step, config, eval_batches):
  if not eval_batches:
    return False
  if step == config.steps:
    return True
  return config.eval_every > 0 and step % config.eval_every == 0


def _check_finite(metrics, step):
  for name in ("loss", "grad_norm"):
    if not math.isfinite(metrics[name]):
      raise FloatingPointError(
          f"Training diverged at step {step}: {name} is {metrics[name]}"
          f" (loss {metrics['loss']}, grad_norm {metrics['grad_norm']},"
          f" lr {metrics['lr']:.3g}). Lower learning_rate, set max_grad_norm,"
          " or check the step's batch and the starting parameters for"
          " non-finite values."
      )


@contextlib.contextmanager
def _progress_bar(config):
  """Yield a tqdm bar over the steps; log lines print above it."""
  with contextlib.ExitStack() as stack:
    if config.progress:
      stack.enter_context(tqdm_logging.logging_redirect_tqdm())
    yield stack.enter_context(
        tqdm.tqdm(
            total=config.steps, desc="training", unit="step",
            disable=not config.progress,
        )
    )


def _check_int(name, value, *, minimum, fix):
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name} must be an integer, got {value!r}. {fix}")
  if value < minimum:
    raise ValueError(f"{name} must be at least {minimum}, got {value}. {fix}")


def _check_positive(name, value, *, fix):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}. {fix}")
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}. {fix}")


def _check_range(name, value, low, high, *, fix):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
    raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}. {fix}")

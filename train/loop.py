"""The training loop: partition, place, step, evaluate, log, and join the tree again.

    params -> partition by mode -> (trainable, frozen)
      -> place both on the mesh by the sharding rules
      -> restore trainable and the optimizer state from the latest checkpoint, if any
      -> steps update trainable; frozen is only read
      -> combine(trainable, frozen) -> params (trained, still on the mesh)

One trainer, two modes. In "lora" mode the adapter matrices train and the
optimizer keeps state for them only. The frozen base may be stored in
bfloat16 (`frozen_dtype`) while adapters and their state stay float32. In
"full" mode every weight trains and the optimizer keeps state for all of them.
"""

import contextlib
import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import tqdm
from jax.sharding import Mesh
from tqdm.contrib import logging as tqdm_logging

import jaxlora
from jaxlora import paths
from jaxlora.models import llama
from jaxlora.train import checkpoint
from jaxlora.train import distributed
from jaxlora.train import mesh as mesh_lib
from jaxlora.train import metrics as metrics_lib
from jaxlora.train import optim
from jaxlora.train import resume as resume_lib
from jaxlora.train import sharding as sharding_lib
from jaxlora.train import summary
from jaxlora.train.step import (
    Batch,
    StepShardings,
    evaluate,
    make_eval_step,
    make_train_step,
    stack_micro_batches,
)

logger = logging.getLogger(__name__)

MODES = ("lora", "full")
DTYPES = ("float32", "bfloat16")


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
    seed: seeds dropout: step s uses `fold_in(PRNGKey(seed), s)`. A resumed
      run keeps the key of its checkpoint.
    metrics_path: JSON Lines file that receives one record per step (appended
      to) from the primary process; None writes no file. When a run with
      `checkpoint_dir` and `resume` starts, the records after its starting
      step are dropped first, so the file reads as one run.
    b1: Adam's decay rate for the first moment.
    b2: Adam's decay rate for the second moment.
    eps: Adam's term added to the denominator.
    progress: show a tqdm progress bar.
    mode: "lora" trains the adapters (the tree needs adapters from
      `jaxlora.apply`); "full" trains every weight.
    mesh: axis sizes of the device mesh, such as `{"data": 2, "fsdp": 2,
      "tensor": 2}` (see `train.mesh`); None puts all devices on fsdp.
    compute_dtype: "float32" or "bfloat16", the dtype of activations and
      products; None keeps the model's `dtype`. Weights keep their own dtype.
    frozen_dtype: "lora" mode only: store the frozen base in this dtype
      ("bfloat16" halves its memory); None keeps the dtype it has. Adapters
      and their optimizer state stay float32.
    remat: recompute each layer's activations in the backward pass
      (`jax.checkpoint`); None keeps the model's setting.
    remat_policy: the `jax.checkpoint_policies` name that says what remat
      keeps, such as "nothing_saveable" or "dots_with_no_batch_dims_saveable";
      None keeps the model's.
    checkpoint_dir: folder for orbax checkpoints of the trainable tree, the
      optimizer state, the data position and the run's description
      (`train.resume`); None saves none. Frozen leaves are never saved.
    checkpoint_every: save every this many steps; 0 saves only after the last.
    keep_checkpoints: keep the checkpoints of the last this many saves; 0
      keeps all.
    resume: continue from the latest checkpoint in `checkpoint_dir` if there
      is one. With False, a `checkpoint_dir` that contains a checkpoint raises.
    tensorboard_dir: folder for TensorBoard event files with the scalars
      loss, lr, grad_norm, tokens_per_s and eval_loss, written by the primary
      process; None writes none.
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
  mode: str = "lora"
  mesh: Mapping[str, int] | None = None
  compute_dtype: str | None = None
  frozen_dtype: str | None = None
  remat: bool | None = None
  remat_policy: str | None = None
  checkpoint_dir: str | os.PathLike | None = None
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  resume: bool = True
  tensorboard_dir: str | os.PathLike | None = None

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

    if self.mode not in MODES:
      raise ValueError(f"mode must be 'lora' or 'full', got {self.mode!r}.")
    if self.mesh is not None:
      object.__setattr__(self, "mesh", mesh_lib.check_axis_sizes(self.mesh))
    for name in ("compute_dtype", "frozen_dtype"):
      value = getattr(self, name)
      if value is not None and value not in DTYPES:
        raise ValueError(f"{name} must be 'float32', 'bfloat16' or None, got {value!r}.")
    if self.frozen_dtype is not None and self.mode == "full":
      raise ValueError(
          f"frozen_dtype={self.frozen_dtype!r} applies to the frozen base of"
          " mode='lora'; full mode trains every weight in its own dtype. Drop"
          " frozen_dtype or use mode='lora'."
      )
    if self.remat is not None and not isinstance(self.remat, bool):
      raise ValueError(f"remat must be True, False or None, got {self.remat!r}.")
    if self.remat_policy is not None:
      llama.remat_policy(self.remat_policy)
    _check_int(
        "checkpoint_every", self.checkpoint_every, minimum=0,
        fix="Use 0 to save only after the last step.",
    )
    _check_int(
        "keep_checkpoints", self.keep_checkpoints, minimum=0,
        fix="Use 0 to keep every checkpoint.",
    )
    if not isinstance(self.resume, bool):
      raise ValueError(f"resume must be True or False, got {self.resume!r}.")


class FitResult(NamedTuple):
  """The result of `fit`: the trained tree, the per-step records and the optimizer state.

  Attributes:
    params: the whole trained tree, `jaxlora.combine(trainable, frozen)`,
      placed on the mesh. Its frozen leaves hold the values passed in (cast
      to `frozen_dtype` when that is set).
    history: one dict per step, the records written to `metrics_path`. A
      resumed run's history starts with the records of its earlier steps
      read back from `metrics_path` (none when that is None).
    opt_state: the optimizer state after the last step, built for the
      trainable leaves only and placed like them.
  """

  params: dict[str, Any]
  history: list[dict[str, Any]]
  opt_state: Any = None


def fit(
    model,
    params: Mapping[str, Any],
    train_batches: Iterable[Batch] | Callable[[int], Iterable[Batch]],
    eval_batches: Sequence[Batch] | None,
    config: TrainConfig,
    *,
    trainable_mask: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    rules: sharding_lib.ShardingRules | None = None,
    lora_config: jaxlora.LoraConfig | None = None,
    model_info: Mapping[str, Any] | None = None,
) -> FitResult:
  """Train the trainable leaves of `params` for `config.steps` optimizer steps.

  Every check (mesh, sharding rules against the tree, the checkpoint's run
  description, first batch) runs before anything is compiled. The trainable
  leaves are then copied onto the mesh, so the caller's `params` stay valid
  although the step donates its buffers. Frozen leaves are placed without a
  copy where they already sit as their rule specifies, and are never written.
  A table of the parameters (`train.summary`) is logged once at the start.

  With `config.checkpoint_dir`, a checkpoint is saved every
  `config.checkpoint_every` steps and after the last (see `train.resume` for
  its contents). If the folder contains a checkpoint and `config.resume` is set,
  the run restores it and continues after its step with the same losses, bit
  for bit on CPU, as a run that was never interrupted; a checkpoint at step
  `config.steps` returns its tree without training.

  Each step's record contains `step`, `loss` (token-mean cross entropy of the
  step, in nats), `grad_norm` (before clipping), `lr` (the rate the update
  used), `scored_tokens`, `tokens_per_s` and `elapsed_s` (seconds since the
  first step began), plus `eval_loss` on evaluation steps. `tokens_per_s` counts
  every real token the step processed over all processes, scored or not (the
  sum of `attention_mask`), over the wall time since the previous step ended,
  data loading included and evaluation excluded. The first step's time
  includes compilation.

  In a multi-process run (`train.distributed.initialize`) every process calls
  `fit` with the same tree and settings and its own rows of each batch.

  Args:
    model: the Flax module, such as `jaxlora.models.Llama(config)`. The
      config's `compute_dtype`, `remat` and `remat_policy` replace its fields
      of those names when set, and a model with an `activation_sharding`
      field gets the mesh's hidden-state sharding.
    params: the tree to train, for LoRA with adapters added by `jaxlora.apply`.
    train_batches: an iterable of this process's `[b, T]` batches (dicts with
      `input_ids`, `targets`, `loss_mask`, `attention_mask`) that yields at
      least `config.steps * config.grad_accum_steps` batches, or a callable
      `start_batch -> iterable` that yields the batches from number
      `start_batch` on, such as `lambda start: train.data.train_batches(...,
      start_batch=start)`; resuming requires a callable. On one process b is
      the batch size B; on several, the process's block of rows (see
      `train.distributed.process_train_batches`).
    eval_batches: this process's held-out `[b, T]` batches, as many on every
      process, or None (or empty) for no evaluation.
    config: the run's settings.
    trainable_mask: True where a leaf trains; replaces the mask of
      `config.mode` (the adapters for "lora", `jaxlora.full_mask` for "full").
    mesh: the device mesh; by default built from `config.mesh` over all
      devices. Passing both raises.
    rules: the sharding rules of `params`; by default `llama_rules` for a
      `jaxlora.models.Llama` and replication for any other model.
    lora_config: the config the adapters were added with, stored in every
      checkpoint; None for full fine-tuning.
    model_info: a JSON-serialisable dict that describes the model, such as
      its config dict, stored in every checkpoint.

  Returns:
    `FitResult(params, history, opt_state)`, placed on the mesh; use
    `train.distributed.fetch` to bring them to the host of every process.

  Raises:
    ValueError: for any of these, before the first step unless noted:
      a mesh that does not fit the devices; a sharding rule that does not
      fit the tree or the mesh; a first batch whose rows the mesh cannot
      split; a tree without adapters in "lora" mode; a checkpoint in
      `config.checkpoint_dir` with `config.resume` False, past
      `config.steps`, or saved with another mode, `lora_config`,
      `model_info` or trainable tree (naming what differs); resuming with
      `train_batches` that is not callable; `train_batches` that run out
      before the last step (at that step); a malformed batch.
    FloatingPointError: if the loss or the gradient norm of a step is NaN or
      infinite, or a parameter is when a checkpoint is due, naming the step.
      No checkpoint of that step is written then.
  """
  mesh = _resolve_mesh(mesh, config)
  model = _configure_model(model, config, mesh)
  trainable_mask = _trainable_mask(params, config, trainable_mask)
  rules = _default_rules(model) if rules is None else rules
  shardings = rules.shardings(params, mesh)

  trainable, frozen = jaxlora.partition(params, trainable_mask=trainable_mask)
  trainable_shardings, frozen_shardings = jaxlora.partition(
      shardings, trainable_mask=trainable_mask
  )
  if config.frozen_dtype is not None:
    frozen = _cast_base(frozen, config.frozen_dtype)
  logger.info(
      "Parameters:\n%s",
      summary.parameter_summary(
          jaxlora.combine(trainable, frozen), trainable_mask=trainable_mask
      ),
  )

  run = resume_lib.describe_run(
      mode=config.mode, lora_config=lora_config, model_info=model_info, trainable=trainable
  )
  start = resume_lib.find_start(
      config.checkpoint_dir, run=run, base_rng=jax.random.PRNGKey(config.seed),
      resume=config.resume, steps=config.steps,
  )
  first_step = start.step + 1
  if first_step <= config.steps:
    batches = resume_lib.open_batches(train_batches, start)
    first_batch = _next_step_batch(batches, first_step, config)
    mesh_lib.check_batch_rows(mesh, first_batch["input_ids"].shape[1], name="first training batch")

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
  trainable = sharding_lib.place(trainable, trainable_shardings)
  # The step only reads the frozen leaves, so they need no copy of their own.
  frozen = sharding_lib.place(frozen, frozen_shardings, copy=False)
  step_shardings = StepShardings(
      mesh=mesh,
      trainable=trainable_shardings,
      frozen=frozen_shardings,
      opt_state=sharding_lib.optimizer_shardings(tx, trainable, trainable_shardings, mesh),
  )
  opt_state = jax.jit(tx.init, out_shardings=step_shardings.opt_state)(trainable)
  if start.step:
    _, trainable, opt_state = checkpoint.restore(
        config.checkpoint_dir, trainable=trainable, opt_state=opt_state, step=start.step
    )
  train_step = make_train_step(
      model, tx, grad_accum_steps=config.grad_accum_steps, schedule=schedule,
      shardings=step_shardings,
  )
  eval_step = make_eval_step(model, shardings=step_shardings)
  eval_batches = list(eval_batches or [])

  # A run with checkpoints that may resume rewrites its metrics after its
  # starting step, 0 included, so that they read as one run.
  continues = config.checkpoint_dir is not None and config.resume
  history = []
  if continues and config.metrics_path is not None:
    history = metrics_lib.truncate_metrics(
        config.metrics_path, start.step, rewrite=distributed.is_primary()
    )
  if first_step > config.steps:
    logger.info("The checkpoint of step %d ends the run; nothing left to train.", start.step)
    return FitResult(jaxlora.combine(trainable, frozen), history, opt_state)

  consumed = start.batches
  with contextlib.ExitStack() as stack:
    writer, board = _open_writers(stack, config, purge_step=first_step if continues else None)
    bar = stack.enter_context(_progress_bar(config, initial=start.step))
    start_time = last = time.perf_counter()
    for step in range(first_step, config.steps + 1):
      batch = first_batch if step == first_step else _next_step_batch(batches, step, config)
      consumed += config.grad_accum_steps

      if step == first_step:
        logger.info("Compiling the training step.")
      trainable, opt_state, metrics = train_step(
          trainable, frozen, opt_state, batch, jax.random.fold_in(start.rng, step)
      )
      # NOTE: reading the metrics waits for the step to finish, so the host
      # prepares the next batch only after the device is done with this one.
      metrics = {key: float(value) for key, value in jax.device_get(metrics).items()}
      now = time.perf_counter()
      if step == first_step:
        logger.info(
            "Compiled and ran the first step in %.1f s; training to step %d.",
            now - last, config.steps,
        )
      tokens_per_s = metrics["real_tokens"] / max(now - last, 1e-9)
      record = _step_record(step, metrics, tokens_per_s, now - start_time)

      if _is_eval_step(step, config, eval_batches):
        logger.info("Evaluating held-out loss on %d batches at step %d.", len(eval_batches), step)
        record["eval_loss"] = evaluate(
            eval_step, jaxlora.combine(trainable, frozen), eval_batches
        )
        logger.info("Step %d: eval loss %.4f.", step, record["eval_loss"])
      # The record goes out before the checkpoint, so that a run resumed from
      # this step finds the step's record in the metrics file.
      writer.write(record)
      board.write(record)
      history.append(record)
      if _is_checkpoint_step(step, config):
        resume_lib.save(
            config.checkpoint_dir, step=step, batches=consumed, rng=start.rng, run=run,
            trainable=trainable, opt_state=opt_state, keep=config.keep_checkpoints,
            mesh=mesh,
        )
      last = time.perf_counter()

      bar.set_postfix(
          loss=f"{record['loss']:.4f}",
          lr=f"{record['lr']:.2e}",
          tok_s=f"{record['tokens_per_s']:.0f}",
          refresh=False,
      )
      bar.update(1)

  logger.info(
      "Trained steps %d to %d in %.1f s; final loss %.4f.",
      first_step, config.steps, history[-1]["elapsed_s"], history[-1]["loss"],
  )
  return FitResult(jaxlora.combine(trainable, frozen), history, opt_state)


def _resolve_mesh(mesh, config):
  if mesh is not None and config.mesh is not None:
    raise ValueError(
        f"Both a mesh ({dict(mesh.shape)}) and config.mesh ({config.mesh}) are"
        " given; pass one of them."
    )
  if mesh is not None:
    missing = [name for name in mesh_lib.AXES if name not in mesh.shape]
    if missing:
      raise ValueError(
          f"The mesh has axes {tuple(mesh.axis_names)} but lacks"
          f" {', '.join(missing)}; build it with train.make_mesh."
      )
    return mesh
  return mesh_lib.make_mesh(config.mesh)


def _configure_model(model, config, mesh):
  """Return `model` with the config's dtype and remat settings and the mesh's activation sharding."""
  fields = {field.name for field in dataclasses.fields(model)}
  changes = {}
  for name, value in (
      ("dtype", None if config.compute_dtype is None else jnp.dtype(config.compute_dtype)),
      ("remat", config.remat),
      ("remat_policy", config.remat_policy),
  ):
    if value is None:
      continue
    if name not in fields:
      raise ValueError(
          f"The config sets {name} but {type(model).__name__} has no {name!r}"
          f" field; leave it None for this model."
      )
    changes[name] = value
  if "activation_sharding" in fields:
    changes["activation_sharding"] = mesh_lib.activation_sharding(mesh)
  return model.clone(**changes) if changes else model


def _trainable_mask(params, config, trainable_mask):
  if trainable_mask is not None:
    return trainable_mask
  if config.mode == "full":
    return jaxlora.full_mask(params)
  mask = jaxlora.adapter_mask(params)
  if not any(flag for _, flag in paths.iter_leaves(mask)):
    raise ValueError(
        "mode='lora' but the parameter tree has no LoRA adapters, so nothing"
        " would train. Call jaxlora.apply(params, ...) first, or set"
        " mode='full' to train every weight."
    )
  return mask


def _default_rules(model):
  if isinstance(model, llama.Llama):
    return sharding_lib.llama_rules(model.config)
  logger.info(
      "No sharding rules for %s; every leaf is replicated. Pass rules= to"
      " shard its parameters.", type(model).__name__,
  )
  return sharding_lib.REPLICATED


def _cast_base(frozen, dtype):
  """Cast the frozen floating-point weights to `dtype`; adapter scales stay float32."""

  def cast(path, leaf):
    if path[-2:] == ("lora", "scale") or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return jnp.asarray(leaf, dtype)

  return paths.map_with_path(cast, frozen)


def _is_checkpoint_step(step, config):
  if config.checkpoint_dir is None:
    return False
  if step == config.steps:
    return True
  return config.checkpoint_every > 0 and step % config.checkpoint_every == 0


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


def _open_writers(stack, config, *, purge_step):
  """Open the JSON Lines and TensorBoard writers on `stack`, which write on the primary process only."""
  primary = distributed.is_primary()
  writer = stack.enter_context(
      metrics_lib.MetricsWriter(config.metrics_path if primary else None)
  )
  board = stack.enter_context(
      metrics_lib.TensorBoardWriter(
          config.tensorboard_dir if primary else None, purge_step=purge_step
      )
  )
  return writer, board


@contextlib.contextmanager
def _progress_bar(config, *, initial):
  """Yield a tqdm bar over the steps, starting at `initial`; log lines print above it."""
  with contextlib.ExitStack() as stack:
    if config.progress:
      stack.enter_context(tqdm_logging.logging_redirect_tqdm())
    yield stack.enter_context(
        tqdm.tqdm(
            total=config.steps, initial=initial, desc="training", unit="step",
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

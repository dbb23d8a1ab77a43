"""The jitted training and evaluation steps.

A training step takes the trainable and frozen halves of a partitioned tree
and differentiates with respect to the trainable half only:

    step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state, metrics)

A batch is a dict of arrays with a leading micro-batch axis A, one slice per
gradient accumulation step:

    input_ids       [A, B, T] int32
    targets         [A, B, T] int32    targets[..., t] is the token after input_ids[..., t]
    loss_mask       [A, B, T] float32  1 where targets[..., t] is scored
    attention_mask  [A, B, T] int32    1 for real tokens, 0 for padding

and, for rows that pack several examples, optionally

    positions       [A, B, T] int32    position of each token within its example
    segment_ids     [A, B, T] int32    the example each token belongs to

The loss is the token mean of the cross entropy over the whole step, the sum
of the masked losses over all A micro-batches divided by the number of scored
tokens in all of them. A step with A micro-batches of B rows therefore takes
the same gradient as one step with a single batch of A * B rows.

With `StepShardings`, the step is compiled for a mesh: `jax.jit` places the
trainable and frozen trees, the optimizer state and the batch with its
`in_shardings` and `out_shardings`, and the host batches each process passes
in are assembled into global arrays whose rows are split over data and fsdp.
"""

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import jaxlora
from jaxlora.train import mesh as mesh_lib
from jaxlora.train import optim

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "attention_mask")
PACKING_KEYS = ("positions", "segment_ids")

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepShardings:
  """Where the training step's trees live on a mesh.

  Attributes:
    mesh: the device mesh.
    trainable: a `NamedSharding` per trainable leaf.
    frozen: a `NamedSharding` per frozen leaf.
    opt_state: a `NamedSharding` per leaf of the optimizer state, from
      `train.sharding.optimizer_shardings`.
  """

  mesh: Mesh
  trainable: Any
  frozen: Any
  opt_state: Any

  @property
  def params(self) -> dict[str, Any]:
    """The shardings of the whole tree, `combine(trainable, frozen)`."""
    return jaxlora.combine(self.trainable, self.frozen)


def token_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Compute the summed cross entropy of the scored tokens, in float32.

  Args:
    logits: `[B, T, V]`.
    targets: `[B, T]` token ids. Ids at unscored positions are ignored, even
      when they are out of range (such as -100).
    loss_mask: `[B, T]`, 1 where a token is scored and 0 elsewhere.

  Returns:
    `(loss_sum, token_count)`: the sum of the per-token losses in nats
    weighted by `loss_mask`, and the sum of `loss_mask`. Both are float32
    scalars.
  """
  mask = loss_mask.astype(jnp.float32)
  safe_targets = jnp.where(mask > 0, targets, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), safe_targets
  )
  loss_sum = jnp.sum(jnp.where(mask > 0, losses * mask, 0.0))
  return loss_sum, jnp.sum(mask)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    schedule: optax.Schedule | None = None,
    shardings: StepShardings | None = None,
) -> Callable[..., tuple[dict[str, Any], Any, Metrics]]:
  """Build the jitted training step.

  Gradient accumulation runs as a `jax.lax.scan` over the A micro-batches
  inside the step, not as `optax.MultiSteps`. The scan sums the unnormalised
  gradients in float32 and divides once by the token count of the whole step,
  which is the big-batch gradient exactly. MultiSteps would average per-micro-batch
  means and weigh a micro-batch with few scored tokens as much as a full one.

  The trainable tree and the optimizer state are donated: the arrays passed in
  are invalid after the call, and the step returns their replacements. The
  frozen tree is only read.

  Args:
    model: a Linen module called as `model.apply({"params": params},
      input_ids, attention_mask=..., deterministic=..., rngs=...)` that
      returns logits `[B, T, V]`, with a `lora_dropout` field, such as
      `jaxlora.models.Llama`. Dropout is on during training when
      `model.lora_dropout > 0`.
    tx: the optimizer, initialised with `tx.init(trainable)`.
    grad_accum_steps: A, the number of micro-batches per step, which must be
      the batch's leading axis.
    schedule: the learning rate schedule inside `tx`. When given, the metrics
      report the rate this step's update used.
    shardings: compile the step for this placement. The trees and the state
      must already be placed there (`train.sharding.place`); the batch is
      each process's rows as host arrays and `rng` a host key, both turned
      into global arrays by the step. None compiles for the arrays' own
      devices.

  Returns:
    `step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state,
    metrics)`, where `rng` seeds dropout and metrics contains float32 scalars:
    `loss` (token-mean cross entropy in nats), `grad_norm` (global L2 norm of
    the gradient before clipping), `scored_tokens`, `real_tokens` (the sum of
    `attention_mask` over the whole batch) and, with a schedule, `lr`.

  Raises:
    ValueError: if `grad_accum_steps` is below 1, or (when the step is first
      called) if the batch lacks a key or its arrays are not `[A, B, T]`.
  """
  if grad_accum_steps < 1:
    raise ValueError(
        f"grad_accum_steps must be at least 1, got {grad_accum_steps}."
    )
  use_dropout = model.lora_dropout > 0

  def loss_sum_fn(trainable, frozen, micro_batch, rng):
    params = jaxlora.combine(trainable, frozen)
    logits = model.apply(
        {"params": params},
        micro_batch["input_ids"],
        attention_mask=micro_batch["attention_mask"],
        deterministic=not use_dropout,
        rngs={"dropout": rng} if use_dropout else None,
        **_packing_inputs(micro_batch),
    )
    return token_cross_entropy(
        logits, micro_batch["targets"], micro_batch["loss_mask"]
    )

  grad_fn = jax.value_and_grad(loss_sum_fn, has_aux=True)

  def accumulate(trainable, frozen, batch, rng):
    """Return the loss sum, token count and gradient sum over the A micro-batches."""

    def add_micro_batch(carry, inputs):
      grad_sum, loss_sum, count = carry
      micro_batch, micro_rng = inputs
      (micro_loss, micro_count), grads = grad_fn(
          trainable, frozen, micro_batch, micro_rng
      )
      grad_sum = jax.tree.map(
          lambda total, g: total + g.astype(jnp.float32), grad_sum, grads
      )
      return (grad_sum, loss_sum + micro_loss, count + micro_count), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    init = (zeros, jnp.float32(0.0), jnp.float32(0.0))
    rngs = jax.random.split(rng, grad_accum_steps)
    (grad_sum, loss_sum, count), _ = jax.lax.scan(add_micro_batch, init, (batch, rngs))
    return loss_sum, count, grad_sum

  def step(trainable, frozen, opt_state, batch, rng):
    batch = _check_batch(batch, grad_accum_steps)
    if grad_accum_steps == 1:
      # Without accumulation there is no float32 gradient buffer to carry,
      # which saves one trainable-sized array.
      micro_batch = jax.tree.map(lambda x: x[0], batch)
      (loss_sum, count), grad_sum = grad_fn(trainable, frozen, micro_batch, rng)
    else:
      loss_sum, count, grad_sum = accumulate(trainable, frozen, batch, rng)

    # A step without scored tokens gets a zero gradient and reports loss 0.
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(
        lambda g, x: (g / denominator).astype(x.dtype), grad_sum, trainable
    )

    metrics = {
        "loss": loss_sum / denominator,
        "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
        "scored_tokens": count,
        "real_tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
    }
    if schedule is not None:
      metrics["lr"] = jnp.asarray(
          schedule(optim.schedule_count(opt_state)), jnp.float32
      )

    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, metrics

  if shardings is None:
    return jax.jit(step, donate_argnums=(0, 2))

  replicated = mesh_lib.replicated(shardings.mesh)
  batch_sharding = mesh_lib.batch_sharding(shardings.mesh, ndim=3)
  jitted = jax.jit(
      step,
      in_shardings=(
          shardings.trainable, shardings.frozen, shardings.opt_state,
          batch_sharding, replicated,
      ),
      out_shardings=(shardings.trainable, shardings.opt_state, replicated),
      donate_argnums=(0, 2),
  )

  def sharded_step(trainable, frozen, opt_state, batch, rng):
    batch = mesh_lib.global_batch(batch_sharding, _check_batch(batch, grad_accum_steps))
    rng = mesh_lib.replicate(shardings.mesh, rng)
    return jitted(trainable, frozen, opt_state, batch, rng)

  return sharded_step


def make_eval_step(
    model,
    *,
    shardings: StepShardings | None = None,
) -> Callable[[Mapping[str, Any], Batch], tuple[jax.Array, jax.Array]]:
  """Build the jitted evaluation step `(params, batch) -> (loss_sum, token_count)`.

  `params` is the whole tree (`jaxlora.combine(trainable, frozen)`) and the
  batch arrays are `[B, T]`, with the keys of a training batch. The model runs
  deterministically (no dropout). With `shardings`, `params` must be placed
  as `shardings.params` says and each process passes its own rows of the
  batch, as for the training step.
  """

  def eval_step(params, batch):
    batch = _check_batch(batch, None)
    logits = model.apply(
        {"params": params},
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        deterministic=True,
        **_packing_inputs(batch),
    )
    return token_cross_entropy(logits, batch["targets"], batch["loss_mask"])

  if shardings is None:
    return jax.jit(eval_step)

  replicated = mesh_lib.replicated(shardings.mesh)
  batch_sharding = mesh_lib.batch_sharding(shardings.mesh, ndim=2)
  jitted = jax.jit(
      eval_step,
      in_shardings=(shardings.params, batch_sharding),
      out_shardings=replicated,
  )

  def sharded_eval_step(params, batch):
    return jitted(params, mesh_lib.global_batch(batch_sharding, _check_batch(batch, None)))

  return sharded_eval_step


def evaluate(
    eval_fn: Callable[[Mapping[str, Any], Batch], tuple[jax.Array, jax.Array]],
    params: Mapping[str, Any],
    batches: Iterable[Batch],
) -> float:
  """Return the token-weighted mean loss of `params` over `batches`, in nats.

  Each batch contributes its summed loss and its scored-token count, so a
  batch with twice the scored tokens weighs twice as much.

  Raises:
    ValueError: if `batches` contain no scored token.
  """
  loss_sum = 0.0
  count = 0.0
  for batch in batches:
    batch_loss, batch_count = jax.device_get(eval_fn(params, batch))
    loss_sum += float(batch_loss)
    count += float(batch_count)

  if count == 0:
    raise ValueError(
        "The evaluation batches contain no scored token (loss_mask is 0"
        " everywhere, or there are no batches). Pass held-out batches whose"
        " loss_mask marks the tokens to score."
    )
  return loss_sum / count


def _check_batch(batch, grad_accum_steps):
  """Check keys and shapes at trace time; `grad_accum_steps=None` means `[B, T]`."""
  missing = [key for key in BATCH_KEYS if key not in batch]
  if missing:
    raise ValueError(
        f"The batch is missing {', '.join(missing)}; it has {', '.join(sorted(batch))}."
        f" A batch needs the keys {', '.join(BATCH_KEYS)}."
    )

  keys = BATCH_KEYS + tuple(key for key in PACKING_KEYS if key in batch)
  shapes = {key: tuple(batch[key].shape) for key in keys}
  if len(set(shapes.values())) != 1:
    raise ValueError(
        f"The batch arrays differ in shape: {shapes}. All of them must have"
        " the same shape."
    )
  shape = shapes["input_ids"]
  if grad_accum_steps is None:
    if len(shape) != 2:
      raise ValueError(
          f"An evaluation batch must be [B, T], got input_ids of shape {shape}."
      )
  elif len(shape) != 3 or shape[0] != grad_accum_steps:
    raise ValueError(
        f"A training batch must be [A, B, T] with A = grad_accum_steps ="
        f" {grad_accum_steps}, got input_ids of shape {shape}. Stack"
        f" {grad_accum_steps} micro-batches with train.stack_micro_batches."
    )
  return {key: batch[key] for key in keys}


def _packing_inputs(batch):
  """Return the model keyword arguments of a packed batch's extra keys."""
  return {key: batch[key] for key in PACKING_KEYS if key in batch}


def stack_micro_batches(batches: list[Batch]) -> dict[str, Any]:
  """Stack A micro-batches `[B, T]` into one step's batch `[A, B, T]` (numpy).

  Micro-batches shorter than the longest are padded on the right with zeros in
  every array, which marks the padding as neither real nor scored.

  Raises:
    ValueError: if `batches` is empty, lacks a key, or the micro-batches have
      different numbers of rows.
  """
  if not batches:
    raise ValueError("stack_micro_batches needs at least one micro-batch.")
  batches = [
      _check_batch({key: np.asarray(value) for key, value in batch.items()}, None)
      for batch in batches
  ]
  rows = {batch["input_ids"].shape[0] for batch in batches}
  if len(rows) != 1:
    raise ValueError(
        f"The micro-batches have different numbers of rows, {sorted(rows)};"
        " every micro-batch of a step must have the same batch size B."
    )

  length = max(batch["input_ids"].shape[1] for batch in batches)
  keys = set(map(frozenset, batches))
  if len(keys) != 1:
    raise ValueError(
        "The micro-batches have different keys; either all or none carry"
        f" {' and '.join(PACKING_KEYS)}."
    )
  stacked = {}
  for key in batches[0]:
    padded = [
        np.pad(batch[key], ((0, 0), (0, length - batch[key].shape[1])))
        for batch in batches
    ]
    stacked[key] = np.stack(padded)
  return stacked

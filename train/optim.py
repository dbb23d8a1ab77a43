"""The training optimizer: AdamW on a warmup-cosine schedule, with clipping.

    update = -lr(step) * (adam(clip(g)) + weight_decay * w)   decay on matrices only

The optimizer is built for the trainable half of a partitioned tree
(`tx.init(trainable)`), so frozen leaves never get optimizer state.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora import paths

# Leaf names of the weight matrices that weight decay applies to: dense
# kernels, the token embedding, and the adapter matrices A and B. Norm scales,
# biases and adapter scales are left undecayed.
DECAYED_LEAVES = ("kernel", "embedding", "a", "b")


def learning_rate_schedule(
    learning_rate: float,
    *,
    steps: int,
    warmup_steps: int,
    min_lr_ratio: float,
) -> optax.Schedule:
  """Build a linear warmup followed by a cosine decay to a floor.

  With peak `lr`, warmup `W`, total `S` steps and floor `m * lr`:

      lr(s) = lr * s / W                                        for s < W
      lr(s) = m*lr + (1 - m)*lr * (1 + cos(pi * (s - W) / (S - W))) / 2
                                                                for W <= s <= S
      lr(s) = m * lr                                            for s > S

  The update at step `s` (counted from 0) uses `lr(s)`, so the first update of
  a run with warmup uses a learning rate of 0. With `W == S` the rate stays at
  the peak after warmup.

  Args:
    learning_rate: the peak learning rate, reached at the end of warmup.
    steps: total number of optimizer steps S.
    warmup_steps: number of warmup steps W, in [0, S].
    min_lr_ratio: the floor as a fraction m of the peak, in [0, 1].

  Returns:
    A function from the step count (an integer array) to a float32 rate.
  """
  peak = float(learning_rate)
  floor = peak * float(min_lr_ratio)
  decay_steps = steps - warmup_steps

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warmup = peak * count / max(warmup_steps, 1)
    if decay_steps == 0:
      decay = jnp.full_like(count, peak)
    else:
      progress = jnp.clip((count - warmup_steps) / decay_steps, 0.0, 1.0)
      decay = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup_steps, warmup, decay)

  return schedule


def decay_mask(params: Mapping[str, Any]) -> dict[str, Any]:
  """Return a tree of booleans, True at the matrices that weight decay applies to.

  A leaf is decayed when its name is in `DECAYED_LEAVES`. The test is by name,
  not by rank, because a norm scale stacked over L layers is `[L, D]`.
  """
  return paths.map_with_path(lambda path, _: path[-1] in DECAYED_LEAVES, params)


def adamw(
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    max_grad_norm: float | None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Build AdamW with global-norm gradient clipping and decay on matrices only.

  Args:
    schedule: the learning rate per step, from `learning_rate_schedule`.
    weight_decay: decoupled weight decay coefficient, applied to the leaves
      that `decay_mask` marks.
    max_grad_norm: clip the gradient to this global L2 norm before Adam
      receives it; None turns clipping off.
    b1: Adam's decay rate for the first moment.
    b2: Adam's decay rate for the second moment.
    eps: Adam's term added to the denominator.

  Returns:
    An optax transformation; initialise it with the trainable half of the
    tree only, `tx.init(trainable)`.
  """
  steps = []
  if max_grad_norm is not None:
    steps.append(optax.clip_by_global_norm(max_grad_norm))
  steps.append(
      optax.adamw(
          schedule, b1=b1, b2=b2, eps=eps,
          weight_decay=weight_decay, mask=decay_mask,
      )
  )
  return optax.chain(*steps)


def schedule_count(opt_state: Any) -> jax.Array:
  """Return the number of updates applied so far, read from the schedule's state.

  Raises:
    ValueError: if `opt_state` contains no `optax.ScaleByScheduleState`, as when
      the optimizer was built with a constant learning rate.
  """
  states = [
      leaf
      for leaf in jax.tree.leaves(
          opt_state,
          is_leaf=lambda node: isinstance(node, optax.ScaleByScheduleState),
      )
      if isinstance(leaf, optax.ScaleByScheduleState)
  ]
  if len(states) != 1:
    raise ValueError(
        "Expected one learning rate schedule in the optimizer state, found"
        f" {len(states)}. Build the optimizer with"
        " train.adamw(learning_rate_schedule(...)), or pass schedule=None."
    )
  return states[0].count

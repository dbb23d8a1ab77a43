"""optax transformations restricted to the trainable leaves."""

from collections.abc import Mapping
from typing import Any

import jax
import optax

TRAINABLE = "trainable"
FROZEN = "frozen"


def optimizer(
    tx: optax.GradientTransformation,
    *,
    trainable_mask: Mapping[str, Any],
) -> optax.GradientTransformation:
  """Wrap `tx` so that it updates only the leaves where `trainable_mask` is True.

  Frozen leaves get zero updates and carry no optimizer state: their slots in
  the state hold `optax.MaskedNode()`, not arrays.

  Args:
    tx: the optimizer for trainable leaves, for example `optax.adamw(1e-4)`.
    trainable_mask: a tree of booleans with the structure of the parameters,
      such as `jaxlora.adapter_mask(params)` or `jaxlora.full_mask(params)`.

  Example:
    >>> params = jaxlora.apply(base_params, rank=16)
    >>> tx = jaxlora.optimizer(optax.adamw(1e-4),
    ...                        trainable_mask=jaxlora.adapter_mask(params))
    >>> state = tx.init(params)
  """
  labels = jax.tree.map(lambda flag: TRAINABLE if flag else FROZEN, trainable_mask)
  return optax.multi_transform(
      {TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels
  )

"""Parameter counts, reported as peft reports them."""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from jaxlora import paths
from jaxlora.partition import adapter_mask


class ParameterCount(NamedTuple):
  trainable: int
  total: int


def count_parameters(
    params: Mapping[str, Any],
    *,
    trainable_mask: Mapping[str, Any] | None = None,
) -> ParameterCount:
  """Count trainable and total parameters, adapters included in the total.

  Adapter scales are hyperparameters stored as leaves and are not counted.

  Args:
    params: a nested dict of arrays (or of `jax.ShapeDtypeStruct`).
    trainable_mask: True where a leaf is trainable; defaults to the adapters.
  """
  mask = adapter_mask(params) if trainable_mask is None else trainable_mask
  flags = dict(paths.iter_leaves(mask))

  trainable = total = 0
  for path, leaf in paths.iter_leaves(params):
    if path[-2:] == ("lora", "scale"):
      continue
    size = math.prod(leaf.shape)
    total += size
    if flags[path]:
      trainable += size
  return ParameterCount(trainable, total)


def format_trainable_parameters(count: ParameterCount) -> str:
  """Return the summary line in peft's format."""
  percent = 100 * count.trainable / count.total if count.total else 0.0
  return (
      f"trainable params: {count.trainable:,d} || all params: {count.total:,d}"
      f" || trainable%: {percent:.4f}"
  )


def print_trainable_parameters(
    params: Mapping[str, Any],
    *,
    trainable_mask: Mapping[str, Any] | None = None,
) -> None:
  """Print peft's summary line, for example
  `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`.
  """
  count = count_parameters(params, trainable_mask=trainable_mask)
  print(format_trainable_parameters(count))

"""A table of a parameter tree's modules: size, dtype, shape and trainability.

    Module                              Parameters  Dtype    Status     Shape
    model.embed_tokens                       1,464  float32  frozen     embedding [61, 24]
    model.layers.self_attn.q_proj            1,536  float32  frozen     kernel [2, 24, 32]
    model.layers.self_attn.q_proj.lora         448  float32  trainable  a [2, 24, 4], b [2, 4, 32]
    ...
    Total                                   14,184
    Trainable                                  768
    Frozen                                  13,416
    trainable params: 768 || all params: 14,184 || trainable%: 5.4146

A row groups the leaves of one module that share a dtype and a status, so an
adapter gets its own row below the kernel it adapts. Adapter scales are
hyperparameters stored as leaves and are left out, as
`jaxlora.count_parameters` leaves them out, so the totals match its count
and the last line is peft's.
"""

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

import jaxlora
from jaxlora import paths

HEADER = ("Module", "Parameters", "Dtype", "Status", "Shape")


def parameter_summary(
    params: Mapping[str, Any],
    *,
    trainable_mask: Mapping[str, Any],
) -> str:
  """Format the table of `params`, one row per module, dtype and status.

  Args:
    params: a nested dict of arrays (or of `jax.ShapeDtypeStruct`).
    trainable_mask: a tree of booleans with the structure of `params`, True
      where a leaf trains.

  Returns:
    The table, the totals and peft's trainable-parameters line, joined by
    newlines, without a trailing newline.
  """
  flags = dict(paths.iter_leaves(trainable_mask))
  groups = {}
  for path, leaf in paths.iter_leaves(params):
    if path[-2:] == ("lora", "scale"):
      continue
    status = "trainable" if flags[path] else "frozen"
    key = (paths.module_name(path[:-1]), jnp.dtype(leaf.dtype).name, status)
    groups.setdefault(key, []).append((str(path[-1]), tuple(leaf.shape)))

  rows = [HEADER]
  for (module, dtype, status), leaves in groups.items():
    count = sum(math.prod(shape) for _, shape in leaves)
    shapes = ", ".join(f"{name} [{', '.join(map(str, shape))}]" for name, shape in leaves)
    rows.append((module, f"{count:,d}", dtype, status, shapes))

  widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
  lines = [_format_row(row, widths) for row in rows]

  # The totals end where the Parameters column ends.
  count = jaxlora.count_parameters(params, trainable_mask=trainable_mask)
  width = widths[0] + 2 + widths[1]
  for label, value in (
      ("Total", count.total),
      ("Trainable", count.trainable),
      ("Frozen", count.total - count.trainable),
  ):
    lines.append(label + f"{value:,d}".rjust(width - len(label)))
  lines.append(jaxlora.format_trainable_parameters(count))
  return "\n".join(lines)


def _format_row(row, widths):
  """Pad each cell to its column's width; the Parameters column aligns right."""
  cells = [
      cell.rjust(widths[column]) if column == 1 else cell.ljust(widths[column])
      for column, cell in enumerate(row)
  ]
  return "  ".join(cells).rstrip()

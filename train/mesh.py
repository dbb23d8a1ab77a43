"""The device mesh: three named axes, data, fsdp and tensor.

    data     batch rows; parameters are replicated along it
    fsdp     batch rows too, and the parameters are sharded along it
             (fully sharded data parallelism: each device stores a slice and
             the compiler gathers a kernel where a product needs it whole)
    tensor   attention heads, MLP width and vocabulary (tensor parallelism)

A mesh is built from a dict of axis sizes such as `{"data": 2, "fsdp": 2,
"tensor": 2}`. A missing axis has size 1 and one axis may be -1, which takes
the devices that the other axes leave. The batch axis B of every batch is
split over `("data", "fsdp")`, so B must be a multiple of their product.
"""

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_MESH = {"fsdp": -1}


def check_axis_sizes(axis_sizes: Mapping[str, int] | None) -> dict[str, int]:
  """Check the names and sizes of a mesh dict without counting devices.

  Returns:
    A copy of `axis_sizes`, or of `DEFAULT_MESH` when it is None.

  Raises:
    ValueError: for an unknown axis name, or a size that is not a positive
      integer or -1.
  """
  if axis_sizes is None:
    return dict(DEFAULT_MESH)
  if not isinstance(axis_sizes, Mapping):
    raise ValueError(
        f"mesh must be a dict of axis sizes, such as {{'data': 2, 'fsdp': 2,"
        f" 'tensor': 2}}, got {axis_sizes!r}."
    )
  axis_sizes = dict(axis_sizes)
  unknown = sorted(set(axis_sizes) - set(AXES), key=str)
  if unknown:
    raise ValueError(
        f"Unknown mesh axis {', '.join(map(repr, unknown))} in {axis_sizes}."
        f" The mesh axes are {', '.join(AXES)}."
    )
  for name, size in axis_sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(
          f"Mesh axis {name!r} has size {size!r}; use a positive integer, or -1"
          " for the devices that the other axes leave."
      )
  return axis_sizes


def mesh_shape(
    axis_sizes: Mapping[str, int] | None,
    device_count: int,
) -> dict[str, int]:
  """Resolve `axis_sizes` into the size of each of the three axes.

  Args:
    axis_sizes: sizes keyed by axis name; a missing axis has size 1 and one
      axis may be -1. None means `DEFAULT_MESH`, every device on fsdp.
    device_count: the number of devices the mesh must use.

  Returns:
    `{"data": ..., "fsdp": ..., "tensor": ...}` whose product is
    `device_count`.

  Raises:
    ValueError: for an unknown axis name, a size that is not a positive
      integer or -1, more than one -1, or sizes whose product is not
      `device_count`.
  """
  axis_sizes = check_axis_sizes(axis_sizes)
  shape = {name: axis_sizes.get(name, 1) for name in AXES}
  free = [name for name, size in shape.items() if size == -1]
  if len(free) > 1:
    raise ValueError(
        f"Mesh {axis_sizes} has {len(free)} axes of size -1; at most one axis"
        " may take the remaining devices."
    )
  fixed = math.prod(size for size in shape.values() if size != -1)
  if free:
    if device_count % fixed:
      raise ValueError(
          f"Mesh {axis_sizes}: the fixed axes use {fixed} devices, which does"
          f" not divide the {device_count} devices, so -1 has no integer size."
          f" Use fixed sizes whose product divides {device_count}."
      )
    shape[free[0]] = device_count // fixed
  elif fixed != device_count:
    raise ValueError(
        f"Mesh {axis_sizes} uses {fixed} devices, but there are {device_count}."
        f" Make the sizes multiply to {device_count}, or set one axis to -1."
    )
  return shape


def make_mesh(
    axis_sizes: Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
  """Build a mesh with the axes data, fsdp and tensor.

  Args:
    axis_sizes: sizes keyed by axis name, as in `mesh_shape`.
    devices: the devices to use; all devices of all processes by default.

  Returns:
    A `jax.sharding.Mesh` whose axes are automatic (the compiler propagates
    shardings between the constraints the training step sets).

  Raises:
    ValueError: see `mesh_shape`.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(axis_sizes, len(devices))
  mesh = jax.make_mesh(
      tuple(shape.values()), AXES,
      axis_types=(AxisType.Auto,) * len(AXES), devices=devices,
  )
  logger.info(
      "Mesh %s over %d devices (%s).",
      ", ".join(f"{name}={size}" for name, size in shape.items()),
      len(devices), devices[0].platform,
  )
  return mesh


def batch_shards(mesh: Mesh) -> int:
  """Return the number of slices a batch's rows are split into, data * fsdp."""
  return math.prod(mesh.shape[name] for name in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  """Return the sharding that keeps a whole copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Return the sharding of a batch array, with its rows B split over data and fsdp.

  For `ndim=2` the array is `[B, T]`; for `ndim=3` it is a training batch
  `[A, B, T]` whose leading micro-batch axis A stays whole.

  Raises:
    ValueError: if `ndim` is not 2 or 3.
  """
  if ndim not in (2, 3):
    raise ValueError(f"A batch array is [B, T] or [A, B, T], got ndim={ndim}.")
  leading = (None,) * (ndim - 2)
  return NamedSharding(mesh, PartitionSpec(*leading, BATCH_AXES, None))


def activation_sharding(mesh: Mesh) -> NamedSharding:
  """Return the sharding of hidden states `[B, T, D]` between decoder layers.

  Rows are split like the batch; tokens and width stay whole on each device,
  so tensor parallelism splits only the insides of a layer.
  """
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None, None))


def process_batch_slot(mesh: Mesh) -> tuple[int, int]:
  """Return `(slot, slot_count)`: which block of a global batch's rows this process feeds.

  The rows B of a global batch are cut into `slot_count` equal blocks of
  consecutive rows, and this process's devices hold block `slot`. Processes
  whose devices hold the same rows (for example when the tensor axis spans
  processes) share a slot and must feed identical rows. On one process the
  result is `(0, 1)`.

  Raises:
    ValueError: if this process's devices have rows that are not one block of
      consecutive rows, which happens only with a hand-made device order;
      build the mesh with `make_mesh`.
  """
  shards = batch_shards(mesh)
  index_map = batch_sharding(mesh).addressable_devices_indices_map((shards, 1))
  rows = sorted({index[0].indices(shards)[0] for index in index_map.values()})
  start, count = rows[0], len(rows)
  if rows != list(range(start, start + count)) or shards % count or start % count:
    raise ValueError(
        f"Process {jax.process_index()} has batch rows {rows} of {shards}, not one"
        " block of consecutive rows. Build the mesh with train.make_mesh, which"
        " keeps each process's devices together."
    )
  return start // count, shards // count


def global_batch(sharding: NamedSharding, local: Mapping[str, Any]) -> dict[str, jax.Array]:
  """Assemble each process's rows into global batch arrays split by `sharding`.

  Args:
    sharding: `batch_sharding(mesh, ndim)` of the arrays.
    local: this process's arrays (numpy), each `[..., b, T]` with b rows, the
      block `process_batch_slot` names. On one process, the whole batch.

  Returns:
    The global arrays, `[..., b * slot_count, T]`.

  Raises:
    ValueError: if b is not a multiple of the number of row shards this
      process has, data * fsdp divided by `slot_count`.
  """
  _, slot_count = process_batch_slot(sharding.mesh)
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    rows = value.shape[-2]
    check_batch_rows(sharding.mesh, rows, name=f"{key} {value.shape}")
    global_shape = value.shape[:-2] + (rows * slot_count, value.shape[-1])
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def check_batch_rows(mesh: Mesh, rows: int, *, name: str = "batch") -> None:
  """Raise unless this process's `rows` split evenly over its row shards.

  Args:
    mesh: the mesh.
    rows: the rows b this process feeds per batch.
    name: what is checked, for the message.

  Raises:
    ValueError: if b is not a multiple of the row shards this process has,
      data * fsdp divided by the number of process blocks.
  """
  _, slot_count = process_batch_slot(mesh)
  local_shards = batch_shards(mesh) // slot_count
  if rows % local_shards:
    raise ValueError(
        f"The {name} has {rows} rows per process, which the {local_shards} row"
        f" shards of this process (mesh data * fsdp = {batch_shards(mesh)} over"
        f" {slot_count} process blocks) cannot split evenly. Use a batch size"
        f" that is a multiple of {local_shards * slot_count}."
    )


def replicate(mesh: Mesh, value: Any) -> jax.Array:
  """Return `value`, a host array equal on every process, copied to every device."""
  value = np.asarray(value)
  return jax.make_array_from_process_local_data(replicated(mesh), value, value.shape)

"""Training checkpoints: the trainable tree, the optimizer state and the step.

    directory/step_00000300/    one orbax checkpoint per saved step

Frozen leaves are not saved: in LoRA mode they are the base model, which is
loaded from its own files. orbax writes each checkpoint into a temporary
folder beside its target and renames it when every process has finished, so
an interrupted save leaves no folder that `restore` would read. In a
multi-process run every process calls `save` and `restore` with its own
shards, each array is written once, and the checkpoint restores onto any
other mesh, a single device included.
"""

import logging
import os
import re
from typing import Any

import jax
import numpy as np
from etils import epath

logger = logging.getLogger(__name__)

STEP_PREFIX = "step_"
STEP_FOLDER = re.compile(rf"{STEP_PREFIX}(\d+)")


def step_path(directory: str | os.PathLike, step: int) -> epath.Path:
  """Return the folder of `step`'s checkpoint inside `directory`."""
  return epath.Path(directory) / f"{STEP_PREFIX}{step:08d}"


def save(
    directory: str | os.PathLike,
    step: int,
    trainable: Any,
    opt_state: Any,
) -> epath.Path:
  """Write the trainable tree, the optimizer state and the step count.

  Every process of a multi-process run must call it with the same arguments;
  it returns when the checkpoint is complete.

  Args:
    directory: the folder of the run's checkpoints; created if missing.
    step: the number of optimizer steps taken.
    trainable: the trainable tree, possibly sharded over a mesh.
    opt_state: the optimizer state of `trainable`.

  Returns:
    The checkpoint's folder, `step_path(directory, step)`.

  Raises:
    ValueError: if `step` is negative or that step's folder already exists.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an integer >= 0, got {step!r}.")
  path = step_path(directory, int(step))
  if path.exists():
    raise ValueError(
        f"{path} already contains a checkpoint. Save into another directory, or"
        " delete the old checkpoint first."
    )

  tree = {"step": np.asarray(step, np.int64), "trainable": trainable, "opt_state": opt_state}
  with _orbax().StandardCheckpointer() as checkpointer:
    checkpointer.save(path.absolute(), tree)
    checkpointer.wait_until_finished()
  logger.info("Saved the checkpoint of step %d to %s.", step, path)
  return path


def latest_step(directory: str | os.PathLike) -> int | None:
  """Return the highest step saved in `directory`, or None if there is none."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return None
  steps = [
      int(match.group(1))
      for child in directory.iterdir()
      if (match := STEP_FOLDER.fullmatch(child.name)) and child.is_dir()
  ]
  return max(steps, default=None)


def restore(
    directory: str | os.PathLike,
    *,
    trainable: Any,
    opt_state: Any,
    step: int | None = None,
) -> tuple[int, Any, Any]:
  """Read a checkpoint back onto the placement of the given targets.

  Args:
    directory: the folder `save` wrote into.
    trainable: a tree like the saved one, of arrays or `jax.ShapeDtypeStruct`s;
      each restored leaf gets its target's shape, dtype and sharding.
    opt_state: the same for the optimizer state, such as
      `jax.eval_shape(tx.init, trainable)` with shardings set.
    step: the step to read; the latest in `directory` by default.

  Returns:
    `(step, trainable, opt_state)`.

  Raises:
    ValueError: if `directory` contains no checkpoint (or none for `step`), or
      the checkpoint's trees do not match the targets.
  """
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise ValueError(
          f"{os.fspath(directory)} contains no checkpoint (no {STEP_PREFIX}N folder)."
          " Pass the directory that train.checkpoint.save wrote into."
      )
  path = step_path(directory, step)
  if not path.is_dir():
    raise ValueError(
        f"No checkpoint of step {step} in {os.fspath(directory)}; the latest is"
        f" {latest_step(directory)}."
    )

  target = {
      "step": jax.ShapeDtypeStruct((), np.int64),
      "trainable": _abstract(trainable),
      "opt_state": _abstract(opt_state),
  }
  with _orbax().StandardCheckpointer() as checkpointer:
    try:
      restored = checkpointer.restore(path.absolute(), target)
    except (ValueError, KeyError) as error:
      raise ValueError(
          f"The checkpoint at {path} does not match the target trees ({error})."
          " Build the targets from the same model, mode, adapters and optimizer"
          " as the run that saved it."
      ) from error
  logger.info("Restored the checkpoint of step %d from %s.", step, path)
  return int(restored["step"]), restored["trainable"], restored["opt_state"]


def _orbax():
  """Import orbax on first use.

  Importing orbax logs through absl, which calls `logging.basicConfig()` and
  so turns a later `basicConfig(level=...)` in the caller's script into a
  no-op. Importing it here keeps `import jaxlora.train` free of that effect.
  """
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel

  return orbax.checkpoint


def _abstract(tree):
  """Return `tree` with each array replaced by its shape, dtype and sharding."""

  def describe(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    if isinstance(leaf, jax.Array):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    array = np.asarray(leaf)
    return jax.ShapeDtypeStruct(array.shape, array.dtype)

  return jax.tree.map(describe, tree)

"""Training checkpoints: the trainable tree, the optimizer state and a JSON metadata item.

    directory/step_00000300/            one complete checkpoint per saved step
        trainable/  opt_state/          orbax array items
        metadata/                       orbax JSON item, the caller's dict
    directory/step_00000300.partial/    a save in progress, or one a kill interrupted
    directory/step_00000100.deleted/    an old checkpoint being removed

Frozen leaves are not saved: in LoRA mode they are the base model, which is
loaded from its own files. `save` has orbax write the whole checkpoint into
the `.partial` folder and renames that folder to its step folder once every
process has finished writing, so a step folder is always complete. Only step
folders are ever read, and `remove_leftovers` deletes what an interrupted save
or removal left behind. In a multi-process run every process calls `save` and
`restore` with its own shards, each array is written once, and the checkpoint
restores onto any other mesh, a single device included.

NOTE: the commit is a directory rename, which is atomic on local and POSIX
file systems but not on object stores such as GCS.
"""

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxlora.train import distributed

logger = logging.getLogger(__name__)

STEP_PREFIX = "step_"
STEP_FOLDER = re.compile(rf"{STEP_PREFIX}(\d+)")
PARTIAL_SUFFIX = ".partial"
DELETED_SUFFIX = ".deleted"
# Folders left by an interrupted save or removal. orbax's own temporary folder
# is named after its target, so it starts with the `.partial` name too.
LEFTOVER_FOLDER = re.compile(
    rf"{STEP_PREFIX}\d+(?:{re.escape(PARTIAL_SUFFIX)}|{re.escape(DELETED_SUFFIX)}).*"
)


def step_path(directory: str | os.PathLike, step: int) -> epath.Path:
  """Return the folder of `step`'s checkpoint inside `directory`."""
  return epath.Path(directory) / f"{STEP_PREFIX}{step:08d}"


def save(
    directory: str | os.PathLike,
    step: int,
    trainable: Any,
    opt_state: Any,
    *,
    metadata: Mapping[str, Any] | None = None,
    keep: int = 0,
) -> epath.Path:
  """Write the trainable tree, the optimizer state and `metadata` as `step`'s checkpoint.

  Every process of a multi-process run must call it with the same arguments;
  it returns when the checkpoint is complete and, with `keep`, the older ones
  are removed.

  Args:
    directory: the folder of the run's checkpoints; created if missing.
    step: the number of optimizer steps taken.
    trainable: the trainable tree, possibly sharded over a mesh.
    opt_state: the optimizer state of `trainable`.
    metadata: a JSON-serialisable dict stored beside the arrays and read back
      by `read_metadata`; None stores `{}`.
    keep: after the save, keep only the `keep` checkpoints of the highest
      steps in `directory`; 0 keeps all.

  Returns:
    The checkpoint's folder, `step_path(directory, step)`.

  Raises:
    ValueError: if `step` or `keep` is not an integer >= 0, `metadata` is not
      JSON-serialisable, or that step's folder already exists.
  """
  _check_count("step", step)
  _check_count("keep", keep)
  metadata = dict(metadata or {})
  try:
    json.dumps(metadata, allow_nan=False)
  except (TypeError, ValueError) as error:
    raise ValueError(
        f"Checkpoint metadata must be JSON-serialisable ({error}). Store only"
        " dicts, lists, strings, finite numbers, booleans and None."
    ) from None
  path = step_path(directory, int(step))
  if path.exists():
    raise ValueError(
        f"{path} already contains a checkpoint. Save into another directory, or"
        " delete the old checkpoint first."
    )

  partial = path.parent / (path.name + PARTIAL_SUFFIX)
  if distributed.is_primary():
    _remove_partial(partial)
  ocp = _orbax()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
        partial.absolute(),
        args=ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable),
            opt_state=ocp.args.StandardSave(opt_state),
            metadata=ocp.args.JsonSave(metadata),
        ),
    )
  if distributed.is_primary():
    _commit(partial, path)
  distributed.barrier(f"jaxlora_checkpoint_commit_{step}")
  logger.info("Saved the checkpoint of step %d to %s.", step, path)

  if keep:
    _remove_old(directory, keep)
  return path


def saved_steps(directory: str | os.PathLike) -> list[int]:
  """Return the steps of the complete checkpoints in `directory`, ascending."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(
      int(match.group(1))
      for child in directory.iterdir()
      if (match := STEP_FOLDER.fullmatch(child.name)) and child.is_dir()
  )


def latest_step(directory: str | os.PathLike) -> int | None:
  """Return the highest step saved in `directory`, or None if there is none."""
  steps = saved_steps(directory)
  return steps[-1] if steps else None


def remove_leftovers(directory: str | os.PathLike) -> list[str]:
  """Delete the folders that an interrupted save or removal left in `directory`.

  Only the primary process deletes; every process gets the same list.

  Returns:
    The names of the leftover folders, sorted.
  """
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  names = sorted(
      child.name for child in directory.iterdir() if LEFTOVER_FOLDER.fullmatch(child.name)
  )
  if distributed.is_primary():
    for name in names:
      logger.warning("Removing %s, left by an interrupted checkpoint save or removal.", directory / name)
      _remove_tree(directory / name)
  distributed.barrier("jaxlora_checkpoint_leftovers")
  return names


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
  """Return the metadata dict saved with `step`'s checkpoint (the latest by default).

  Raises:
    ValueError: if there is no such checkpoint, or it has no metadata item.
  """
  _, path = _existing_step_path(directory, step)
  if not (path / "metadata").is_dir():
    raise ValueError(
        f"The checkpoint at {path} has no metadata item; it was not written by"
        " train.checkpoint.save. Start a new run in an empty checkpoint directory."
    )
  ocp = _orbax()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(
        path.absolute(), args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
    )
  return restored["metadata"]


def restore(
    directory: str | os.PathLike,
    *,
    trainable: Any,
    opt_state: Any = None,
    step: int | None = None,
) -> tuple[int, Any, Any]:
  """Read a checkpoint back onto the placement of the given targets.

  Args:
    directory: the folder `save` wrote into.
    trainable: a tree like the saved one, of arrays or `jax.ShapeDtypeStruct`s;
      each restored leaf gets its target's shape, dtype and sharding.
    opt_state: the same for the optimizer state, such as
      `jax.eval_shape(tx.init, trainable)` with shardings set; None skips the
      optimizer state, for inference or export.
    step: the step to read; the latest in `directory` by default.

  Returns:
    `(step, trainable, opt_state)`, with `opt_state` None when the target was
    None.

  Raises:
    ValueError: if `directory` contains no checkpoint (or none for `step`), or
      the checkpoint's trees do not match the targets.
  """
  step, path = _existing_step_path(directory, step)
  ocp = _orbax()
  items = {"trainable": ocp.args.StandardRestore(_abstract(trainable))}
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    try:
      restored = checkpointer.restore(path.absolute(), args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as error:
      raise ValueError(
          f"The checkpoint at {path} does not match the target trees ({error})."
          " Build the targets from the same model, mode, adapters and optimizer"
          " as the run that saved it."
      ) from error
  logger.info("Restored the checkpoint of step %d from %s.", step, path)
  return step, restored["trainable"], restored["opt_state"] if opt_state is not None else None


def _existing_step_path(directory, step):
  """Return `(step, folder)` of `step`'s checkpoint (the latest if None), raising if it is missing."""
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
  return step, path


def _commit(partial, path):
  """Publish a finished save under its step name by a rename, so readers never see half of it."""
  partial.rename(path)


def _remove_old(directory, keep):
  """Remove all but the `keep` newest checkpoints, each renamed away before deletion."""
  steps = saved_steps(directory)
  if distributed.is_primary():
    for step in steps[:-keep]:
      path = step_path(directory, step)
      doomed = path.parent / (path.name + DELETED_SUFFIX)
      path.rename(doomed)
      _remove_tree(doomed)
      logger.info("Removed the checkpoint of step %d (keeping the last %d).", step, keep)
  distributed.barrier("jaxlora_checkpoint_remove_old")


def _remove_partial(partial):
  """Delete an earlier attempt at `partial`, with orbax's temporary folder named after it."""
  if not partial.parent.is_dir():
    return
  for child in partial.parent.iterdir():
    if child.name == partial.name or child.name.startswith(partial.name + "."):
      logger.warning("Removing %s, left by an interrupted checkpoint save.", child)
      _remove_tree(child)


def _remove_tree(path):
  if path.exists():
    path.rmtree()


def _check_count(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")


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

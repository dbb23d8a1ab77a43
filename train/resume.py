"""What a training run stores in its checkpoints, and how it resumes from them.

A checkpoint of `fit` contains the trainable tree and the optimizer state as
orbax arrays (`train.checkpoint`) and this JSON metadata:

    {"format": 1,
     "mode": "lora",                      "lora" or "full"
     "lora_config": {"rank": 8, ...},     LoraConfig.to_dict(), or null
     "model_info": {...},                 the caller's description of the model, or null
     "tree": {"model.layers.self_attn.q_proj.lora.a": "float32[2,24,8]", ...},
     "step": 300,                         optimizer steps taken
     "batches": 600,                      training batches consumed
     "rng": [0, 42]}                      key data of the base key

The first four keys describe the run (`describe_run`), and a run resumes
only from a checkpoint whose description equals its own. The last three record
the run's position: step s draws its dropout key as `fold_in(base key, s)`, and
the data continues at batch `batches` of `train_batches(start_batch)`, so a
resumed run takes the same steps as one that was never interrupted.
"""

import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora import paths
from jaxlora.train import checkpoint
from jaxlora.train import mesh as mesh_lib

logger = logging.getLogger(__name__)

FORMAT = 1
RUN_KEYS = ("mode", "lora_config", "model_info", "tree")
# Depth to which each key's dicts are split into dotted keys when two runs are
# compared. LoRA fields and tree paths split one level, so that a rank_pattern
# shows whole, and the model description splits to any depth.
COMPARED_DEPTH = {"mode": 0, "lora_config": 1, "model_info": None, "tree": 1}
# How many differences a mismatch error lists before it summarises the rest.
MAX_LISTED_DIFFERENCES = 5


class StartPoint(NamedTuple):
  """The point a run starts from: step 0, or a checkpoint's step.

  Attributes:
    step: optimizer steps already taken; 0 for a fresh run.
    batches: training batches already consumed.
    rng: the base key of the run's dropout keys.
  """

  step: int
  batches: int
  rng: jax.Array


def describe_run(
    *,
    mode: str,
    lora_config: jaxlora.LoraConfig | None,
    model_info: Mapping[str, Any] | None,
    trainable: Mapping[str, Any],
) -> dict[str, Any]:
  """Return the JSON description of a run that a resumed run must match.

  Args:
    mode: "lora" or "full".
    lora_config: the adapters' settings, or None (full fine-tuning).
    model_info: a JSON-serialisable dict that describes the model, such as
      its config dict, or None.
    trainable: the trainable tree, whose paths, shapes and dtypes are recorded.

  Raises:
    ValueError: if `lora_config` is not a `jaxlora.LoraConfig`, or
      `model_info` is not a JSON-serialisable dict.
  """
  if lora_config is not None and not isinstance(lora_config, jaxlora.LoraConfig):
    raise ValueError(
        f"lora_config must be a jaxlora.LoraConfig or None, got"
        f" {type(lora_config).__name__}. Pass the config the adapters were"
        " added with."
    )
  if model_info is not None and not isinstance(model_info, Mapping):
    raise ValueError(
        f"model_info must be a dict or None, got {type(model_info).__name__}."
        " Pass a description such as the model's config dict."
    )
  tree = {
      paths.module_name(path): f"{jnp.dtype(leaf.dtype).name}[{','.join(map(str, leaf.shape))}]"
      for path, leaf in paths.iter_leaves(trainable)
  }
  run = {
      "mode": mode,
      "lora_config": None if lora_config is None else lora_config.to_dict(),
      "model_info": None if model_info is None else dict(model_info),
      "tree": tree,
  }
  try:
    # The round trip turns tuples into lists, as reading the checkpoint will.
    return json.loads(json.dumps(run, allow_nan=False))
  except (TypeError, ValueError) as error:
    raise ValueError(
        f"model_info must be JSON-serialisable ({error}). Use dicts, lists,"
        " strings, finite numbers, booleans and None only."
    ) from None


def find_start(
    directory: str | os.PathLike | None,
    *,
    run: Mapping[str, Any],
    base_rng: jax.Array,
    resume: bool,
    steps: int,
) -> StartPoint:
  """Return where a run starts, checking its latest checkpoint if it has one.

  Leftovers of an interrupted save are removed first. Only metadata is read,
  so this runs before anything is compiled.

  Args:
    directory: the run's checkpoint folder, or None for a run without
      checkpoints.
    run: this run's `describe_run`.
    base_rng: the base key from this run's seed; a resumed run keeps the
      checkpoint's key instead.
    resume: continue from the latest checkpoint in `directory`.
    steps: the run's total number of optimizer steps.

  Raises:
    ValueError: if `directory` contains a checkpoint but `resume` is False,
      the checkpoint is past `steps`, or it was saved by a run with another
      description (listing the first differences).
  """
  fresh = StartPoint(0, 0, base_rng)
  if directory is None:
    return fresh
  checkpoint.remove_leftovers(directory)
  step = checkpoint.latest_step(directory)
  if step is None:
    return fresh
  path = checkpoint.step_path(directory, step)
  if not resume:
    raise ValueError(
        f"{os.fspath(directory)} already contains a checkpoint of step {step},"
        " and resume=False. Set resume=True to continue that run, or use an"
        " empty checkpoint_dir to start a new one."
    )
  if step > steps:
    raise ValueError(
        f"The checkpoint {path} is at step {step}, past steps={steps}. Raise"
        f" steps above {step} to train further, or use another checkpoint_dir."
    )

  metadata = checkpoint.read_metadata(directory, step)
  if metadata.get("format") != FORMAT:
    raise ValueError(
        f"The checkpoint {path} has metadata format {metadata.get('format')!r};"
        f" this version of fit reads format {FORMAT}. Start a new run in an"
        " empty checkpoint_dir."
    )
  check_same_run(metadata, run, path=path)

  rng = jnp.asarray(np.asarray(metadata["rng"], np.uint32))
  if not np.array_equal(jax.random.key_data(base_rng), rng):
    logger.warning(
        "The seed of this run gives another base key than the checkpoint's;"
        " the resumed run keeps the checkpoint's key %s so that it continues"
        " the same run.", metadata["rng"],
    )
  logger.info(
      "Resuming from %s: step %d, %d training batches consumed.",
      path, step, metadata["batches"],
  )
  return StartPoint(step, int(metadata["batches"]), rng)


def check_same_run(saved: Mapping[str, Any], run: Mapping[str, Any], *, path: Any) -> None:
  """Raise unless the run description in a checkpoint's metadata `saved` equals `run`.

  Keys of `saved` other than `RUN_KEYS` are ignored, and a missing one reads
  as None.

  Raises:
    ValueError: naming the first differing keys with both values, such as
      `lora_config.use_rslora: checkpoint true, this run false`.
  """
  old, new = {}, {}
  for key in RUN_KEYS:
    old.update(_flatten(saved.get(key), key, COMPARED_DEPTH[key]))
    new.update(_flatten(run[key], key, COMPARED_DEPTH[key]))
  differences = [
      key
      for key in sorted(old.keys() | new.keys(), key=_key_order)
      if old.get(key, _ABSENT) != new.get(key, _ABSENT)
  ]
  if not differences:
    return

  listed = "; ".join(
      f"{key}: checkpoint {_show(old.get(key, _ABSENT))}, this run {_show(new.get(key, _ABSENT))}"
      for key in differences[:MAX_LISTED_DIFFERENCES]
  )
  more = len(differences) - MAX_LISTED_DIFFERENCES
  if more > 0:
    listed += f"; and {more} more"
  raise ValueError(
      f"Cannot resume from {path}: it was saved by a run with other settings"
      f" ({len(differences)} differences). {listed}. Resume with the settings"
      " the checkpoint was saved with, or use another checkpoint_dir to start"
      " a new run."
  )


def open_batches(
    train_batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    start: StartPoint,
) -> Iterator[Any]:
  """Return the iterator of training batches from `start.batches` on.

  Args:
    train_batches: an iterable of batches, or a callable `start_batch ->
      iterable` whose iterable yields what an uninterrupted one yields after
      its first `start_batch` batches (such as `train.data.train_batches`
      with `start_batch=`). A callable is required to resume.
    start: where the run starts.

  Raises:
    ValueError: if the run resumes after batch 0 and `train_batches` is not
      callable.
  """
  if callable(train_batches):
    return iter(train_batches(start.batches))
  if start.batches:
    raise ValueError(
        f"Resuming at step {start.step} needs the training batches from batch"
        f" {start.batches} on, but train_batches is a {type(train_batches).__name__},"
        " which can only start at its beginning. Pass a callable start_batch ->"
        " iterable, such as lambda start: train.data.train_batches(examples,"
        " batch_size=..., seed=..., start_batch=start), or set resume=False with"
        " an empty checkpoint_dir."
    )
  return iter(train_batches)


def save(
    directory: str | os.PathLike,
    *,
    step: int,
    batches: int,
    rng: jax.Array,
    run: Mapping[str, Any],
    trainable: Any,
    opt_state: Any,
    keep: int,
    mesh: jax.sharding.Mesh,
) -> None:
  """Save a checkpoint of `step` with the run's description and position.

  Raises:
    FloatingPointError: if a trainable leaf contains NaN or an infinity, naming
      the step and the first such leaves; nothing is written then.
  """
  bad = _non_finite_leaves(trainable, mesh)
  if bad:
    listed = ", ".join(bad[:MAX_LISTED_DIFFERENCES])
    raise FloatingPointError(
        f"Training diverged at step {step}: the parameters after the step contain"
        f" NaN or infinite values ({listed}{', ...' if len(bad) > MAX_LISTED_DIFFERENCES else ''})."
        " No checkpoint of this step was written. Lower learning_rate, set"
        " max_grad_norm, or check the step's batch."
    )

  metadata = {
      "format": FORMAT,
      **run,
      "step": step,
      "batches": batches,
      "rng": np.asarray(jax.random.key_data(rng)).tolist(),
  }
  checkpoint.save(directory, step, trainable, opt_state, metadata=metadata, keep=keep)


def _non_finite_leaves(tree, mesh):
  """Return the dotted paths of the leaves of `tree` that are not all finite."""
  flags = _finite_flags(mesh)(tree)
  return [
      paths.module_name(path)
      for path, finite in paths.iter_leaves(jax.device_get(flags))
      if not finite
  ]


@functools.cache
def _finite_flags(mesh):
  """Return a jitted `tree -> tree of booleans`, True where a leaf is all finite, replicated on `mesh`."""
  return jax.jit(
      lambda tree: jax.tree.map(lambda leaf: jnp.all(jnp.isfinite(leaf)), tree),
      out_shardings=mesh_lib.replicated(mesh),
  )


class _Absent:
  """A key that one of the two descriptions lacks."""

  def __repr__(self):
    return "<absent>"


_ABSENT = _Absent()


def _flatten(value, prefix, depth):
  """Return `{dotted key: value}` for nested dicts split `depth` levels deep (None: all)."""
  if not isinstance(value, Mapping) or not value or depth == 0:
    return {prefix: value}
  out = {}
  for key, item in value.items():
    out.update(_flatten(item, f"{prefix}.{key}", None if depth is None else depth - 1))
  return out


def _key_order(key):
  """Sort the differences by the order of `RUN_KEYS`, then by key."""
  return RUN_KEYS.index(key.split(".", 1)[0]), key


def _show(value):
  if value is _ABSENT:
    return repr(value)
  return json.dumps(value)

"""Splitting a parameter tree into trainable and frozen halves.

Trainability is a static tree of booleans with the structure of the
parameters (`trainable_mask`). It is computed once and used everywhere: the
gradient is taken with respect to the trainable half only, the optimizer keeps
state for it only, and an adapter checkpoint stores it only.

    partition(params) -> (trainable, frozen)    disjoint nested dicts
    combine(trainable, frozen) -> params
"""

from collections.abc import Mapping
from typing import Any

from jaxlora import paths

ADAPTER_WEIGHTS = ("a", "b")


def is_adapter_weight(path: paths.Path) -> bool:
  """Return whether the leaf at `path` is an adapter matrix A or B."""
  return len(path) >= 2 and path[-2] == "lora" and path[-1] in ADAPTER_WEIGHTS


def adapter_mask(params: Mapping[str, Any]) -> dict[str, Any]:
  """Return a tree of booleans, True exactly at the adapter matrices A and B."""
  return paths.map_with_path(lambda path, _: is_adapter_weight(path), params)


def full_mask(params: Mapping[str, Any]) -> dict[str, Any]:
  """Return a tree of booleans that marks every weight trainable, for full fine-tuning.

  Adapter scales stay frozen: they are hyperparameters, not weights.
  """
  return paths.map_with_path(lambda path, _: not _is_scale(path), params)


def partition(
    params: Mapping[str, Any],
    *,
    trainable_mask: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Split `params` into `(trainable, frozen)`.

  Args:
    params: a nested dict of arrays.
    trainable_mask: a tree of booleans with the structure of `params`, True
      where a leaf is trainable. Defaults to `adapter_mask(params)`.

  Returns:
    Two nested dicts holding disjoint sets of leaves; `combine` joins them.

  Raises:
    ValueError: if the default mask is used on a tree with no adapters (call
      `jaxlora.apply` first, or pass `full_mask(params)` for full fine-tuning),
      or if the mask does not have the structure of `params`.
  """
  if trainable_mask is None:
    trainable_mask = adapter_mask(params)
    if not any(flag for _, flag in paths.iter_leaves(trainable_mask)):
      raise ValueError(
          "The parameter tree has no LoRA adapters, so nothing would train."
          " Call jaxlora.apply(params, ...) first, or pass"
          " trainable_mask=jaxlora.full_mask(params) for full fine-tuning."
      )

  flags = dict(paths.iter_leaves(trainable_mask))
  leaf_paths = [path for path, _ in paths.iter_leaves(params)]
  if set(flags) != set(leaf_paths):
    missing = sorted(paths.module_name(p) for p in set(leaf_paths) - set(flags))
    extra = sorted(paths.module_name(p) for p in set(flags) - set(leaf_paths))
    raise ValueError(
        "trainable_mask does not have the structure of the parameters:"
        f" missing {missing or 'nothing'}, unexpected {extra or 'nothing'}."
        " Build the mask from the same tree, for example with"
        " jaxlora.adapter_mask(params)."
    )

  trainable = paths.filter_tree(params, lambda path: bool(flags[path]))
  frozen = paths.filter_tree(params, lambda path: not flags[path])
  return trainable, frozen


def combine(*trees: Mapping[str, Any]) -> dict[str, Any]:
  """Join disjoint nested dicts, such as the halves from `partition`.

  Raises:
    ValueError: if two trees hold a leaf at the same path.
  """
  out: dict[str, Any] = {}
  for tree in trees:
    _merge_into(out, tree, ())
  return out


def _merge_into(out, tree, prefix):
  for key, value in tree.items():
    path = prefix + (key,)
    if isinstance(value, Mapping):
      node = out.setdefault(key, {})
      if not isinstance(node, dict):
        raise ValueError(f"Cannot combine: {paths.module_name(path)} is both a leaf and a subtree.")
      _merge_into(node, value, path)
    else:
      if key in out:
        raise ValueError(
            f"Cannot combine: both trees hold a leaf at {paths.module_name(path)}."
        )
      out[key] = value


def _is_scale(path):
  return len(path) >= 2 and path[-2] == "lora" and path[-1] == "scale"

"""Paths into plain nested-dict parameter trees.

A leaf's path is the tuple of dict keys that leads to it, for example
`("model", "layers", "self_attn", "q_proj", "kernel")`. A module path is the
dotted form of the keys above a leaf, `"model.layers.self_attn.q_proj"`, which
is how Hugging Face and peft name modules.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Path = tuple[str, ...]


def iter_leaves(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
  """Yield `(path, leaf)` for every leaf of a nested dict, in sorted key order."""
  for key in sorted(tree):
    value = tree[key]
    path = prefix + (key,)
    if isinstance(value, Mapping):
      yield from iter_leaves(value, path)
    else:
      yield path, value


def iter_modules(tree: Mapping[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Mapping[str, Any]]]:
  """Yield `(path, node)` for every dict in the tree that contains a `kernel` leaf."""
  if "kernel" in tree and not isinstance(tree["kernel"], Mapping):
    yield prefix, tree
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      yield from iter_modules(value, prefix + (key,))


def module_name(path: Path) -> str:
  # Integer keys, such as the list indices of an NNX state, print as numbers.
  return ".".join(str(key) for key in path)


def map_with_path(fn: Callable[[Path, Any], Any], tree: Mapping[str, Any], prefix: Path = ()) -> dict[str, Any]:
  """Return a new nested dict with `fn(path, leaf)` in place of each leaf."""
  out = {}
  for key, value in tree.items():
    path = prefix + (key,)
    if isinstance(value, Mapping):
      out[key] = map_with_path(fn, value, path)
    else:
      out[key] = fn(path, value)
  return out


def filter_tree(tree: Mapping[str, Any], keep: Callable[[Path], bool], prefix: Path = ()) -> dict[str, Any]:
  """Return the subtree of leaves whose path satisfies `keep`, without empty dicts."""
  out = {}
  for key, value in tree.items():
    path = prefix + (key,)
    if isinstance(value, Mapping):
      sub = filter_tree(value, keep, path)
      if sub:
        out[key] = sub
    elif keep(path):
      out[key] = value
  return out

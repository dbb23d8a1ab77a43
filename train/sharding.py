"""Sharding rules as data: which mesh axes split which axes of each leaf.

A rule is a pair `(pattern, spec)`: a regular expression that must match a
leaf's whole dotted path, such as `model.layers.self_attn.q_proj.kernel`, and
the `PartitionSpec` of that leaf. Rules are tried in order and the first match
wins. `ShardingRules` checks the rules when it is built: patterns compile
and specs name only mesh axes. `specs` checks them again against a tree and a
mesh: every leaf is matched, every rule matches a leaf, and every sharded axis
divides its dimension. A bad rule therefore fails before anything is compiled.

Adapter leaves take no rule of their own. Their spec follows the kernel they
adapt, `[..., in, out]` with spec `(*lead, s_in, s_out)`:

    lora.a      [..., in, r]    (*lead, s_in, None)
    lora.b      [..., r, out]   (*lead, None, s_out)
    lora.scale  [...]           replicated

For the Llama family (`llama_rules`), fsdp splits the model width D of every
kernel and of the embedding, and tensor splits attention heads (the output
axis of q, k and v, the input axis of o), the MLP width F (the output axis of
gate and up, the input axis of down) and the vocabulary V. The layer axis L
of stacked leaves stays whole, and norm scales are replicated.
"""

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora import paths
from jaxlora.train import mesh as mesh_lib

logger = logging.getLogger(__name__)

P = PartitionSpec
LORA = "lora"

Rule = tuple[str, PartitionSpec]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """An ordered list of `(pattern, PartitionSpec)` rules, checked when built.

  Attributes:
    rules: the rules, first match wins. A pattern is matched with
      `re.fullmatch` against the dotted path of a leaf.

  Raises:
    ValueError: if a rule is not a pair, a pattern does not compile, a spec
      is not a `PartitionSpec`, or a spec names an axis other than data, fsdp
      and tensor, or the same axis twice.
  """

  rules: tuple[Rule, ...]

  def __post_init__(self):
    rules = tuple(self.rules)
    for index, rule in enumerate(rules):
      _check_rule(index, rule)
    object.__setattr__(self, "rules", tuple((pattern, spec) for pattern, spec in rules))

  def match(self, name: str) -> tuple[int, PartitionSpec] | None:
    """Return `(index, spec)` of the first rule whose pattern matches `name`, or None."""
    for index, (pattern, spec) in enumerate(self.rules):
      if re.fullmatch(pattern, name):
        return index, spec
    return None

  def specs(
      self,
      params: Mapping[str, Any],
      axis_sizes: Mapping[str, int],
  ) -> dict[str, Any]:
    """Return the `PartitionSpec` of every leaf of `params`, checked against the mesh.

    Only shapes are read, so `params` may hold `jax.ShapeDtypeStruct`s. Each
    placement is logged at debug level with the rule that made it.

    Args:
      params: a nested dict of arrays.
      axis_sizes: the mesh's axis sizes, such as `dict(mesh.shape)`.

    Returns:
      A tree of `PartitionSpec` with the structure of `params`.

    Raises:
      ValueError: if a leaf matches no rule, a rule matches no leaf, a spec
        has more entries than its leaf has axes, or a sharded axis does not
        divide the dimension it splits. The message names the leaf, its
        shape and the rule.
    """
    leaves = dict(paths.iter_leaves(params))
    used = set()
    specs = {}

    for path, leaf in leaves.items():
      if _is_adapter(path):
        continue
      name = paths.module_name(path)
      found = self.match(name)
      if found is None:
        raise ValueError(
            f"No sharding rule matches {name} (shape {tuple(leaf.shape)})."
            f" Add a rule whose pattern matches it, such as"
            f" ({re.escape(name)!r}, PartitionSpec()) to replicate it."
        )
      index, spec = found
      used.add(index)
      self._check_fit(name, leaf.shape, spec, index, axis_sizes)
      specs[path] = spec
      logger.debug(
          "%s %s: %s from rule %d %s.",
          name, tuple(leaf.shape), spec, index, _show(self.rules[index][0]),
      )

    for path, leaf in leaves.items():
      if _is_adapter(path):
        specs[path] = _adapter_spec(path, leaf, leaves, specs)
        logger.debug(
            "%s %s: %s from its kernel's spec.",
            paths.module_name(path), tuple(leaf.shape), specs[path],
        )

    unused = [index for index in range(len(self.rules)) if index not in used]
    if unused:
      index = unused[0]
      pattern, spec = self.rules[index]
      example = paths.module_name(next(iter(leaves))) if leaves else "none"
      raise ValueError(
          f"Sharding rule {index} ({_show(pattern)}, {spec}) matches no leaf."
          f" Patterns must match a whole dotted leaf path, such as {example!r};"
          " fix the pattern or remove the rule."
      )
    return paths.map_with_path(lambda path, _: specs[path], params)

  def shardings(self, params: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Return the `NamedSharding` of every leaf of `params` on `mesh` (see `specs`)."""
    specs = self.specs(params, dict(mesh.shape))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)

  def _check_fit(self, name, shape, spec, index, axis_sizes):
    rule = f"rule {index} ({_show(self.rules[index][0])}, {spec})"
    if len(spec) > len(shape):
      raise ValueError(
          f"{name} has shape {tuple(shape)}, {len(shape)} axes, but {rule} has"
          f" {len(spec)} entries. Give the rule at most {len(shape)} entries."
      )
    for axis, entry in enumerate(spec):
      size = math.prod(axis_sizes[mesh_axis] for mesh_axis in _entry_axes(entry))
      if shape[axis] % size:
        raise ValueError(
            f"{name} has shape {tuple(shape)}; {rule} splits its axis {axis}"
            f" (size {shape[axis]}) into {size} shards over {entry!r}, which does"
            f" not divide it. Choose a mesh whose {entry!r} size divides"
            f" {shape[axis]}, or a rule that leaves axis {axis} unsharded (None)."
        )


def llama_rules(config) -> ShardingRules:
  """Return the rules of a Llama-family tree built from `config`.

  Args:
    config: a `jaxlora.models.LlamaConfig`; its `attention_bias`,
      `mlp_bias` and `tie_word_embeddings` decide which bias and output head
      rules exist, so that every rule matches a leaf.
  """
  rules = [
      (r"model\.embed_tokens\.embedding", P("tensor", "fsdp")),  # [V, D]
      (r"model\.layers\.self_attn\.[qkv]_proj\.kernel", P(None, "fsdp", "tensor")),
      (r"model\.layers\.self_attn\.o_proj\.kernel", P(None, "tensor", "fsdp")),
      (r"model\.layers\.mlp\.(gate|up)_proj\.kernel", P(None, "fsdp", "tensor")),
      (r"model\.layers\.mlp\.down_proj\.kernel", P(None, "tensor", "fsdp")),
      (r"model\.layers\.(input|post_attention)_layernorm\.scale", P()),
      (r"model\.norm\.scale", P()),
  ]
  if config.attention_bias:
    rules.append((r"model\.layers\.self_attn\.[qkv]_proj\.bias", P(None, "tensor")))
    rules.append((r"model\.layers\.self_attn\.o_proj\.bias", P()))
  if config.mlp_bias:
    rules.append((r"model\.layers\.mlp\.(gate|up)_proj\.bias", P(None, "tensor")))
    rules.append((r"model\.layers\.mlp\.down_proj\.bias", P()))
  if not config.tie_word_embeddings:
    rules.append((r"lm_head\.kernel", P("fsdp", "tensor")))  # [D, V]
  return ShardingRules(tuple(rules))


def optimizer_shardings(
    tx: optax.GradientTransformation,
    trainable: Mapping[str, Any],
    trainable_shardings: Mapping[str, Any],
    mesh: Mesh,
) -> Any:
  """Return the shardings of `tx.init(trainable)`'s state, without building it.

  A state leaf that mirrors a parameter, such as Adam's moments, takes that
  parameter's sharding; every other leaf, such as a step count, is
  replicated.

  Args:
    tx: the optimizer.
    trainable: the trees of arrays (or `jax.ShapeDtypeStruct`s) the state
      is built for.
    trainable_shardings: a `NamedSharding` per leaf of `trainable`.
    mesh: the mesh of the replicated leaves.
  """
  shapes = jax.eval_shape(tx.init, trainable)
  return optax.tree_utils.tree_map_params(
      tx,
      lambda _, sharding: sharding,
      shapes,
      trainable_shardings,
      transform_non_params=lambda _: mesh_lib.replicated(mesh),
  )


def place(tree: Any, shardings: Any, *, copy: bool = True) -> Any:
  """Put every leaf of `tree` onto its sharding.

  A leaf is either a host or single-process array that every process has in
  full, or an array already spread over the mesh.

  Args:
    tree: the arrays.
    shardings: a `NamedSharding` per leaf.
    copy: always make new arrays, so that the result may be donated without
      invalidating `tree`. With False, a leaf already placed as requested is
      returned as it is, which saves memory for leaves that are only read.
  """

  def put(leaf, sharding):
    if sharding.is_fully_addressable or (
        isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    ):
      return jax.device_put(leaf, sharding, may_alias=False if copy else None)
    # Part of the mesh belongs to other processes, so each process copies
    # the slices its own devices need from its full copy of the leaf.
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def _check_rule(index, rule):
  if not isinstance(rule, (tuple, list)) or len(rule) != 2:
    raise ValueError(
        f"Sharding rule {index} is {rule!r}; a rule is a pair (pattern,"
        " PartitionSpec), such as (r'model\\.norm\\.scale', PartitionSpec())."
    )
  pattern, spec = rule
  if not isinstance(pattern, str):
    raise ValueError(f"Sharding rule {index}: the pattern {pattern!r} must be a string.")
  try:
    re.compile(pattern)
  except re.error as error:
    raise ValueError(
        f"Sharding rule {index}: the pattern {_show(pattern)} is not a valid regular"
        f" expression ({error})."
    ) from error
  if not isinstance(spec, PartitionSpec):
    raise ValueError(
        f"Sharding rule {index} ({_show(pattern)}): the spec {spec!r} must be a"
        " jax.sharding.PartitionSpec, such as PartitionSpec(None, 'fsdp')."
    )

  seen = []
  for entry in spec:
    for axis in _entry_axes(entry):
      if axis not in mesh_lib.AXES:
        raise ValueError(
            f"Sharding rule {index} ({_show(pattern)}, {spec}) names the mesh axis"
            f" {axis!r}, which does not exist. Use {', '.join(mesh_lib.AXES)}."
        )
      if axis in seen:
        raise ValueError(
            f"Sharding rule {index} ({_show(pattern)}, {spec}) uses the mesh axis"
            f" {axis!r} twice; a mesh axis may split only one axis of a leaf."
        )
      seen.append(axis)


def _show(pattern):
  """Return `pattern` as a raw string literal, as it is written in a rule list."""
  return f"r'{pattern}'"


def _entry_axes(entry) -> tuple[str, ...]:
  """Return the mesh axes of one spec entry: None, a name, or a tuple of names."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _is_adapter(path):
  return len(path) >= 2 and path[-2] == LORA


def _adapter_spec(path, leaf, leaves, specs):
  """Return the spec of an adapter leaf, derived from its kernel's spec."""
  module = path[:-2]
  kernel_path = module + ("kernel",)
  if kernel_path not in specs:
    raise ValueError(
        f"The adapter {paths.module_name(path)} has no kernel beside it at"
        f" {paths.module_name(kernel_path)}, so its sharding cannot follow one."
    )
  if path[-1] not in ("a", "b"):
    return P()

  kernel = leaves[kernel_path]
  entries = list(specs[kernel_path]) + [None] * (kernel.ndim - len(specs[kernel_path]))
  *lead, s_in, s_out = entries
  if path[-1] == "a":
    return P(*lead, s_in, None)
  return P(*lead, None, s_out)


def _is_spec(node):
  return isinstance(node, PartitionSpec)


# Rules for a model without rules of its own: every leaf whole on every device.
REPLICATED = ShardingRules(((".*", P()),))

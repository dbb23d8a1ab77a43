"""LoRA hyperparameters, validated when the config is built.

Per-module ranks and alphas follow peft's `rank_pattern` and `alpha_pattern`.
Each key is a regular expression. It selects a module when the module's
per-layer name (for example `model.layers.3.self_attn.q_proj`) matches the
key, optionally preceded by any prefix that ends with a dot. The first key
that selects a module, in the mapping's order, gives its value. A module that
no key selects takes `rank` and `alpha`.
"""

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

ALL_LINEAR = "all-linear"

# Module names of the q and v projections: peft's default targets for the Llama
# family (also Mistral and Qwen2), used when `targets` is not given.
DEFAULT_TARGETS = ("q_proj", "v_proj")

INITS = ("kaiming", "gaussian")

# Path components under which transformers numbers the decoder layers:
# `model.layers.3.mlp` in Llama-family models, `transformer.h.3.mlp` in GPT-2.
LAYER_CONTAINERS = ("layers", "h")


def layer_module_name(path: Sequence[str], layer: int | None) -> str:
  """Return the dotted name of module `path`, with a layer index if `layer` is set.

  The index goes right after the first component in `LAYER_CONTAINERS`, where
  transformers puts it: `("model", "layers", "mlp", "up_proj")` with layer 3
  is `model.layers.3.mlp.up_proj`.

  Raises:
    ValueError: if `layer` is set and no component of `path` is a layer
      container.
  """
  parts = [str(part) for part in path]
  if layer is None:
    return ".".join(parts)
  containers = [i for i, part in enumerate(parts) if part in LAYER_CONTAINERS]
  if not containers:
    raise ValueError(
        f"Module {'.'.join(parts)} is not inside a layer container"
        f" ({', '.join(LAYER_CONTAINERS)}), so it has no per-layer name."
    )
  parts.insert(containers[0] + 1, str(layer))
  return ".".join(parts)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """How to adapt a parameter tree with low-rank adapters.

  Attributes:
    rank: the inner dimension r of each adapter pair A `[in, r]`, B `[r, out]`.
    alpha: numerator of the scale. The adapter's output is multiplied by
      `alpha / rank`, or `alpha / sqrt(rank)` with `use_rslora`. peft's default
      is 8 whatever the rank, and so is this one.
    targets: which kernels get adapters. A sequence of module names matches a
      module whose dotted path equals a name or ends with `.name`; a string is
      a regular expression that must match the whole dotted module path (for
      example `model.layers.self_attn.q_proj`); the string "all-linear" takes
      every kernel except the output head `lm_head`.
    dropout: probability of zeroing an input element of the adapter path
      during training, in [0, 1).
    init: "kaiming" draws A from the Kaiming-uniform distribution that peft
      uses, U(-1/sqrt(in), 1/sqrt(in)); "gaussian" draws A from N(0, 1/r^2).
      B starts at zero in both cases, so the adapted model starts equal to the
      base model.
    use_rslora: use the rank-stabilised scale `alpha / sqrt(rank)`.
    rank_pattern: `{regular expression: rank}` overriding `rank` for the
      modules whose per-layer name the expression selects (see the module
      docstring), for example `{"q_proj": 16, "layers.0.mlp.up_proj": 4}`.
    alpha_pattern: `{regular expression: alpha}` overriding `alpha` the same
      way.
  """

  rank: int = 8
  alpha: float = 8.0
  targets: Sequence[str] | str = DEFAULT_TARGETS
  dropout: float = 0.0
  init: str = "kaiming"
  use_rslora: bool = False
  rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
      raise ValueError(f"LoRA rank must be an integer, got {self.rank!r}.")
    object.__setattr__(self, "rank", int(self.rank))
    if self.rank <= 0:
      raise ValueError(
          f"LoRA rank must be a positive integer, got {self.rank}. Use a rank"
          " such as 8 or 16."
      )
    if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      raise ValueError(
          f"LoRA alpha must be a positive number, got {self.alpha!r}."
      )
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(
          f"LoRA dropout must be in [0, 1), got {self.dropout!r}."
      )
    if self.init not in INITS:
      raise ValueError(
          f"Unknown LoRA init {self.init!r}; use one of {', '.join(INITS)}."
      )
    if not isinstance(self.use_rslora, bool):
      raise ValueError(
          f"use_rslora must be True or False, got {self.use_rslora!r}."
      )
    object.__setattr__(self, "targets", _validate_targets(self.targets))
    object.__setattr__(
        self, "rank_pattern", _validate_pattern("rank_pattern", self.rank_pattern, _is_rank)
    )
    object.__setattr__(
        self, "alpha_pattern", _validate_pattern("alpha_pattern", self.alpha_pattern, _is_alpha)
    )

  def __hash__(self):
    return hash((
        self.rank, self.alpha, self.targets, self.dropout, self.init,
        self.use_rslora, tuple(self.rank_pattern.items()),
        tuple(self.alpha_pattern.items()),
    ))

  @property
  def scale(self) -> float:
    """Multiplier applied to the adapter's output `(x @ A) @ B` for `rank` and `alpha`."""
    return self._scale(self.alpha, self.rank)

  def rank_for(self, module_name: str) -> int:
    """Return the rank of the module with per-layer name `module_name`."""
    return _pattern_value(self.rank_pattern, module_name, self.rank)

  def alpha_for(self, module_name: str) -> float:
    """Return the alpha of the module with per-layer name `module_name`."""
    return _pattern_value(self.alpha_pattern, module_name, self.alpha)

  def scale_for(self, module_name: str) -> float:
    """Return the adapter scale of the module with per-layer name `module_name`."""
    return self._scale(self.alpha_for(module_name), self.rank_for(module_name))

  def unmatched_pattern_keys(self, module_names: Sequence[str]) -> list[str]:
    """Return `rank_pattern[...]` and `alpha_pattern[...]` entries that select none of `module_names`."""
    out = []
    for field in ("rank_pattern", "alpha_pattern"):
      for key in getattr(self, field):
        if not any(_selects(key, name) for name in module_names):
          out.append(f"{field}[{key!r}]")
    return out

  def _scale(self, alpha, rank):
    if self.use_rslora:
      return alpha / math.sqrt(rank)
    return alpha / rank

  def to_dict(self) -> dict[str, Any]:
    """Return the fields as a JSON-serialisable dict; `from_dict` reads it back."""
    out = dataclasses.asdict(self)
    out["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
    out["rank_pattern"] = dict(self.rank_pattern)
    out["alpha_pattern"] = dict(self.alpha_pattern)
    return out

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> "LoraConfig":
    """Build a config from the dict that `to_dict` returns.

    Raises:
      ValueError: if `fields` has keys that are not `LoraConfig` fields, or
        invalid values.
    """
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(
          f"Unknown LoraConfig fields {unknown}; the fields are"
          f" {', '.join(sorted(known))}."
      )
    return cls(**fields)

  def matches(self, module_path: str) -> bool:
    """Return whether the module at the dotted `module_path` is a target."""
    if self.targets == ALL_LINEAR:
      return module_path.rsplit(".", 1)[-1] != "lm_head"
    if isinstance(self.targets, str):
      return re.fullmatch(self.targets, module_path) is not None
    return any(
        module_path == name or module_path.endswith("." + name)
        for name in self.targets
    )


def _selects(key, module_name):
  return re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name) is not None


def _pattern_value(pattern, module_name, default):
  for key, value in pattern.items():
    if _selects(key, module_name):
      return value
  return default


def _is_rank(value):
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _validate_pattern(name, pattern, is_valid):
  if not isinstance(pattern, Mapping):
    raise ValueError(
        f"{name} must be a dict from module-name patterns to values, got"
        f" {pattern!r}. Use for example {{'q_proj': 16}}."
    )
  out = {}
  for key, value in pattern.items():
    if not isinstance(key, str) or not key:
      raise ValueError(f"{name} key {key!r} is not a non-empty string.")
    try:
      re.compile(key)
    except re.error as error:
      raise ValueError(
          f"{name} key {key!r} is not a valid regular expression ({error})."
      ) from None
    if not is_valid(value):
      kind = "integer" if name == "rank_pattern" else "number"
      raise ValueError(
          f"{name}[{key!r}] must be a positive {kind}, got {value!r}."
      )
    out[key] = value
  return out


def _validate_targets(targets):
  if isinstance(targets, str):
    if targets == ALL_LINEAR:
      return targets
    try:
      re.compile(targets)
    except re.error as error:
      raise ValueError(
          f"LoRA targets {targets!r} is not a valid regular expression"
          f" ({error}). Pass a list of module names such as"
          f" ['q_proj', 'v_proj'], a regular expression, or '{ALL_LINEAR}'."
      ) from None
    return targets

  names = tuple(targets)
  if not names:
    raise ValueError(
        "LoRA targets is empty. Name at least one module, for example"
        f" ['q_proj', 'v_proj'], or pass '{ALL_LINEAR}'."
    )
  for name in names:
    if not isinstance(name, str) or not name:
      raise ValueError(
          f"LoRA target {name!r} is not a module name; targets must be"
          " non-empty strings such as 'q_proj'."
      )
  return names

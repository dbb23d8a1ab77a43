"""LoRA hyperparameters, validated when the config is built."""

import dataclasses
import math
import re
from collections.abc import Sequence

ALL_LINEAR = "all-linear"

# Module names of the q and v projections: peft's default targets for the Llama
# family (also Mistral and Qwen2), used when `targets` is not given.
DEFAULT_TARGETS = ("q_proj", "v_proj")

INITS = ("kaiming", "gaussian")


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
  """

  rank: int = 8
  alpha: float = 8.0
  targets: Sequence[str] | str = DEFAULT_TARGETS
  dropout: float = 0.0
  init: str = "kaiming"
  use_rslora: bool = False

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int):
      raise ValueError(f"LoRA rank must be an integer, got {self.rank!r}.")
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
    object.__setattr__(self, "targets", _validate_targets(self.targets))

  @property
  def scale(self) -> float:
    """Multiplier applied to the adapter's output `(x @ A) @ B`."""
    if self.use_rslora:
      return self.alpha / math.sqrt(self.rank)
    return self.alpha / self.rank

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

"""The Llama architecture's hyperparameters, with Hugging Face's field names.

`LlamaConfig.from_hf` reads a `config.json` dict in either layout that
transformers writes: version 4 keeps `rope_theta` and `rope_scaling` at the top
level, version 5 nests both in `rope_parameters`. `to_hf` writes both layouts,
so transformers 4 and 5 read the file back to the same config.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama",)

# Rotary scaling types and the fields each one needs besides `rope_type`.
ROPE_FIELDS = {
    "linear": ("factor",),
    "llama3": (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    ),
}

_REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes and constants of a Llama-family decoder.

  Attributes:
    vocab_size: V, the number of token ids.
    hidden_size: D, the model width.
    intermediate_size: F, the width of the SwiGLU MLP.
    num_hidden_layers: L, the number of decoder layers.
    num_attention_heads: H, the number of query heads.
    num_key_value_heads: K, the number of key and value heads; H must be a
      multiple of K. Defaults to H (multi-head attention).
    head_dim: width of one head. Defaults to `hidden_size // num_attention_heads`;
      `H * head_dim` may differ from D.
    max_position_embeddings: maximum sequence length the model was trained
      on, in tokens.
    rms_norm_eps: epsilon added to the mean square in RMSNorm.
    rope_theta: base of the rotary frequencies.
    rope_scaling: None for plain rotary embeddings, or a dict with
      `rope_type` "linear" (field `factor`) or "llama3" (fields `factor`,
      `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`).
    tie_word_embeddings: whether the output head reuses the token embedding.
    attention_bias: whether the q, k, v and o projections have biases.
    mlp_bias: whether the MLP projections have biases.
    bos_token_id: id of the beginning-of-sequence token, or None.
    eos_token_id: id (or tuple of ids) of the end-of-sequence token, or None.
    pad_token_id: id of the padding token, or None.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None and _is_positive_int(self.num_attention_heads):
      object.__setattr__(
          self, "head_dim", self.hidden_size // self.num_attention_heads
      )
    if isinstance(self.eos_token_id, Sequence):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))
    self._check_sizes()

  def __hash__(self):
    values = []
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, Mapping):
        value = tuple(sorted(value.items()))
      values.append(value)
    return hash(tuple(values))

  def _check_sizes(self):
    for name in (
        *_REQUIRED_HF_FIELDS,
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    ):
      value = getattr(self, name)
      if not _is_positive_int(value):
        raise ValueError(
            f"LlamaConfig.{name} must be a positive integer, got {value!r}."
            " Set it from the model's config.json."
        )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads={self.num_attention_heads} is not a multiple"
          f" of num_key_value_heads={self.num_key_value_heads}. Use a number"
          " of key and value heads that divides the number of query heads."
      )
    if not self.rms_norm_eps > 0:
      raise ValueError(
          f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}."
      )
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}.")

  @property
  def num_queries_per_kv(self) -> int:
    """Query heads that share one key and value head, H / K."""
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
    """Build a config from a Hugging Face `config.json` dict.

    Raises:
      ValueError: if `model_type` is not a Llama-family type, a size field is
        missing, or the activation, attention dropout or rotary scaling is
        one this model does not implement.
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unsupported model_type {model_type!r} in config.json. Supported"
          f" model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
      )
    missing = [name for name in _REQUIRED_HF_FIELDS if name not in config]
    if missing:
      raise ValueError(
          f"config.json is missing the fields {', '.join(missing)}. A Llama"
          f" config needs all of {', '.join(_REQUIRED_HF_FIELDS)}."
      )
    _check_unsupported(config)

    rope_theta, rope_scaling = _read_rope(config)
    fields = {
        field.name: config[field.name]
        for field in dataclasses.fields(cls)
        if field.name in config and field.name not in ("rope_theta", "rope_scaling")
    }
    return cls(**fields, rope_theta=rope_theta, rope_scaling=rope_scaling)

  def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
    """Return a `config.json` dict that transformers reads back to this config.

    Args:
      dtype: the dtype of the saved weights, such as "bfloat16", recorded as
        `dtype` (transformers 5) and `torch_dtype` (transformers 4).
    """
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    for field in dataclasses.fields(self):
      out[field.name] = getattr(self, field.name)
    if isinstance(self.eos_token_id, tuple):
      out["eos_token_id"] = list(self.eos_token_id)
    out["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)

    rope_parameters = {"rope_type": "default"}
    if self.rope_scaling is not None:
      rope_parameters = dict(self.rope_scaling)
    out["rope_parameters"] = {**rope_parameters, "rope_theta": self.rope_theta}
    out["hidden_act"] = "silu"
    out["attention_dropout"] = 0.0
    if dtype is not None:
      out["dtype"] = dtype
      out["torch_dtype"] = dtype
    return out


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_unsupported(config):
  activation = config.get("hidden_act", "silu")
  if activation != "silu":
    raise ValueError(
        f"hidden_act {activation!r} is not supported. This Llama model"
        " implements the SwiGLU MLP with 'silu' only."
    )
  dropout = config.get("attention_dropout", 0.0)
  if dropout:
    raise ValueError(
        f"attention_dropout {dropout!r} is not supported. Set it to 0.0 in"
        " config.json, and use LoRA dropout on the adapters instead."
    )


def _read_rope(config):
  """Return `(rope_theta, rope_scaling)` from either transformers layout."""
  parameters = config.get("rope_parameters")
  if parameters is not None:
    scaling = dict(parameters)
    theta = scaling.pop("rope_theta", config.get("rope_theta", 10000.0))
    return theta, scaling
  return config.get("rope_theta", 10000.0), config.get("rope_scaling")


def _check_rope_scaling(scaling):
  """Return `scaling` as a plain dict keyed by `rope_type`, or None for default."""
  if scaling is None:
    return None
  scaling = dict(scaling)
  rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
  scaling.pop("type", None)
  scaling.pop("rope_theta", None)
  if rope_type in (None, "default"):
    return None
  if rope_type not in ROPE_FIELDS:
    raise ValueError(
        f"Unsupported rope_type {rope_type!r}. Supported rotary scalings:"
        f" default, {', '.join(ROPE_FIELDS)}."
    )

  needed = ROPE_FIELDS[rope_type]
  missing = [name for name in needed if scaling.get(name) is None]
  if missing:
    raise ValueError(
        f"rope_scaling of type {rope_type!r} is missing {', '.join(missing)}."
        f" It needs {', '.join(needed)}."
    )
  out = {"rope_type": rope_type}
  out.update((name, scaling[name]) for name in needed)
  return out

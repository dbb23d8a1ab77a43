"""Hyperparameters of the Llama family of decoders, with Hugging Face's field names.

One config and one Flax module serve every architecture that differs from
Llama only in a few fixed choices, recorded per `model_type` in `FAMILY`:

    llama    the reference: RMSNorm, rotary embeddings, SwiGLU MLP
    mistral  optional sliding-window attention
    qwen2    biases on q, k and v (not o); optional sliding window
    gemma    RMSNorm scale (1 + w), embeddings times sqrt(D), gelu-tanh MLP,
             tied output head by default
    phi3     fused `qkv_proj` and `gate_up_proj`; optional sliding window and
             partial rotary embeddings

`LlamaConfig.from_hf` reads a `config.json` dict in either layout that
transformers writes: version 4 keeps `rope_theta` and `rope_scaling` at the top
level, version 5 nests both in `rope_parameters`. `to_hf` writes both layouts,
so transformers 4 and 5 read the file back to the same config.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

# Activations of the gated MLP, by transformers' names.
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class Family:
  """The fixed choices of one `model_type` of the Llama family.

  Attributes:
    hf_class: the transformers class of the causal language model.
    qkv_bias: whether q, k and v have biases regardless of
      `attention_bias`.
    norm_offset: RMSNorm multiplies the normalized input by
      `norm_offset + weight`.
    scale_embeddings: whether token embeddings are multiplied by sqrt(D).
    fused_projections: whether q, k, v are one `qkv_proj` `[D, (H+2K)*hd]` and
      gate and up are one `gate_up_proj` `[D, 2F]`, gate first.
    options: the optional `LlamaConfig` features this type may set, among
      "attention_bias", "mlp_bias", "sliding_window", "partial_rotary_factor".
    default_activation: `hidden_act` when config.json has none.
    default_tied: `tie_word_embeddings` when config.json has none.
  """

  hf_class: str
  qkv_bias: bool = False
  norm_offset: float = 0.0
  scale_embeddings: bool = False
  fused_projections: bool = False
  options: frozenset[str] = frozenset()
  default_activation: str = "silu"
  default_tied: bool = False


FAMILY = {
    "llama": Family("LlamaForCausalLM", options=frozenset({"attention_bias", "mlp_bias"})),
    "mistral": Family("MistralForCausalLM", options=frozenset({"sliding_window"})),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, options=frozenset({"sliding_window"})),
    "gemma": Family(
        "GemmaForCausalLM", norm_offset=1.0, scale_embeddings=True,
        options=frozenset({"attention_bias"}),
        default_activation="gelu_pytorch_tanh", default_tied=True,
    ),
    "phi3": Family(
        "Phi3ForCausalLM", fused_projections=True,
        options=frozenset({"sliding_window", "partial_rotary_factor"}),
    ),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY)

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
  """Sizes and constants of a Llama-family decoder (see `FAMILY`).

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
    model_type: the architecture, a key of `FAMILY`.
    hidden_act: the MLP activation, "silu" or "gelu_pytorch_tanh" (the
      tanh approximation of gelu).
    sliding_window: None, or the number of most recent tokens (the token
      itself included) that each token attends to, in every layer.
    partial_rotary_factor: the fraction of each head's channels that rotary
      embeddings rotate (the first `int(head_dim * factor)`, an even number);
      the rest pass through.
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
  model_type: str = "llama"
  hidden_act: str = "silu"
  sliding_window: int | None = None
  partial_rotary_factor: float = 1.0

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
    self._check_family()
    self._check_sizes()

  def __hash__(self):
    values = []
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, Mapping):
        value = tuple(sorted(value.items()))
      values.append(value)
    return hash(tuple(values))

  def _check_family(self):
    if self.model_type not in FAMILY:
      raise ValueError(
          f"LlamaConfig.model_type {self.model_type!r} is not a Llama-family"
          f" type; use one of {', '.join(FAMILY)}."
      )
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f"hidden_act {self.hidden_act!r} is not supported. The gated MLP"
          f" implements {', '.join(repr(a) for a in ACTIVATIONS)}."
      )
    options = FAMILY[self.model_type].options
    in_use = {
        "attention_bias": bool(self.attention_bias),
        "mlp_bias": bool(self.mlp_bias),
        "sliding_window": self.sliding_window is not None,
        "partial_rotary_factor": self.partial_rotary_factor != 1.0,
    }
    for name, used in in_use.items():
      if used and name not in options:
        raise ValueError(
            f"{name}={getattr(self, name)!r} is not part of the"
            f" {self.model_type} architecture, whose optional features are"
            f" {', '.join(sorted(options)) or 'none'}. Leave it at its default."
        )
    if self.sliding_window is not None and not _is_positive_int(self.sliding_window):
      raise ValueError(
          f"sliding_window must be None or a positive integer, got"
          f" {self.sliding_window!r}."
      )

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
    rotary = self.head_dim * self.partial_rotary_factor
    if not 0 < rotary <= self.head_dim or int(rotary) % 2:
      raise ValueError(
          f"partial_rotary_factor={self.partial_rotary_factor!r} gives"
          f" {int(rotary)} rotary channels of head_dim={self.head_dim}; it"
          " must give an even number between 2 and head_dim."
      )

  @property
  def num_queries_per_kv(self) -> int:
    """Query heads that share one key and value head, H / K."""
    return self.num_attention_heads // self.num_key_value_heads

  @property
  def family(self) -> Family:
    """The fixed choices of this `model_type`."""
    return FAMILY[self.model_type]

  @property
  def qkv_bias(self) -> bool:
    """Whether the q, k and v projections have biases."""
    return self.attention_bias or self.family.qkv_bias

  @property
  def rotary_dim(self) -> int:
    """The number of channels of each head that rotary embeddings rotate."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def embedding_scale(self) -> float | None:
    """The factor sqrt(D) applied to token embeddings, or None for none."""
    if self.family.scale_embeddings:
      return math.sqrt(self.hidden_size)
    return None

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "LlamaConfig":
    """Build a config from a Hugging Face `config.json` dict.

    Raises:
      ValueError: if `model_type` is not a Llama-family type, a size field is
        missing, or the activation, a dropout, the rotary scaling or a mix of
        sliding-window and full-attention layers is one this model does not
        implement.
    """
    model_type = config.get("model_type")
    if model_type not in FAMILY:
      raise ValueError(
          f"Unsupported model_type {model_type!r} in config.json. Supported"
          f" model types: {', '.join(SUPPORTED_MODEL_TYPES)}. Read other"
          " architectures with jaxlora.models.config_from_hf."
      )
    missing = [name for name in _REQUIRED_HF_FIELDS if name not in config]
    if missing:
      raise ValueError(
          f"config.json is missing the fields {', '.join(missing)}. A"
          f" {model_type} config needs all of {', '.join(_REQUIRED_HF_FIELDS)}."
      )
    family = FAMILY[model_type]
    _check_dropouts(config, ("attention_dropout", "resid_pdrop", "embd_pdrop"))

    rope_theta, rope_scaling = _read_rope(config)
    fields = {
        field.name: config[field.name]
        for field in dataclasses.fields(cls)
        if field.name in config and field.name not in _FAMILY_FIELDS
    }
    fields.update(
        model_type=model_type,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        hidden_act=_read_activation(config, model_type, family),
        tie_word_embeddings=config.get("tie_word_embeddings", family.default_tied),
    )
    for name in ("attention_bias", "mlp_bias"):
      if name in family.options:
        fields[name] = config.get(name, False)
    if "sliding_window" in family.options:
      fields["sliding_window"] = _read_sliding_window(config, model_type)
    if "partial_rotary_factor" in family.options:
      fields["partial_rotary_factor"] = _read_partial_rotary_factor(config)
    return cls(**fields)

  def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
    """Return a `config.json` dict that transformers reads back to this config.

    Args:
      dtype: the dtype of the saved weights, such as "bfloat16", recorded as
        `dtype` (transformers 5) and `torch_dtype` (transformers 4).
    """
    family = self.family
    out = {"architectures": [family.hf_class]}
    for field in dataclasses.fields(self):
      if field.name not in _FAMILY_FIELDS or field.name in family.options:
        out[field.name] = getattr(self, field.name)
    out["model_type"] = self.model_type
    out["hidden_act"] = self.hidden_act
    out["tie_word_embeddings"] = self.tie_word_embeddings
    if isinstance(self.eos_token_id, tuple):
      out["eos_token_id"] = list(self.eos_token_id)
    out["rope_theta"] = self.rope_theta
    out["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)

    rope_parameters = {"rope_type": "default"}
    if self.rope_scaling is not None:
      rope_parameters = dict(self.rope_scaling)
    out["rope_parameters"] = {**rope_parameters, "rope_theta": self.rope_theta}
    if "partial_rotary_factor" in family.options:
      out["rope_parameters"]["partial_rotary_factor"] = self.partial_rotary_factor
    if self.model_type == "qwen2":
      out.update(self._qwen2_window_fields())
    out["attention_dropout"] = 0.0
    if self.model_type == "phi3":
      out["resid_pdrop"] = 0.0
      out["embd_pdrop"] = 0.0
    if dtype is not None:
      out["dtype"] = dtype
      out["torch_dtype"] = dtype
    return out

  def _qwen2_window_fields(self):
    """Return Qwen2's fields that put every layer under `sliding_window`, or none."""
    sliding = self.sliding_window is not None
    kind = "sliding_attention" if sliding else "full_attention"
    return {
        "use_sliding_window": sliding,
        "max_window_layers": 0 if sliding else self.num_hidden_layers,
        "layer_types": [kind] * self.num_hidden_layers,
    }


# Fields whose meaning or presence depends on the model type.
_FAMILY_FIELDS = (
    "model_type", "rope_theta", "rope_scaling", "hidden_act", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window", "partial_rotary_factor",
)


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_dropouts(config, names):
  for name in names:
    dropout = config.get(name, 0.0)
    if dropout:
      raise ValueError(
          f"{name} {dropout!r} is not supported. Set it to 0.0 in"
          " config.json, and use LoRA dropout on the adapters instead."
      )


def _read_activation(config, model_type, family):
  activation = config.get("hidden_act", family.default_activation)
  # transformers reads Gemma's legacy "gelu" as the tanh approximation.
  if model_type == "gemma" and activation == "gelu":
    activation = "gelu_pytorch_tanh"
  if activation not in ACTIVATIONS:
    raise ValueError(
        f"hidden_act {activation!r} is not supported. This model implements"
        f" the gated MLP with {', '.join(repr(a) for a in ACTIVATIONS)} only."
    )
  return activation


def _read_sliding_window(config, model_type):
  """Return the window that every layer uses, or None when no layer has one."""
  window = config.get("sliding_window")
  if model_type != "qwen2":
    return window

  # Qwen2 windows layers i >= max_window_layers, and only with use_sliding_window.
  layers = config["num_hidden_layers"]
  if not config.get("use_sliding_window", False):
    window = None
  layer_types = config.get("layer_types")
  if layer_types is None:
    first = config.get("max_window_layers", 28)
    layer_types = [
        "sliding_attention" if window is not None and i >= first else "full_attention"
        for i in range(layers)
    ]
  kinds = set(layer_types)
  if kinds == {"full_attention"}:
    return None
  if kinds == {"sliding_attention"} and window is not None:
    return window
  raise ValueError(
      f"Qwen2 layer_types {layer_types} (sliding_window={window!r}) mix"
      " full and sliding-window attention layers, which this model does not"
      " implement: every layer must use the same attention. Set"
      " use_sliding_window to false, or max_window_layers to 0."
  )


def _read_partial_rotary_factor(config):
  parameters = config.get("rope_parameters") or {}
  return parameters.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))


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

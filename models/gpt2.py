"""GPT-2 as a Flax Linen module, with LoRA-aware linear layers.

GPT-2 differs from the Llama family in every block: learned position
embeddings, LayerNorm with a bias, multi-head attention without rotary
embeddings, a fused `c_attn` projection and a plain (ungated) gelu MLP. Its
linear layers are transformers' `Conv1D`, whose weight is stored `[in, out]`
like our kernels, so the checkpoint needs no transposes.

The parameter tree, with the blocks stacked on a leading axis L (F = n_inner,
4 * D by default):

    {"transformer": {"wte": {"embedding": [V, D]},
                     "wpe": {"embedding": [P, D]},
                     "h": {"ln_1": {"scale": [L, D], "bias": [L, D]},
                           "attn": {"c_attn": {"kernel": [L, D, 3D], "bias": [L, 3D]},
                                    "c_proj": {"kernel": [L, D, D], "bias": [L, D]}},
                           "ln_2": {"scale": [L, D], "bias": [L, D]},
                           "mlp": {"c_fc": {"kernel": [L, D, F], "bias": [L, F]},
                                   "c_proj": {"kernel": [L, F, D], "bias": [L, D]}}},
                     "ln_f": {"scale": [D], "bias": [D]}},
     "lm_head": {"kernel": [D, V]}}

`lm_head` exists only when `tie_word_embeddings` is false; GPT-2 checkpoints
tie it to `wte`. The columns of `c_attn` are the queries, then the keys, then
the values, D each. Axis letters are those of `jaxlora.models.llama`, with P
for positions.

`Gpt2.decode` runs generation with the `KVCache` of `jaxlora.models.llama`
(`init_cache(config, B, S)`, keys and values `[L, B, S, H, hd]` since every
head has its own keys), called like `Llama.decode`. Its positions index
`wpe`, so left-padded rows pass positions that count real tokens only.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.models.llama import (
    INIT_STDDEV, KVCache, Linear, _attention_mask, _check_inputs, _constrain, _write_columns,
    extend_cache, output_logits, prepare_decode, remat_policy,
)

# transformers' names of the MLP activation -> function. "gelu_new" and
# "gelu_pytorch_tanh" are both the tanh approximation of gelu.
ACTIVATION_FUNCTIONS = {
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu": functools.partial(nn.gelu, approximate=False),
    "relu": nn.relu,
}

_REQUIRED_HF_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


@dataclasses.dataclass(frozen=True)
class Gpt2Config:
  """Sizes and constants of GPT-2, with transformers' `GPT2Config` field names.

  Attributes:
    vocab_size: V, the number of token ids.
    n_positions: P, the number of learned positions (the maximum sequence
      length, in tokens).
    n_embd: D, the model width.
    n_layer: L, the number of blocks.
    n_head: H, the number of attention heads; the head width is D / H.
    n_inner: F, the MLP width; None means 4 * D.
    activation_function: a key of `ACTIVATION_FUNCTIONS`.
    layer_norm_epsilon: epsilon added to the variance in LayerNorm.
    tie_word_embeddings: whether the output head reuses `wte`.
    scale_attn_weights: whether attention scores are divided by
      sqrt(head width).
    bos_token_id: id of the beginning-of-sequence token, or None.
    eos_token_id: id (or tuple of ids) of the end-of-sequence token, or None.
    pad_token_id: id of the padding token, or None.
    resid_pdrop: residual dropout probability of the checkpoint, written back
      to config.json.
    embd_pdrop: embedding dropout probability, written back likewise.
    attn_pdrop: attention dropout probability, written back likewise.
  """

  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  layer_norm_epsilon: float = 1e-5
  tie_word_embeddings: bool = True
  scale_attn_weights: bool = True
  bos_token_id: int | None = 50256
  eos_token_id: int | tuple[int, ...] | None = 50256
  pad_token_id: int | None = None
  # NOTE: these dropouts are kept for config.json only; the model applies
  # none of them, in training either. Use LoRA dropout on the adapters.
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1

  model_type = "gpt2"

  def __post_init__(self):
    if isinstance(self.eos_token_id, Sequence):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    for name in (*_REQUIRED_HF_FIELDS, "intermediate_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Gpt2Config.{name} must be a positive integer, got {value!r}."
            " Set it from the model's config.json."
        )
    if self.n_embd % self.n_head:
      raise ValueError(
          f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head};"
          " GPT-2 splits the model width evenly across heads."
      )
    if self.activation_function not in ACTIVATION_FUNCTIONS:
      raise ValueError(
          f"activation_function {self.activation_function!r} is not"
          f" supported; use one of {', '.join(ACTIVATION_FUNCTIONS)}."
      )
    if not self.layer_norm_epsilon > 0:
      raise ValueError(
          f"layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}."
      )

  @property
  def hidden_size(self) -> int:
    return self.n_embd

  @property
  def num_hidden_layers(self) -> int:
    return self.n_layer

  @property
  def num_attention_heads(self) -> int:
    return self.n_head

  @property
  def num_key_value_heads(self) -> int:
    """GPT-2 has one key and value head per query head."""
    return self.n_head

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @property
  def intermediate_size(self) -> int:
    return 4 * self.n_embd if self.n_inner is None else self.n_inner

  @property
  def max_position_embeddings(self) -> int:
    return self.n_positions

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "Gpt2Config":
    """Build a config from a GPT-2 `config.json` dict.

    Raises:
      ValueError: if `model_type` is not "gpt2", a size field is missing, or
        the config requests cross-attention or per-layer attention scaling,
        which this model does not implement.
    """
    if config.get("model_type") != "gpt2":
      raise ValueError(
          f"model_type {config.get('model_type')!r} is not 'gpt2'. Read other"
          " architectures with jaxlora.models.config_from_hf."
      )
    missing = [name for name in _REQUIRED_HF_FIELDS if name not in config]
    if missing:
      raise ValueError(
          f"config.json is missing the fields {', '.join(missing)}. A gpt2"
          f" config needs all of {', '.join(_REQUIRED_HF_FIELDS)}."
      )
    for name in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
      if config.get(name, False):
        raise ValueError(
            f"{name}=true is not supported by this GPT-2 model. Set it to"
            " false in config.json."
        )
    fields = {
        field.name: config[field.name]
        for field in dataclasses.fields(cls)
        if field.name in config
    }
    return cls(**fields)

  def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
    """Return a `config.json` dict that transformers reads back to this config.

    Args:
      dtype: the dtype of the saved weights, recorded as `dtype` and
        `torch_dtype`.
    """
    out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    for field in dataclasses.fields(self):
      out[field.name] = getattr(self, field.name)
    if isinstance(self.eos_token_id, tuple):
      out["eos_token_id"] = list(self.eos_token_id)
    out["scale_attn_by_inverse_layer_idx"] = False
    out["reorder_and_upcast_attn"] = False
    out["add_cross_attention"] = False
    if dtype is not None:
      out["dtype"] = dtype
      out["torch_dtype"] = dtype
    return out


class LayerNorm(nn.Module):
  """LayerNorm with a scale and a bias, computed in float32, then cast to `dtype`."""

  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (width,), jnp.float32)
    x = x.astype(jnp.float32)
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    x = centered * jax.lax.rsqrt(variance + self.eps)
    shape = (1,) * (x.ndim - 1) + (width,)
    return (x * scale.reshape(shape) + bias.reshape(shape)).astype(self.dtype)


class Attention(nn.Module):
  """Causal multi-head self-attention with the fused `c_attn` projection."""

  config: Gpt2Config
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask, deterministic, cache_index=None, cached_kv=None):
    """Attend over `x` `[B, T, D]` under `mask` `[B, 1, 1, T, S]` (True keeps).

    With `cached_kv`, this block's cached keys and values `[B, S, H, hd]`,
    the new ones are written at columns `cache_index ..` of a copy and the
    queries attend over all S columns.

    Returns:
      `(output [B, T, D], (keys, values))`, the keys and values of `x`
      `[B, T, H, hd]`.
    """
    config = self.config
    heads, hd, width = config.n_head, config.head_dim, config.n_embd
    batch, length, _ = x.shape
    linear = functools.partial(
        Linear, use_bias=True, dtype=self.dtype, lora_dropout=self.lora_dropout
    )

    qkv = linear(3 * width, name="c_attn")(x, deterministic)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q_BTHd = q.reshape(batch, length, heads, hd)
    k_BTHd = k.reshape(batch, length, heads, hd)
    v_BTHd = v.reshape(batch, length, heads, hd)
    k_BSHd, v_BSHd = k_BTHd, v_BTHd
    if cached_kv is not None:
      k_BSHd, v_BSHd = _write_columns(cached_kv, (k_BTHd, v_BTHd), cache_index, axis=1)

    scores = jnp.einsum("bthd,bshd->bhts", q_BTHd, k_BSHd).astype(jnp.float32)
    if config.scale_attn_weights:
      scores = scores / math.sqrt(hd)
    scores = jnp.where(mask[:, 0], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhts,bshd->bthd", weights, v_BSHd).reshape(batch, length, width)
    return linear(width, name="c_proj")(out, deterministic), (k_BTHd, v_BTHd)


class Mlp(nn.Module):
  """The feed-forward block, `c_proj(act(c_fc(x)))`."""

  config: Gpt2Config
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic):
    config = self.config
    linear = functools.partial(
        Linear, use_bias=True, dtype=self.dtype, lora_dropout=self.lora_dropout
    )
    hidden_BTF = linear(config.intermediate_size, name="c_fc")(x, deterministic)
    hidden_BTF = ACTIVATION_FUNCTIONS[config.activation_function](hidden_BTF)
    return linear(config.n_embd, name="c_proj")(hidden_BTF, deterministic)


class Block(nn.Module):
  """One pre-norm GPT-2 block, written as a `scan` body.

  It returns `(h, None)`, or with a cache `(h, (keys, values))`, this
  block's new keys and values `[B, T, H, hd]`.
  """

  config: Gpt2Config
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0
  deterministic: bool = True
  activation_sharding: jax.sharding.NamedSharding | None = None

  @nn.compact
  def __call__(self, h, mask, cache_index=None, cached_kv=None):
    config = self.config
    norm = lambda name: LayerNorm(config.layer_norm_epsilon, dtype=self.dtype, name=name)
    attention = Attention(config, self.dtype, self.lora_dropout, name="attn")
    mlp = Mlp(config, self.dtype, self.lora_dropout, name="mlp")

    h = _constrain(h, self.activation_sharding)
    attended, new_kv = attention(norm("ln_1")(h), mask, self.deterministic, cache_index, cached_kv)
    h = h + attended
    h = h + mlp(norm("ln_2")(h), self.deterministic)
    h = _constrain(h, self.activation_sharding)
    return h, (None if cached_kv is None else new_kv)


class Gpt2(nn.Module):
  """A GPT-2 causal language model, called like `jaxlora.models.Llama`.

  Attributes:
    config: the architecture.
    dtype: compute dtype of activations and products. LayerNorm, softmax and
      the returned logits are float32.
    lora_dropout: dropout probability on adapter inputs when not
      `deterministic`; needs a "dropout" rng.
    remat: recompute each block's activations in the backward pass.
    remat_policy: with `remat`, the name of the `jax.checkpoint_policies`
      policy that selects which intermediate values are kept.
    activation_sharding: sharding of the hidden states `[B, T, D]` at each
      block's input and output; None leaves the placement to the compiler.
  """

  config: Gpt2Config
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0
  remat: bool = False
  remat_policy: str = "dots_with_no_batch_dims_saveable"
  activation_sharding: jax.sharding.NamedSharding | None = None

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      deterministic: bool = True,
      segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Return the logits `[B, T, V]` float32 of token ids `[B, T]`.

    Args:
      input_ids: token ids `[B, T]`.
      positions: index into the learned positions `[B, T]`; defaults to
        `0..T-1` (transformers' default too, padding or not).
      attention_mask: `[B, T]`, 1 for real tokens and 0 for padding; None
        means every token is real.
      deterministic: False enables adapter dropout.
      segment_ids: `[B, T]` int, the example each token belongs to in a packed
        row; a token attends only to its own segment. None means one segment
        per row.
    """
    _check_inputs(input_ids, positions, attention_mask, segment_ids)
    batch, length = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    mask = _attention_mask(attention_mask, batch, length, segment_ids=segment_ids)
    logits, _ = self._forward(input_ids, positions, mask, deterministic)
    return logits

  def decode(
      self,
      input_ids: jax.Array,
      cache: KVCache,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Return the logits of T new tokens and the cache extended by them.

    The arguments and results are those of `jaxlora.models.Llama.decode`.
    Here `positions` index the learned position embeddings `wpe`.

    Raises:
      ValueError: if the shapes of the inputs or the cache do not match the
        model.
    """
    positions, valid, mask = prepare_decode(
        self.config, input_ids, cache, positions, attention_mask
    )
    logits, new_kv = self._forward(input_ids, positions, mask, True, cache)
    return logits, extend_cache(cache, new_kv, valid, input_ids.shape[1])

  @nn.compact
  def _forward(self, input_ids, positions, mask, deterministic, cache=None):
    """Return `(logits [B, T, V], new keys and values or None)` for `__call__` and `decode`."""
    policy = remat_policy(self.remat_policy) if self.remat else None
    transformer = _Transformer(
        self.config, self.dtype, self.lora_dropout, policy, self.activation_sharding,
        name="transformer",
    )
    h, new_kv = transformer(input_ids, positions, mask, deterministic, cache)
    return output_logits(self, transformer, h, deterministic), new_kv


class _Transformer(nn.Module):
  """The `transformer` scope: embeddings, scanned blocks and final LayerNorm."""

  config: Gpt2Config
  dtype: jnp.dtype
  lora_dropout: float
  remat_policy: object  # a jax.checkpoint_policies function, or None for no remat
  activation_sharding: jax.sharding.NamedSharding | None

  def setup(self):
    config = self.config
    embed = functools.partial(
        nn.Embed, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.initializers.normal(INIT_STDDEV),
    )
    self.wte = embed(config.vocab_size, config.n_embd)
    self.wpe = embed(config.n_positions, config.n_embd)
    self.ln_f = LayerNorm(config.layer_norm_epsilon, dtype=self.dtype)

  @nn.compact
  def __call__(self, input_ids, positions, mask, deterministic, cache=None):
    """Return the final hidden states `[B, T, D]` and, with a `KVCache`, the new keys and values.

    The new keys and values are `(keys, values)`, each `[L, B, T, H, hd]`.
    They are None without a cache.
    """
    block = Block
    if self.remat_policy is not None:
      block = nn.remat(block, prevent_cse=False, policy=self.remat_policy)
    in_axes = nn.broadcast if cache is None else (nn.broadcast, nn.broadcast, 0)
    blocks = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=self.config.n_layer,
    )(
        self.config, self.dtype, self.lora_dropout, deterministic,
        self.activation_sharding, name="h",
    )

    h = self.wte(input_ids) + self.wpe(positions)
    if cache is None:
      h, new_kv = blocks(h, mask)
    else:
      h, new_kv = blocks(h, mask, cache.length, (cache.keys, cache.values))
    return self.ln_f(h), new_kv

  def attend(self, h):
    """Return `h @ wte.T` `[B, T, V]`, the tied output head."""
    return self.wte.attend(h)


def init_params(config: Gpt2Config, rng: jax.Array) -> dict:
  """Return a random float32 parameter tree for `config`."""
  return _init_params(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config, rng):
  dummy_ids = jnp.zeros((1, 1), jnp.int32)
  return Gpt2(config).init({"params": rng}, dummy_ids)["params"]

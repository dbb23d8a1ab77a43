"""The Llama decoder as a Flax Linen module, with LoRA-aware linear layers.

Axis letters used in shapes and einsum strings:

    B  batch                   H   query heads
    T  query tokens            K   key and value heads
    S  key tokens              G   query heads per key and value head, H / K
    D  model width             hd  head width
    F  MLP width               r   adapter rank
    V  vocab                   L   layers

The parameter tree, with the decoder layers stacked on a leading axis L
because they run under `nn.scan`:

    {"model": {"embed_tokens": {"embedding": [V, D]},
               "layers": {"self_attn": {"q_proj": {"kernel": [L, D, H*hd]},
                                        "k_proj": {"kernel": [L, D, K*hd]},
                                        "v_proj": {"kernel": [L, D, K*hd]},
                                        "o_proj": {"kernel": [L, H*hd, D]}},
                          "mlp": {"gate_proj": {"kernel": [L, D, F]},
                                  "up_proj": {"kernel": [L, D, F]},
                                  "down_proj": {"kernel": [L, F, D]}},
                          "input_layernorm": {"scale": [L, D]},
                          "post_attention_layernorm": {"scale": [L, D]}},
               "norm": {"scale": [D]}},
     "lm_head": {"kernel": [D, V]}}

`lm_head` is absent when `tie_word_embeddings` is set; the logits are then
`h @ embedding.T`. Phi-3 (`config.family.fused_projections`) has one
`qkv_proj` `{"kernel": [L, D, (H+2K)*hd]}` in place of q, k and v (columns:
queries, then keys, then values) and one `gate_up_proj` `[L, D, 2F]` (gate
columns first) in place of gate and up. A `bias` leaf `[L, out]` sits beside the attention kernels
when `attention_bias` is set (beside q, k and v only for Qwen2) and beside the
MLP kernels when `mlp_bias` is set.
A kernel with an adapter also has `lora: {a: [L, in, r], b: [L, r, out],
scale: [L]}`, which `Linear` applies with `jaxlora.adapted_matmul`.

Rotary embeddings follow Hugging Face's convention: the two halves of each
head are rotated as a pair (`rotate_half`), not interleaved channels.

Generation keeps the keys and values of past tokens in a `KVCache` instead of
recomputing them. The cache is an explicit argument and result of
`Llama.decode`, a second entry point beside `__call__` that uses the same
parameter tree:

    cache = init_cache(config, batch_size=B, max_length=S)
    logits, cache = model.apply({"params": params}, prompt_ids, cache,
                                positions=..., attention_mask=..., method="decode")
    logits, cache = model.apply({"params": params}, next_ids, cache,
                                positions=..., method="decode")

The cache contains `keys` and `values` `[L, B, S, K, hd]`, stacked on L like
the layers and with the keys stored after the rotary embedding. It also
contains `valid` `[B, S]`, True at columns of real tokens, and `length`, the
number of columns written so far, which every row shares.

A call with T tokens `[B, T]` writes them at columns `length .. length + T -
1`, and each attends to the valid columns up to its own (and, with a sliding
window of W, to the last W of them). A prompt (prefill, T > 1) and each new
token (T = 1) go through the same method. Adapters are applied unmerged, as
in `__call__`.
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora.models.config import LlamaConfig

INIT_STDDEV = 0.02


class Linear(nn.Module):
  """A dense layer whose kernel may have a `lora` adapter subtree beside it.

  Attributes:
    features: output width.
    use_bias: whether to add a bias `[features]`.
    dtype: compute dtype.
    lora_dropout: dropout probability on the adapter's input in training.
  """

  features: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    init = nn.initializers.normal(INIT_STDDEV)
    kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)

    lora = None
    if self.has_variable("params", "lora"):
      lora = self.get_variable("params", "lora")
    dropout_rng = None
    if lora is not None and not deterministic and self.lora_dropout > 0:
      dropout_rng = self.make_rng("dropout")
    y = jaxlora.adapted_matmul(
        x, kernel, lora,
        dropout=self.lora_dropout, dropout_rng=dropout_rng, dtype=self.dtype,
    )

    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + _expand_to(bias.astype(self.dtype), y.ndim)
    return y


class RMSNorm(nn.Module):
  """Root-mean-square normalization computed in float32, then cast to `dtype`.

  The normalized input is multiplied by `offset + scale`: Llama stores the
  multiplier itself (offset 0, scale initialized to ones), Gemma stores its
  difference from one (offset 1, scale initialized to zeros).
  """

  eps: float
  dtype: jnp.dtype = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(mean_square + self.eps)
    return (x * _expand_to(self.offset + scale, x.ndim)).astype(self.dtype)


def _expand_to(vector, ndim):
  """Add leading axes to `vector` `[N]` to broadcast it over `[..., N]`."""
  return vector.reshape((1,) * (ndim - 1) + vector.shape)


def rope_frequencies(config: LlamaConfig) -> jax.Array:
  """Return the rotary angular frequencies `[rotary_dim / 2]`, in radians per position.

  Raises:
    ValueError: for a `rope_type` other than default, "linear" or "llama3".
  """
  # The frequencies depend only on the config, so they are computed in float64
  # with numpy and rounded once: float32 powers put the logits of SmolLM2 about
  # 3e-5 further from a float64 reference.
  dim = config.rotary_dim
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  inv_freq = 1.0 / (config.rope_theta ** exponents)

  scaling = config.rope_scaling
  if scaling is None:
    pass
  elif scaling["rope_type"] == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif scaling["rope_type"] == "llama3":
    inv_freq = _llama3_frequencies(inv_freq, scaling)
  else:
    raise ValueError(
        f"Unsupported rope_type {scaling['rope_type']!r}. Use default, linear"
        " or llama3."
    )
  return jnp.asarray(inv_freq, jnp.float32)


def _llama3_frequencies(inv_freq, scaling):
  """Divide low frequencies by `factor`, keep high ones, blend those between.

  A frequency whose wavelength exceeds `original / low_freq_factor` tokens is
  divided by `factor`. One whose wavelength is under `original /
  high_freq_factor` tokens is kept. Between the two bands, the divided and
  the kept frequency are mixed with a weight linear in `original / wavelength`.
  """
  factor = scaling["factor"]
  low = scaling["low_freq_factor"]
  high = scaling["high_freq_factor"]
  original = scaling["original_max_position_embeddings"]

  wavelength = 2 * math.pi / inv_freq
  blend = (original / wavelength - low) / (high - low)
  blended = (1 - blend) * inv_freq / factor + blend * inv_freq

  scaled = np.where(wavelength > original / low, inv_freq / factor, blended)
  return np.where(wavelength < original / high, inv_freq, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Return `(cos, sin)`, each `[B, T, rotary_dim]` float32, for positions `[B, T]`."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate `x` `[B, T, N, hd]` by the angles in `cos` and `sin` `[B, T, R]`.

  The first R channels of each head are rotated; the other `hd - R` channels
  (partial rotary embeddings) pass through unchanged.
  """
  x32 = x.astype(jnp.float32)
  rotary = cos.shape[-1]
  x_rot, x_pass = x32[..., :rotary], x32[..., rotary:]
  first, second = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  cos = cos[:, :, None, :]
  sin = sin[:, :, None, :]
  out = jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0

  def _linear(self, features, name, use_bias):
    return Linear(
        features, use_bias=use_bias, dtype=self.dtype,
        lora_dropout=self.lora_dropout, name=name,
    )

  @nn.compact
  def __call__(self, x, cos, sin, mask, deterministic, cache_index=None, cached_kv=None):
    """Attend over `x` `[B, T, D]` under `mask` `[B, 1, 1, T, S]` (True keeps).

    Without a cache the keys are those of `x` (S = T). With `cached_kv`, a
    pair of this layer's cached keys and values `[B, S, K, hd]`, the new keys
    and values are written at columns `cache_index ..` of a copy and the
    queries attend over all S columns.

    Returns:
      `(output [B, T, D], (keys, values))`, the keys and values of `x`
      `[B, T, K, hd]`.
    """
    config = self.config
    hd = config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    batch, length, _ = x.shape

    if config.family.fused_projections:
      qkv = self._linear((heads + 2 * kv_heads) * hd, "qkv_proj", config.qkv_bias)(x, deterministic)
      q, k, v = jnp.split(qkv, [heads * hd, (heads + kv_heads) * hd], axis=-1)
    else:
      q = self._linear(heads * hd, "q_proj", config.qkv_bias)(x, deterministic)
      k = self._linear(kv_heads * hd, "k_proj", config.qkv_bias)(x, deterministic)
      v = self._linear(kv_heads * hd, "v_proj", config.qkv_bias)(x, deterministic)
    q_BTHd = apply_rope(q.reshape(batch, length, heads, hd), cos, sin)
    k_BTKd = apply_rope(k.reshape(batch, length, kv_heads, hd), cos, sin)
    v_BTKd = v.reshape(batch, length, kv_heads, hd)
    k_BSKd, v_BSKd = k_BTKd, v_BTKd
    if cached_kv is not None:
      k_BSKd, v_BSKd = _write_columns(cached_kv, (k_BTKd, v_BTKd), cache_index, axis=1)

    out = dot_product_attention(q_BTHd, k_BSKd, v_BSKd, mask, self.dtype)
    out = out.reshape(batch, length, heads * hd)
    o_proj = self._linear(config.hidden_size, "o_proj", config.attention_bias)
    return o_proj(out, deterministic), (k_BTKd, v_BTKd)


def dot_product_attention(q_BTHd, k_BSKd, v_BSKd, mask, dtype):
  """Compute grouped-query attention, each of K key heads serving H / K query heads.

  Args:
    q_BTHd: queries `[B, T, H, hd]`.
    k_BSKd: keys `[B, S, K, hd]`, after the rotary embedding.
    v_BSKd: values `[B, S, K, hd]`.
    mask: `[B, 1, 1, T, S]` bool, True where a query attends to a key.
    dtype: dtype of the attention weights and the output. The scores and
      the softmax are float32.

  Returns:
    `[B, T, H, hd]` in `dtype`.
  """
  batch, length, heads, hd = q_BTHd.shape
  kv_heads = k_BSKd.shape[2]
  q_BTKGd = q_BTHd.reshape(batch, length, kv_heads, heads // kv_heads, hd)
  scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd)
  scores = scores.astype(jnp.float32) / math.sqrt(hd)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v_BSKd)
  return out.reshape(batch, length, heads, hd)


ACTIVATION_FUNCTIONS = {
    "silu": nn.silu,
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
}


class Mlp(nn.Module):
  """The gated feed-forward block, `down(act(gate(x)) * up(x))`."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0

  def _linear(self, features, name):
    return Linear(
        features, use_bias=self.config.mlp_bias, dtype=self.dtype,
        lora_dropout=self.lora_dropout, name=name,
    )

  @nn.compact
  def __call__(self, x, deterministic):
    config = self.config
    width = config.intermediate_size
    if config.family.fused_projections:
      gate_up = self._linear(2 * width, "gate_up_proj")(x, deterministic)
      gate, up = jnp.split(gate_up, 2, axis=-1)
    else:
      gate = self._linear(width, "gate_proj")(x, deterministic)
      up = self._linear(width, "up_proj")(x, deterministic)
    hidden_BTF = ACTIVATION_FUNCTIONS[config.hidden_act](gate) * up
    return self._linear(config.hidden_size, "down_proj")(hidden_BTF, deterministic)


class DecoderLayer(nn.Module):
  """One pre-norm decoder layer, written as a `scan` body.

  It returns `(h, None)`, or with a cache `(h, (keys, values))`, this
  layer's new keys and values `[B, T, K, hd]`, which `scan` stacks on L.
  """

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0
  deterministic: bool = True
  activation_sharding: jax.sharding.NamedSharding | None = None

  @nn.compact
  def __call__(self, h, cos, sin, mask, cache_index=None, cached_kv=None):
    config = self.config
    norm = lambda name: RMSNorm(
        config.rms_norm_eps, dtype=self.dtype, offset=config.family.norm_offset, name=name
    )
    attention = Attention(config, self.dtype, self.lora_dropout, name="self_attn")
    mlp = Mlp(config, self.dtype, self.lora_dropout, name="mlp")

    h = _constrain(h, self.activation_sharding)
    x = norm("input_layernorm")(h)
    attended, new_kv = attention(x, cos, sin, mask, self.deterministic, cache_index, cached_kv)
    h = h + attended
    x = norm("post_attention_layernorm")(h)
    h = h + mlp(x, self.deterministic)
    h = _constrain(h, self.activation_sharding)
    return h, (None if cached_kv is None else new_kv)


class KVCache(NamedTuple):
  """The keys and values of the tokens seen so far, read by `decode`.

  Attributes:
    keys: `[L, B, S, K, hd]`, after the rotary embedding. S is the cache
      size in tokens.
    values: `[L, B, S, K, hd]`.
    valid: `[B, S]` bool, True at columns that hold a real token, False at
      padding and at columns not yet written.
    length: `[]` int32, the number of columns written. The next token goes
      to column `length`.
  """

  keys: jax.Array
  values: jax.Array
  valid: jax.Array
  length: jax.Array


def init_cache(config, batch_size: int, max_length: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
  """Return an empty cache of `max_length` columns (S) for `batch_size` rows (B).

  Args:
    config: a `LlamaConfig` or `Gpt2Config`, whose `num_hidden_layers`,
      `num_key_value_heads` and `head_dim` give L, K and hd.
    batch_size: B.
    max_length: S, the prompt columns plus the most tokens to generate.
    dtype: dtype of the keys and values, normally the model's compute dtype.

  Raises:
    ValueError: if `batch_size` or `max_length` is not a positive integer.
  """
  for name, value in (("batch_size", batch_size), ("max_length", max_length)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  shape = (
      config.num_hidden_layers, batch_size, max_length,
      config.num_key_value_heads, config.head_dim,
  )
  return KVCache(
      keys=jnp.zeros(shape, dtype),
      values=jnp.zeros(shape, dtype),
      valid=jnp.zeros((batch_size, max_length), bool),
      length=jnp.zeros((), jnp.int32),
  )


def prepare_decode(config, input_ids, cache, positions, attention_mask, sliding_window=None):
  """Check the inputs of a `decode` call and return `(positions, valid, mask)`.

  `positions` `[B, T]` is filled in when None, `valid` `[B, S]` is the
  cache's `valid` with the new tokens' columns set from `attention_mask`,
  and `mask` `[B, 1, 1, T, S]` is True where a new token attends to a column.

  Raises:
    ValueError: if an input's shape does not match `input_ids` or the cache's
      shape does not match the config and the batch.
  """
  _check_inputs(input_ids, positions, attention_mask)
  batch, length = input_ids.shape
  size = cache.valid.shape[-1]
  expected = (config.num_hidden_layers, batch, size, config.num_key_value_heads, config.head_dim)
  shapes_match = cache.keys.shape == expected and cache.values.shape == expected
  if not shapes_match or cache.valid.shape != (batch, size):
    raise ValueError(
        f"The cache has keys {tuple(cache.keys.shape)}, values"
        f" {tuple(cache.values.shape)} and valid {tuple(cache.valid.shape)}, but"
        f" this model and a batch of {batch} need keys and values {expected} and"
        f" valid {(batch, size)}; build it with init_cache(config, {batch}, max_length)."
    )
  if length > size:
    raise ValueError(
        f"input_ids has {length} tokens, more than the cache's {size} columns;"
        " build the cache with a larger max_length."
    )

  start = cache.length
  if positions is None:
    positions = jnp.broadcast_to(start + jnp.arange(length)[None, :], (batch, length))
  if attention_mask is None:
    attention_mask = jnp.ones((batch, length), bool)
  valid = jax.lax.dynamic_update_slice_in_dim(
      cache.valid, attention_mask.astype(bool), start, axis=1
  )

  # Query t sits at column start + t and attends to columns s at distance
  # start + t - s in [0, sliding_window).
  distance = (start + jnp.arange(length))[:, None] - jnp.arange(size)[None, :]
  allowed_TS = distance >= 0
  if sliding_window is not None:
    allowed_TS = jnp.logical_and(allowed_TS, distance < sliding_window)
  mask = jnp.logical_and(allowed_TS[None, None, None], valid[:, None, None, None, :])
  return positions, valid, mask


def extend_cache(cache: KVCache, new_kv, valid: jax.Array, length: int) -> KVCache:
  """Return `cache` with the new keys and values `[L, B, T, K, hd]` written at column `cache.length`."""
  keys, values = _write_columns(
      (cache.keys, cache.values), new_kv, cache.length, axis=2
  )
  return KVCache(keys, values, valid, cache.length + length)


def _write_columns(cached, new, start, axis):
  """Return copies of the arrays `cached` with the matching arrays of `new` written from `start` on `axis`.

  NOTE: `dynamic_update_slice` clamps a start that would run past the end,
  so a write past a full cache silently overwrites its last columns.
  `prepare_decode` checks T against S, but it cannot check the traced
  `length`.
  """
  return tuple(
      jax.lax.dynamic_update_slice_in_dim(old, update.astype(old.dtype), start, axis=axis)
      for old, update in zip(cached, new)
  )


class Llama(nn.Module):
  """A Llama causal language model.

  Attributes:
    config: the architecture.
    dtype: compute dtype of activations and products. Norms, softmax and the
      returned logits are float32.
    lora_dropout: dropout probability on adapter inputs when not
      `deterministic`; needs a "dropout" rng.
    remat: recompute each layer's activations in the backward pass instead
      of storing them.
    remat_policy: with `remat`, the name of the `jax.checkpoint_policies`
      policy that says which intermediate values are kept, such as
      "nothing_saveable" (keep none) or "dots_with_no_batch_dims_saveable"
      (keep the outputs of the matrix products).
    activation_sharding: sharding of the hidden states `[B, T, D]`, imposed
      with `jax.lax.with_sharding_constraint` at each layer's input and
      output; None leaves the placement to the compiler.
  """

  config: LlamaConfig
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
      positions: position of each token `[B, T]`; defaults to `0..T-1`. A
        packed row restarts them at 0 for each example.
      attention_mask: `[B, T]`, 1 for real tokens and 0 for padding, which no
        token attends to; None means every token is real.
      deterministic: False enables adapter dropout.
      segment_ids: `[B, T]` int, the example each token belongs to in a packed
        row; a token attends only to tokens of its own segment. None means one
        segment per row.
    """
    _check_inputs(input_ids, positions, attention_mask, segment_ids)
    batch, length = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    mask = _attention_mask(
        attention_mask, batch, length, self.config.sliding_window, segment_ids
    )
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

    The new tokens attend to each other causally and to the valid cached
    columns. Adapter dropout is off.

    Args:
      input_ids: token ids `[B, T]`, for example a left-padded prompt or one
        new token per row.
      cache: the cache from `init_cache` or from the previous call.
        `cache.length + T` must not exceed its S columns.
      positions: position of each token `[B, T]`; defaults to its column,
        `cache.length + 0..T-1`, which is right only for rows without
        padding.
      attention_mask: `[B, T]`, 1 for real tokens and 0 for padding; None
        means every new token is real.

    Returns:
      `(logits [B, T, V] float32, cache)` with the new keys and values at
      columns `length .. length + T - 1` and `length` advanced by T.

    Raises:
      ValueError: if the shapes of the inputs or the cache do not match the
        model.
    """
    config = self.config
    positions, valid, mask = prepare_decode(
        config, input_ids, cache, positions, attention_mask, config.sliding_window
    )
    logits, new_kv = self._forward(input_ids, positions, mask, True, cache)
    return logits, extend_cache(cache, new_kv, valid, input_ids.shape[1])

  @nn.compact
  def _forward(self, input_ids, positions, mask, deterministic, cache=None):
    """Return `(logits [B, T, V], new keys and values or None)`.

    `__call__` and `decode` share this body, so both build the same tree.
    """
    config = self.config
    cos, sin = rope_tables(positions, rope_frequencies(config))
    policy = remat_policy(self.remat_policy) if self.remat else None
    model = _Backbone(
        config, self.dtype, self.lora_dropout, policy, self.activation_sharding,
        name="model",
    )
    h, new_kv = model(input_ids, cos, sin, mask, deterministic, cache)
    return output_logits(self, model, h, deterministic), new_kv


def output_logits(parent: nn.Module, backbone: nn.Module, h: jax.Array, deterministic: bool) -> jax.Array:
  """Return the float32 logits `[B, T, V]` of the final hidden states `h` `[B, T, D]`.

  Called from `parent`'s compact `__call__`: a tied head multiplies by the
  embedding through `backbone.attend`; an untied one is the `lm_head` layer
  of `parent`, which may carry an adapter.
  """
  config = parent.config
  if config.tie_word_embeddings:
    logits = backbone.attend(h)
  else:
    head = Linear(
        config.vocab_size, dtype=parent.dtype, lora_dropout=parent.lora_dropout,
        name="lm_head", parent=parent,
    )
    logits = head(h, deterministic)
  return logits.astype(jnp.float32)


class _Backbone(nn.Module):
  """The `model` scope: token embedding, scanned layers and final norm."""

  config: LlamaConfig
  dtype: jnp.dtype
  lora_dropout: float
  remat_policy: object  # a jax.checkpoint_policies function, or None for no remat
  activation_sharding: jax.sharding.NamedSharding | None

  def setup(self):
    self.embed_tokens = nn.Embed(
        self.config.vocab_size, self.config.hidden_size, dtype=self.dtype,
        param_dtype=jnp.float32,
        embedding_init=nn.initializers.normal(INIT_STDDEV),
    )
    self.norm = RMSNorm(
        self.config.rms_norm_eps, dtype=self.dtype, offset=self.config.family.norm_offset
    )

  @nn.compact
  def __call__(self, input_ids, cos, sin, mask, deterministic, cache=None):
    """Return the final hidden states `[B, T, D]` and, with a `KVCache`, the new keys and values.

    The new keys and values are `(keys, values)`, each `[L, B, T, K, hd]`.
    They are None without a cache.
    """
    layer = DecoderLayer
    if self.remat_policy is not None:
      layer = nn.remat(layer, prevent_cse=False, policy=self.remat_policy)
    # Every layer gets the same cache index, and the cached keys and values
    # are scanned over their leading L axis like the parameters.
    in_axes = (nn.broadcast,) * 3 if cache is None else (nn.broadcast,) * 4 + (0,)
    layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=self.config.num_hidden_layers,
    )(
        self.config, self.dtype, self.lora_dropout, deterministic,
        self.activation_sharding, name="layers",
    )

    h = self.embed_tokens(input_ids)
    if self.config.embedding_scale is not None:
      h = h * jnp.asarray(self.config.embedding_scale, h.dtype)
    if cache is None:
      h, new_kv = layers(h, cos, sin, mask)
    else:
      h, new_kv = layers(h, cos, sin, mask, cache.length, (cache.keys, cache.values))
    return self.norm(h), new_kv

  def attend(self, h):
    """Return `h @ embedding.T` `[B, T, V]`, the tied output head."""
    return self.embed_tokens.attend(h)


def remat_policy(name: str):
  """Return the `jax.checkpoint_policies` policy called `name`.

  Raises:
    ValueError: if jax has no policy of that name; the message lists them.
  """
  policy = getattr(jax.checkpoint_policies, name, None)
  if not isinstance(name, str) or name.startswith("_") or not callable(policy):
    known = sorted(
        key for key in dir(jax.checkpoint_policies)
        if not key.startswith("_") and key.endswith("saveable")
    )
    raise ValueError(
        f"Unknown remat_policy {name!r}; use one of {', '.join(known)}."
    )
  return policy


def _constrain(h, sharding):
  if sharding is None:
    return h
  return jax.lax.with_sharding_constraint(h, sharding)


def _attention_mask(attention_mask, batch, length, sliding_window=None, segment_ids=None):
  """Return a boolean mask `[B, 1, 1, T, S]`, True where a query attends to a key.

  A query at index t attends to the keys at indices s <= t, and with a
  `sliding_window` of W only to those with t - s < W (itself and the W - 1
  before it). With `segment_ids` `[B, T]`, only to keys of its own segment.
  """
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  if sliding_window is not None:
    causal = jnp.triu(causal, k=1 - sliding_window)
  mask = jnp.broadcast_to(causal[None, None, None], (batch, 1, 1, length, length))
  if segment_ids is not None:
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = jnp.logical_and(mask, same_segment[:, None, None])
  if attention_mask is None:
    return mask
  keys = attention_mask.astype(bool)[:, None, None, None, :]
  return jnp.logical_and(mask, keys)


def _check_inputs(input_ids, positions, attention_mask, segment_ids=None):
  if input_ids.ndim != 2:
    raise ValueError(
        f"input_ids has shape {tuple(input_ids.shape)}; expected [batch,"
        " tokens]. Add a batch axis to a single sequence with ids[None]."
    )
  for name, value in (
      ("positions", positions),
      ("attention_mask", attention_mask),
      ("segment_ids", segment_ids),
  ):
    if value is not None and value.shape != input_ids.shape:
      raise ValueError(
          f"{name} has shape {tuple(value.shape)}, but input_ids has shape"
          f" {tuple(input_ids.shape)}; they must match."
      )


def init_params(config: LlamaConfig, rng: jax.Array) -> dict:
  """Return a random float32 parameter tree for `config`.

  Under `jax.eval_shape` it returns the tree's shapes without allocating it:

      shapes = jax.eval_shape(functools.partial(init_params, config), rng)
  """
  return _init_params(config, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config, rng):
  dummy_ids = jnp.zeros((1, 1), jnp.int32)
  return Llama(config).init({"params": rng}, dummy_ids)["params"]

"""The Llama decoder as a Flax Linen module, with LoRA-aware linear layers.

Axis letters used in shapes and einsum strings:

    B batch, T query tokens, S key tokens, D model width, H query heads,
    K key and value heads, G query heads per key and value head (H / K),
    hd head width, F MLP width, V vocab, r adapter rank, L layers.

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
`h @ embedding.T`. A `bias` leaf `[L, out]` sits beside the attention kernels
when `attention_bias` is set and beside the MLP kernels when `mlp_bias` is set.
A kernel with an adapter also holds `lora: {a: [L, in, r], b: [L, r, out],
scale: [L]}`, which `Linear` applies with `jaxlora.adapted_matmul`.

Rotary embeddings follow Hugging Face's convention: the two halves of each
head are rotated as a pair (`rotate_half`), not interleaved channels.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxlora
from jaxlora.models.config import LlamaConfig

INIT_STDDEV = 0.02


class Linear(nn.Module):
  """A dense layer whose kernel may carry a `lora` adapter subtree.

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
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """Root-mean-square normalization computed in float32, then cast to `dtype`."""

  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(mean_square + self.eps)
    return (x * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(config: LlamaConfig) -> jax.Array:
  """Return the rotary angular frequencies `[hd / 2]`, in radians per position.

  Raises:
    ValueError: for a `rope_type` other than default, "linear" or "llama3".
  """
  dim = config.head_dim
  exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  inv_freq = 1.0 / (config.rope_theta ** exponents)

  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling["rope_type"] == "linear":
    return inv_freq / scaling["factor"]
  if scaling["rope_type"] == "llama3":
    return _llama3_frequencies(inv_freq, scaling)
  raise ValueError(
      f"Unsupported rope_type {scaling['rope_type']!r}; use default, linear"
      " or llama3."
  )


def _llama3_frequencies(inv_freq, scaling):
  """Divide low frequencies by `factor`, keep high ones, blend those between.

  A frequency whose wavelength exceeds `original / low_freq_factor` tokens is
  divided by `factor`; one whose wavelength is under `original /
  high_freq_factor` is kept; in between the two are mixed linearly in
  `original / wavelength`.
  """
  factor = scaling["factor"]
  low = scaling["low_freq_factor"]
  high = scaling["high_freq_factor"]
  original = scaling["original_max_position_embeddings"]

  wavelength = 2 * math.pi / inv_freq
  blend = (original / wavelength - low) / (high - low)
  blended = (1 - blend) * inv_freq / factor + blend * inv_freq

  scaled = jnp.where(wavelength > original / low, inv_freq / factor, blended)
  return jnp.where(wavelength < original / high, inv_freq, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Return `(cos, sin)`, each `[B, T, hd]` float32, for positions `[B, T]`."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate `x` `[B, T, N, hd]` by the angles in `cos` and `sin` `[B, T, hd]`."""
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  cos = cos[:, :, None, :]
  sin = sin[:, :, None, :]
  return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0

  def _linear(self, features, name):
    return Linear(
        features, use_bias=self.config.attention_bias, dtype=self.dtype,
        lora_dropout=self.lora_dropout, name=name,
    )

  @nn.compact
  def __call__(self, x, cos, sin, mask, deterministic):
    """Attend over `x` `[B, T, D]` under `mask` `[B, 1, 1, T, S]` (True keeps)."""
    config = self.config
    hd = config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    batch, length, _ = x.shape

    q = self._linear(heads * hd, "q_proj")(x, deterministic)
    k = self._linear(kv_heads * hd, "k_proj")(x, deterministic)
    v = self._linear(kv_heads * hd, "v_proj")(x, deterministic)
    q_BTHd = apply_rope(q.reshape(batch, length, heads, hd), cos, sin)
    k_BSKd = apply_rope(k.reshape(batch, length, kv_heads, hd), cos, sin)
    v_BSKd = v.reshape(batch, length, kv_heads, hd)

    q_BTKGd = q_BTHd.reshape(batch, length, kv_heads, config.num_queries_per_kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_BTKGd, k_BSKd)
    scores = scores.astype(jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v_BSKd)

    out = out.reshape(batch, length, heads * hd)
    return self._linear(config.hidden_size, "o_proj")(out, deterministic)


class Mlp(nn.Module):
  """The SwiGLU feed-forward block, `down(silu(gate(x)) * up(x))`."""

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
    gate = self._linear(config.intermediate_size, "gate_proj")(x, deterministic)
    up = self._linear(config.intermediate_size, "up_proj")(x, deterministic)
    hidden_BTF = nn.silu(gate) * up
    return self._linear(config.hidden_size, "down_proj")(hidden_BTF, deterministic)


class DecoderLayer(nn.Module):
  """One pre-norm decoder layer, written as a `scan` body: `(h, None)` out."""

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, h, cos, sin, mask):
    config = self.config
    norm = lambda name: RMSNorm(config.rms_norm_eps, dtype=self.dtype, name=name)
    attention = Attention(config, self.dtype, self.lora_dropout, name="self_attn")
    mlp = Mlp(config, self.dtype, self.lora_dropout, name="mlp")

    x = norm("input_layernorm")(h)
    h = h + attention(x, cos, sin, mask, self.deterministic)
    x = norm("post_attention_layernorm")(h)
    h = h + mlp(x, self.deterministic)
    return h, None


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
  """

  config: LlamaConfig
  dtype: jnp.dtype = jnp.float32
  lora_dropout: float = 0.0
  remat: bool = False

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      positions: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      deterministic: bool = True,
  ) -> jax.Array:
    """Return the logits `[B, T, V]` float32 of token ids `[B, T]`.

    Args:
      input_ids: token ids `[B, T]`.
      positions: position of each token `[B, T]`; defaults to `0..T-1`.
      attention_mask: `[B, T]`, 1 for real tokens and 0 for padding, which no
        token attends to; None means every token is real.
      deterministic: False enables adapter dropout.
    """
    _check_inputs(input_ids, positions, attention_mask)
    config = self.config
    batch, length = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    cos, sin = rope_tables(positions, rope_frequencies(config))
    mask = _attention_mask(attention_mask, batch, length)

    embed = nn.Embed(
        config.vocab_size, config.hidden_size, dtype=self.dtype,
        param_dtype=jnp.float32, embedding_init=nn.initializers.normal(INIT_STDDEV),
        name="embed_tokens", parent=None,
    )
    model = _Backbone(
        config, self.dtype, self.lora_dropout, self.remat, embed, name="model"
    )
    h = model(input_ids, cos, sin, mask, deterministic)

    if config.tie_word_embeddings:
      logits = model.attend(h)
    else:
      logits = Linear(config.vocab_size, dtype=self.dtype, name="lm_head")(
          h, deterministic
      )
    return logits.astype(jnp.float32)


class _Backbone(nn.Module):
  """The `model` scope: token embedding, scanned layers and final norm."""

  config: LlamaConfig
  dtype: jnp.dtype
  lora_dropout: float
  remat: bool
  embed: nn.Module

  def setup(self):
    self.embed_tokens = self.embed.clone(parent=self, name="embed_tokens")
    self.norm = RMSNorm(self.config.rms_norm_eps, dtype=self.dtype)

  def __call__(self, input_ids, cos, sin, mask, deterministic):
    h = self.embed_tokens(input_ids)
    layer = DecoderLayer
    if self.remat:
      layer = nn.remat(layer, prevent_cse=False)
    layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=self.config.num_hidden_layers,
    )
    h, _ = layers(
        self.config, self.dtype, self.lora_dropout, deterministic,
        parent=self, name="layers",
    )(h, cos, sin, mask)
    return self.norm(h)

  def attend(self, h):
    """Return `h @ embedding.T`, the tied output head."""
    return self.embed_tokens.attend(h)


def _attention_mask(attention_mask, batch, length):
  """Return a boolean mask `[B, 1, 1, T, S]`, True where a query sees a key."""
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  mask = jnp.broadcast_to(causal[None, None, None], (batch, 1, 1, length, length))
  if attention_mask is None:
    return mask
  keys = attention_mask.astype(bool)[:, None, None, None, :]
  return jnp.logical_and(mask, keys)


def _check_inputs(input_ids, positions, attention_mask):
  if input_ids.ndim != 2:
    raise ValueError(
        f"input_ids has shape {tuple(input_ids.shape)}; expected [batch,"
        " tokens]. Add a batch axis to a single sequence with ids[None]."
    )
  for name, value in (("positions", positions), ("attention_mask", attention_mask)):
    if value is not None and value.shape != input_ids.shape:
      raise ValueError(
          f"{name} has shape {tuple(value.shape)}, but input_ids has shape"
          f" {tuple(input_ids.shape)}; they must match."
      )


def init_params(config: LlamaConfig, rng: jax.Array) -> dict:
  """Return a random float32 parameter tree for `config`.

  Works under `jax.eval_shape` to get the tree's shapes without allocating it.
  """
  model = Llama(config)
  dummy_ids = jnp.zeros((1, 1), jnp.int32)
  return model.init({"params": rng}, dummy_ids)["params"]

"""Adding adapters to a parameter tree, and folding them back in.

`apply` puts a `lora` subtree beside each targeted kernel and leaves every
other leaf as it was:

    q_proj: {kernel: [..., in, out]}
      -> q_proj: {kernel: [..., in, out],
                  lora: {a: [..., in, r], b: [..., r, out], scale: [...]}}

Leading axes `...` are stacking axes (for example the layer axis of a model
that runs its layers under `scan`); the last two axes of a kernel are always
`[in, out]`. A is the input side and starts random, B the output side and
starts at zero, so the adapted model starts equal to the base model. `scale`
is `alpha / rank` (or `alpha / sqrt(rank)`), stored as a float32 leaf so that
the adapted tree alone is enough to run and merge it; it is never trainable.

`merge` returns the plain tree `kernel + scale * a @ b`, computed in float32 and
cast once to the kernel's dtype. `adapted_matmul` is the forward pass of an
adapted kernel that never forms that sum.
"""

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora import paths
from jaxlora.config import ALL_LINEAR, LoraConfig

logger = logging.getLogger(__name__)

LORA = "lora"


def apply(
    params: Mapping[str, Any],
    config: LoraConfig | None = None,
    *,
    rng: jax.Array | None = None,
    **config_fields,
) -> dict[str, Any]:
  """Return a copy of `params` with adapters beside the targeted kernels.

  Args:
    params: a nested dict whose linear modules hold a `kernel` leaf of shape
      `[..., in, out]`.
    config: the LoRA settings. Alternatively pass its fields as keywords, for
      example `apply(params, rank=16, targets="all-linear")`; keywords given
      with a config override its fields.
    rng: key for the random initialisation of A; `PRNGKey(0)` if omitted.

  Returns:
    A new tree; the input is not modified.

  Raises:
    ValueError: if no kernel matches the targets, if a targeted kernel is
      already adapted, or if the rank exceeds a targeted kernel's smaller side.
  """
  config = _resolve_config(config, config_fields)
  rng = jax.random.PRNGKey(0) if rng is None else rng

  modules = list(paths.iter_modules(params))
  targeted = [path for path, _ in modules if config.matches(paths.module_name(path))]
  if not targeted:
    names = sorted({path[-1] for path, _ in modules}) if modules else []
    raise ValueError(
        f"LoRA targets {_describe(config.targets)} match no linear module."
        f" The linear modules here are named: {', '.join(names) or 'none'}"
        f" (full paths: {', '.join(paths.module_name(p) for p, _ in modules)})."
        " Pick targets from these names."
    )

  adapters = {}
  for index, path in enumerate(targeted):
    node = _get(params, path)
    adapters[path] = _init_adapter(
        node, path, config, jax.random.fold_in(rng, index)
    )

  logger.info(
      "Added rank-%d adapters (scale %.4g) to %d of %d linear modules.",
      config.rank, config.scale, len(targeted), len(modules),
  )
  return _rebuild(params, (), adapters)


def merge(params: Mapping[str, Any]) -> dict[str, Any]:
  """Return a plain tree with each adapter folded into its kernel.

  The sum `kernel + scale * a @ b` is computed in float32 and cast once to the
  kernel's dtype; the `lora` subtrees are dropped. A tree without adapters is
  returned as a copy.
  """
  def fold(node):
    out = {}
    for key, value in node.items():
      if key == LORA:
        continue
      out[key] = fold(value) if isinstance(value, Mapping) else value
    if LORA in node:
      out["kernel"] = merged_kernel(node["kernel"], node[LORA])
    return out

  return fold(params)


def merged_kernel(kernel: jax.Array, lora: Mapping[str, jax.Array]) -> jax.Array:
  """Return `kernel + scale * a @ b` in the kernel's dtype, summed in float32.

  Shapes: kernel `[..., in, out]`, a `[..., in, r]`, b `[..., r, out]`,
  scale `[...]`.
  """
  a = jnp.asarray(lora["a"], jnp.float32)
  b = jnp.asarray(lora["b"], jnp.float32)
  scale = jnp.asarray(lora["scale"], jnp.float32)[..., None, None]
  delta = scale * jnp.matmul(a, b)
  return (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)


def adapted_matmul(
    x: jax.Array,
    kernel: jax.Array,
    lora: Mapping[str, jax.Array] | None = None,
    *,
    dropout: float = 0.0,
    dropout_rng: jax.Array | None = None,
    dtype: jnp.dtype | None = None,
) -> jax.Array:
  """Compute `x @ kernel + scale * (dropout(x) @ a) @ b` without forming `a @ b`.

  Args:
    x: inputs `[..., in]`.
    kernel: `[in, out]`.
    lora: `{a: [in, r], b: [r, out], scale: []}`, or None for a plain product.
    dropout: probability of zeroing an element of the adapter's input; only
      applied when `dropout_rng` is given.
    dropout_rng: key for the dropout mask; None means deterministic.
    dtype: compute dtype; defaults to the dtype of `x`.

  Returns:
    `[..., out]` in the compute dtype.
  """
  dtype = x.dtype if dtype is None else dtype
  x = x.astype(dtype)
  y = x @ kernel.astype(dtype)
  if lora is None:
    return y

  h = x
  if dropout > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout, h.shape)
    h = jnp.where(keep, h / (1.0 - dropout), 0).astype(dtype)
  h = h @ lora["a"].astype(dtype)
  h = h @ lora["b"].astype(dtype)
  return y + (lora["scale"] * h).astype(dtype)


def _resolve_config(config, fields):
  if config is None:
    return LoraConfig(**fields)
  if fields:
    return dataclasses.replace(config, **fields)
  return config


def _describe(targets):
  if targets == ALL_LINEAR or isinstance(targets, str):
    return repr(targets)
  return repr(list(targets))


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _init_adapter(node, path, config, rng):
  name = paths.module_name(path)
  if LORA in node:
    raise ValueError(
        f"Module {name} already has an adapter. Call jaxlora.merge first to"
        " fold it in, or apply LoRA to the base parameters."
    )

  kernel = node["kernel"]
  if kernel.ndim < 2:
    raise ValueError(
        f"Kernel of {name} has shape {tuple(kernel.shape)}; LoRA needs a"
        " kernel of shape [..., in, out]."
    )
  *lead, fan_in, fan_out = kernel.shape
  if config.rank > min(fan_in, fan_out):
    raise ValueError(
        f"LoRA rank {config.rank} exceeds the smaller side of the kernel of"
        f" {name}, whose shape is [in={fan_in}, out={fan_out}]. Use a rank of"
        f" at most {min(fan_in, fan_out)}, or leave {name} out of the targets."
    )

  a_shape = (*lead, fan_in, config.rank)
  if config.init == "kaiming":
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(rng, a_shape, jnp.float32, -bound, bound)
  else:
    a = jax.random.normal(rng, a_shape, jnp.float32) / config.rank
  b = jnp.zeros((*lead, config.rank, fan_out), jnp.float32)
  scale = jnp.full(tuple(lead), config.scale, jnp.float32)
  return {"a": a, "b": b, "scale": scale}


def _rebuild(tree, prefix, adapters):
  out = {}
  for key, value in tree.items():
    path = prefix + (key,)
    out[key] = _rebuild(value, path, adapters) if isinstance(value, Mapping) else value
  if prefix in adapters:
    out[LORA] = adapters[prefix]
  return out

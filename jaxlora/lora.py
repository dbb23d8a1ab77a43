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
from jaxlora.config import ALL_LINEAR, LAYER_CONTAINERS, LoraConfig, layer_module_name

logger = logging.getLogger(__name__)

LORA = "lora"


def apply(
    params: Mapping[str, Any],
    config: LoraConfig | None = None,
    *,
    rng: jax.Array | None = None,
    kernel_axes: Mapping[str, tuple[int, int]] | None = None,
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
    kernel_axes: `{dotted module path: (n_in, n_out)}` for kernels with more
      than one input or output axis, laid out `[..., *in, *out]` with `n_in`
      input and `n_out` output axes at the end. Such a kernel gets
      `a: [..., *in, r]`, `b: [..., r, *out]`. Modules not listed are
      `[..., in, out]`. `jaxlora.linen_kernel_axes` and
      `jaxlora.nnx_kernel_axes` read these from a Flax model.

  Returns:
    A new tree; the input is not modified.

  A kernel `[L, in, out]` inside a layer container (see
  `jaxlora.config.LAYER_CONTAINERS`) takes its rank and alpha per layer from
  the config's patterns. Its adapter is as wide as the largest of those ranks,
  `a: [L, in, r_max]`, `b: [L, r_max, out]`; a layer of rank r < r_max has
  zeros in its columns of A from r on and in its rows of B from r on, and they
  stay zero in training because their gradients are zero. NOTE:
  `jaxlora.count_parameters` counts that padding, so with per-layer ranks it
  reports more adapter parameters than peft does.

  Raises:
    ValueError: if no kernel matches the targets, if a targeted kernel is
      already adapted, if a rank exceeds a targeted kernel's smaller side, or
      if a `rank_pattern` or `alpha_pattern` key selects no targeted module.
  """
  config = _resolve_config(config, config_fields)
  rng = jax.random.PRNGKey(0) if rng is None else rng

  modules = list(paths.iter_modules(params))
  targeted = [path for path, _ in modules if config.matches(paths.module_name(path))]
  if not targeted:
    names = sorted({str(path[-1]) for path, _ in modules}) if modules else []
    raise ValueError(
        f"LoRA targets {_describe(config.targets)} match no linear module."
        f" The linear modules here are named: {', '.join(names) or 'none'}"
        f" (full paths: {', '.join(paths.module_name(p) for p, _ in modules)})."
        " Pick targets from these names."
    )

  layouts = _kernel_layouts(params, modules, targeted, kernel_axes)
  flat = {path: _flatten_kernel(_get(params, path), layouts[path]) for path in targeted}

  names = [
      name for path in targeted
      for name in slice_names(path, flat[path]["kernel"].shape[:-2])
  ]
  unmatched = config.unmatched_pattern_keys(names)
  if unmatched:
    raise ValueError(
        f"These pattern keys select no targeted module: {', '.join(unmatched)}."
        f" The targeted modules are {', '.join(names)}. Fix or remove those"
        " keys."
    )

  adapters = {}
  for index, path in enumerate(targeted):
    node = flat[path]
    adapters[path] = _init_adapter(
        node, path, config, jax.random.fold_in(rng, index)
    )
    adapters[path] = _unflatten_adapter(
        adapters[path], _get(params, path)["kernel"].shape, layouts[path]
    )

  ranks = sorted({config.rank_for(name) for name in names})
  logger.info(
      "Added adapters of rank %s to %d of %d linear modules.",
      "/".join(map(str, ranks)), len(targeted), len(modules),
  )
  return _rebuild(params, (), adapters)


def slice_names(path: paths.Path, lead_shape: tuple[int, ...]) -> list[str]:
  """Return the per-layer module names of a kernel with leading axes `lead_shape`.

  A kernel `[L, in, out]` inside a layer container gets one name per layer,
  such as `model.layers.0.self_attn.q_proj` ... `model.layers.{L-1}...`; any
  other kernel gets its dotted path as its one name.
  """
  if len(lead_shape) == 1 and any(part in LAYER_CONTAINERS for part in path):
    return [layer_module_name(path, layer) for layer in range(lead_shape[0])]
  return [paths.module_name(path)]


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
  # A kernel [..., *in, *out] of several input or output axes has
  # a [..., *in, r] and b [..., r, *out]; scale [...] tells how many axes lead.
  n_lead = jnp.ndim(lora["scale"])
  a = jnp.asarray(lora["a"], jnp.float32)
  b = jnp.asarray(lora["b"], jnp.float32)
  a = a.reshape(a.shape[:n_lead] + (-1, a.shape[-1]))
  b = b.reshape(b.shape[: n_lead + 1] + (-1,))
  scale = jnp.asarray(lora["scale"], jnp.float32)[..., None, None]
  delta = (scale * jnp.matmul(a, b)).reshape(kernel.shape)
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
  lead = tuple(lead)
  names = slice_names(path, lead)
  for slice_name in names:
    rank = config.rank_for(slice_name)
    if rank > min(fan_in, fan_out):
      raise ValueError(
          f"LoRA rank {rank} exceeds the smaller side of the kernel of"
          f" {slice_name}, whose shape is [in={fan_in}, out={fan_out}]. Use a"
          f" rank of at most {min(fan_in, fan_out)}, or leave {name} out of"
          " the targets."
      )

  # One rank and scale per slice of the leading axes: per layer, or shared.
  per_slice = lead if len(names) > 1 else ()
  ranks = jnp.broadcast_to(
      jnp.asarray([config.rank_for(n) for n in names], jnp.float32).reshape(per_slice), lead
  )
  scale = jnp.broadcast_to(
      jnp.asarray([config.scale_for(n) for n in names], jnp.float32).reshape(per_slice), lead
  )
  width = max(config.rank_for(n) for n in names)
  columns = jnp.arange(width).reshape((1,) * (len(lead) + 1) + (width,))
  in_rank = columns < ranks[..., None, None]

  a_shape = (*lead, fan_in, width)
  if config.init == "kaiming":
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(rng, a_shape, jnp.float32, -bound, bound)
  else:
    a = jax.random.normal(rng, a_shape, jnp.float32) / ranks[..., None, None]
  a = jnp.where(in_rank, a, 0.0)
  b = jnp.zeros((*lead, width, fan_out), jnp.float32)
  return {"a": a, "b": b, "scale": scale}


def _rebuild(tree, prefix, adapters):
  out = {}
  for key, value in tree.items():
    path = prefix + (key,)
    out[key] = _rebuild(value, path, adapters) if isinstance(value, Mapping) else value
  if prefix in adapters:
    out[LORA] = adapters[prefix]
  return out


def _kernel_layouts(params, modules, targeted, kernel_axes):
  """Return `{path: (n_in, n_out)}` for the targeted modules, checking `kernel_axes`."""
  kernel_axes = dict(kernel_axes or {})
  known = {paths.module_name(path) for path, _ in modules}
  unknown = sorted(set(kernel_axes) - known)
  if unknown:
    raise ValueError(
        f"kernel_axes names modules that have no kernel: {', '.join(unknown)}."
        f" The modules with kernels are {', '.join(sorted(known))}."
    )

  layouts = {}
  for path in targeted:
    name = paths.module_name(path)
    if name not in kernel_axes:
      layouts[path] = (1, 1)
      continue
    layout = tuple(kernel_axes[name])
    ndim = _get(params, path)["kernel"].ndim
    if (
        len(layout) != 2
        or not all(isinstance(n, int) and n >= 1 for n in layout)
        or sum(layout) > ndim
    ):
      raise ValueError(
          f"kernel_axes[{name!r}] is {layout!r}, but it must be (n_in, n_out),"
          f" two positive integers whose sum is at most the kernel's {ndim}"
          " axes."
      )
    layouts[path] = layout
  return layouts


def _flatten_kernel(node, layout):
  """Return `node` with its kernel `[..., *in, *out]` viewed as `[..., in, out]`."""
  if layout == (1, 1):
    return node
  kernel = node["kernel"]
  n_lead = kernel.ndim - sum(layout)
  lead, fan_in = kernel.shape[:n_lead], kernel.shape[n_lead : n_lead + layout[0]]
  flat = jnp.reshape(kernel, lead + (math.prod(fan_in), -1))
  return {**node, "kernel": flat}


def _unflatten_adapter(adapter, kernel_shape, layout):
  """Return `adapter` of a flattened kernel with `a: [..., *in, r]`, `b: [..., r, *out]`."""
  if layout == (1, 1):
    return adapter
  n_lead = len(kernel_shape) - sum(layout)
  fan_in = kernel_shape[n_lead : n_lead + layout[0]]
  fan_out = kernel_shape[n_lead + layout[0] :]
  a, b = adapter["a"], adapter["b"]
  return {
      **adapter,
      "a": a.reshape(a.shape[:-2] + fan_in + a.shape[-1:]),
      "b": b.reshape(b.shape[:-1] + fan_out),
  }

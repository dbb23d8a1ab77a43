"""LoRA on the user's own Flax NNX model.

The adapters live in a plain dict built from the model's state:

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    lora_params = jaxlora.apply(nnx.to_pure_dict(params), rank=8, targets=[...])
      # {"layers": {0: {"fc": {"kernel": [in, out], "bias": [out],
      #                        "lora": {"a": [in, r], "b": [r, out], "scale": []}}}}}
    model = jaxlora.nnx_model(graphdef, lora_params, rest)

`nnx_model` is `nnx.merge` for such a dict: it builds the model from the dict
without its `lora` subtrees, then turns each targeted `nnx.Linear`,
`nnx.LinearGeneral` or `nnx.Einsum` into a subclass whose call returns
`layer(x) + scale * (x @ A) @ B` and which stores the adapter as
`layer.lora = {a, b: nnx.LoRAParam, scale: LoraScale}`. `W + A @ B` is never
formed. The built model is new: the user's model and its class are unchanged.

Two ways to train follow from it. Functionally, call `nnx_model` inside the
loss on `jaxlora.combine(trainable, frozen)` and differentiate with respect to
`trainable` alone, as for any jaxlora tree. Statefully, build the model once and
use `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` with
`nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`. Either way
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` has the layout above, so
`jaxlora.merge` of it is a state the unmodified model accepts.

A dict from `nnx.to_pure_dict` keys list items by integer, so module paths
read `layers.0.fc`, and targets are matched against that dotted form.
"""

import logging
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from jaxlora import contraction as contraction_lib
from jaxlora import paths
from jaxlora.lora import LORA

logger = logging.getLogger(__name__)


class LoraScale(nnx.Param):
  """The adapter scale `alpha / rank`, never trained.

  It subclasses `nnx.Param` so that `nnx.state(model, nnx.Param)` carries it
  beside A and B, as jaxlora's trees do. Select the trainable adapters with
  `nnx.LoRAParam`, which it is not.
  """


def _add_adapter_output(layer, y, inputs, layout):
  """Return `y + scale * (inputs @ A) @ B` for an adapted `layer`.

  `layer.lora_module` is the layer's dotted path, for error messages.
  """
  # NOTE: the adapter path has no dropout here, unlike `lora_dropout` in
  # jaxlora's own models.
  lora = {key: variable[...] for key, variable in layer.lora.items()}
  layout.check_adapter(layer.kernel.shape, lora, layer.lora_module)
  return y + layout.adapter_output(
      inputs, lora, dtype=y.dtype, precision=layer.precision
  )


class AdaptedLinear(nnx.Linear):
  """`nnx.Linear` with an adapter: kernel `[in, out]`, a `[in, r]`, b `[r, out]`."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding)
    return _add_adapter_output(self, y, inputs, contraction_lib.dense(inputs.ndim))


class AdaptedLinearGeneral(nnx.LinearGeneral):
  """`nnx.LinearGeneral` with an adapter: a `[*batch, *in, r]`, b `[*batch, r, *out]`."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding)
    layout = contraction_lib.dense_general(
        inputs.ndim, self.axis, tuple(self.batch_axis), len(self.out_features)
    )
    return _add_adapter_output(self, y, inputs, layout)


class AdaptedEinsum(nnx.Einsum):
  """`nnx.Einsum` with an adapter; its kernel axes must be ordered batch, input, output."""

  def __call__(self, inputs: jax.Array, einsum_str: str | None = None, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, einsum_str, out_sharding)
    equation = self.einsum_str if einsum_str is None else einsum_str
    layout = contraction_lib.from_einsum(equation, inputs.ndim, self.kernel.ndim)
    return _add_adapter_output(self, y, inputs, layout)


# Matched by exact type: a subclass may override `__call__`, so its output is
# unknown.
ADAPTED_CLASSES = {
    nnx.Linear: AdaptedLinear,
    nnx.LinearGeneral: AdaptedLinearGeneral,
    nnx.Einsum: AdaptedEinsum,
}


def nnx_model(graphdef: nnx.GraphDef, state: Any, *states: Any) -> nnx.Module:
  """Build the NNX module of `graphdef` with the adapters found in `state`.

  Args:
    graphdef: from `nnx.split` of the user's model (without adapters).
    state: a pure dict from `jaxlora.apply(nnx.to_pure_dict(...))`, with
      `lora` subtrees beside the targeted kernels, or an `nnx.State`.
    *states: further states for `nnx.merge`, such as the non-parameter state
      from `nnx.split(model, nnx.Param, ...)`.

  Returns:
    A new module. Each targeted layer returns `layer(x) + scale * (x @ A) @ B`
    and stores its adapter as `layer.lora` (`a`, `b`: `nnx.LoRAParam`;
    `scale`: `LoraScale`).

  Raises:
    ValueError: if an adapter sits beside a kernel whose module is not an
      `nnx.Linear`, `nnx.LinearGeneral` or `nnx.Einsum` (leave it out of the
      targets, or use `jaxlora.wrap_merged`), or where the model has no
      module.
  """
  state = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
  adapters = {}
  base = _strip_adapters(state, (), adapters)
  model = nnx.merge(graphdef, base, *states)

  modules = {
      tuple(str(key) for key in path): node
      for path, node in nnx.iter_graph(model)
      if isinstance(node, nnx.Module)
  }
  for path, lora in adapters.items():
    module = modules.get(tuple(str(key) for key in path))
    if module is None:
      raise ValueError(
          f"The state has an adapter at {paths.module_name(path)}, but the"
          " model has no module there. Build the adapters from this model's"
          " state with jaxlora.apply(nnx.to_pure_dict(...))."
      )
    adapted = ADAPTED_CLASSES.get(type(module))
    if adapted is None:
      raise ValueError(
          f"Module {paths.module_name(path)} ({type(module).__name__}) has"
          " a LoRA adapter, but jaxlora.nnx_model adds adapters only to"
          " nnx.Linear, nnx.LinearGeneral and nnx.Einsum. Leave this module"
          " out of the LoRA targets, or run the model with"
          " jaxlora.wrap_merged, which folds the adapters into the kernels on"
          " every call."
      )
    # The model was just built by nnx.merge, so changing its layers' class
    # leaves the caller's model alone. The subclasses only add the
    # attributes `lora` and `lora_module`.
    module.__class__ = adapted
    module.lora_module = paths.module_name(path)
    module.lora = nnx.Dict(
        a=nnx.LoRAParam(lora["a"]),
        b=nnx.LoRAParam(lora["b"]),
        scale=LoraScale(lora["scale"]),
    )
  logger.debug("Built an NNX model with %d adapted layers.", len(adapters))
  return model


def nnx_kernel_axes(model: nnx.Module) -> dict[str, tuple[int, int]]:
  """Return the kernel layout of every `nnx.Linear`, `nnx.LinearGeneral` and `nnx.Einsum`.

  Pass the result to `jaxlora.apply(params, ..., kernel_axes=...)`.

  Returns:
    `{dotted module path: (number of input axes, number of output axes)}` at
    the end of each kernel, for example `{"attn.query": (1, 2)}` for an
    `nnx.LinearGeneral(D, (H, hd))`. An `nnx.Einsum` is left out if its
    equation is given only at call time or its kernel axes are not ordered
    batch, input, output. `nnx_model` raises when such a layer is called with
    an adapter.
  """
  layouts = {}
  for path, node in nnx.iter_graph(model):
    name = paths.module_name(path)
    if type(node) is nnx.Linear:
      layouts[name] = (1, 1)
    elif type(node) is nnx.LinearGeneral:
      layouts[name] = (len(node.in_features), len(node.out_features))
    elif type(node) is nnx.Einsum and node.einsum_str is not None:
      inputs = node.einsum_str.split(",")[0].replace(contraction_lib.ELLIPSIS, "")
      try:
        layout = contraction_lib.from_einsum(node.einsum_str, len(inputs), node.kernel.ndim)
      except ValueError as error:
        logger.info("No adapter layout for %s: %s", name, error)
      else:
        layouts[name] = layout.kernel_axes
  return layouts


def _strip_adapters(tree, prefix, adapters):
  """Return `tree` without its `lora` subtrees, collecting them into `adapters`."""
  out = {}
  for key, value in tree.items():
    if key == LORA and isinstance(value, Mapping):
      adapters[prefix] = value
    elif isinstance(value, Mapping):
      out[key] = _strip_adapters(value, prefix + (key,), adapters)
    else:
      out[key] = value
  return out

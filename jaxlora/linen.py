"""LoRA on the user's own Flax Linen model, through method interception.

`jaxlora.apply` puts a `lora` subtree beside each targeted kernel of the
model's `params` collection:

    {"Encoder_0": {"layers_1": {"attn": {"query": {"kernel": [D, H, hd]}}}}}
      -> ... "query": {"kernel": [D, H, hd],
                       "lora": {"a": [D, r], "b": [r, H, hd], "scale": []}}

Linen hands that subtree to the module as a variable `nn.DenseGeneral` never
reads. `wrap(model.apply)` runs the model inside `flax.linen.intercept_methods`:
when an `nn.Dense`, `nn.DenseGeneral` or `nn.Einsum` with a `lora` variable is
called, the interceptor runs the layer on its plain kernel and adds
`scale * (x @ A) @ B`, computed from the layer's own input. `W + A @ B` is never
formed, so a gradient taken with respect to the adapters alone contains no
weight gradient of a frozen kernel.

A module's path in the tree is its Linen scope path written with dots:
Linen's `Encoder_0/layers_1/attn/query` is `Encoder_0.layers_1.attn.query`,
and LoRA targets are matched against that dotted form. Under `nn.scan` the
stacked kernel `[L, ...]` and its adapter `[L, ...]` are sliced together, so
the interceptor gets one layer's kernel and adapter. `nn.remat` needs nothing
special.

Kernels with more than one input or output axis (`nn.DenseGeneral` with
`features=(H, hd)`, most `nn.Einsum` kernels) need their layout when the
adapters are built: `jaxlora.apply(params, ..., kernel_axes=linen_kernel_axes(
model, *inputs))`.
"""

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxlora import contraction as contraction_lib
from jaxlora.lora import LORA

logger = logging.getLogger(__name__)

PARAMS = "params"
ADAPTER_KEYS = frozenset({"a", "b", "scale"})

# Whether a wrapped call is running in this thread. A wrapped function called
# inside another must not add the adapters' output a second time.
_state = threading.local()

# Matched by exact type: a subclass may override `__call__`, so its output is
# unknown.
SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Return `fn` running its Linen modules with the adapters in their parameters.

  Args:
    fn: `model.apply`, or any function that runs Linen modules, for example a
      loss function that calls `model.apply`. Its arguments are passed through
      unchanged, so the wrapped `model.apply` takes `{"params": params}` where
      `params` comes from `jaxlora.apply`.

  Returns:
    A function with the signature of `fn`. Inside it, every `nn.Dense`,
    `nn.DenseGeneral` and `nn.Einsum` whose parameters hold a `lora` subtree
    returns `layer(x) + scale * (x @ A) @ B`; every other module runs as
    before. Calling `model.apply` directly ignores the adapters.

  Raises:
    ValueError: when the wrapped function runs, if a module of another type
      has an adapter (leave it out of the targets, or use
      `jaxlora.wrap_merged`), or if an adapter's shapes do not fit its
      kernel's layout (pass `kernel_axes` to `jaxlora.apply`).

  Example:
    >>> params = jaxlora.apply(variables["params"], rank=8, targets=["query", "value"])
    >>> apply_fn = jaxlora.wrap(model.apply)
    >>> logits = apply_fn({"params": params}, tokens)
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    if getattr(_state, "intercepting", False):
      return fn(*args, **kwargs)
    _state.intercepting = True
    try:
      with nn.intercept_methods(_add_adapter_output):
        return fn(*args, **kwargs)
    finally:
      _state.intercepting = False

  return wrapped


def linen_kernel_axes(
    model: nn.Module,
    *args,
    method: Callable[..., Any] | str | None = None,
    rngs: jax.Array | Mapping[str, jax.Array] | None = None,
    **kwargs,
) -> dict[str, tuple[int, int]]:
  """Return the kernel layout of every `nn.Dense`, `nn.DenseGeneral` and `nn.Einsum` in `model`.

  The model is initialised abstractly with `jax.eval_shape`, so no weights are
  computed. Pass the result to `jaxlora.apply(params, ..., kernel_axes=...)`.

  Args:
    model: the Linen module.
    *args: inputs for `model.init`, or arrays of the same shapes and dtypes.
    method: as in `model.init`.
    rngs: as in `model.init`; `PRNGKey(0)` if omitted.
    **kwargs: keyword inputs for `model.init`.

  Returns:
    `{dotted module path: (number of input axes, number of output axes)}` at
    the end of each kernel, for example `{"attn.query": (1, 2)}` for a query
    kernel `[D, H, hd]`. Leading axes left over (an `nn.scan` layer axis, the
    batch dimensions of `nn.DenseGeneral`) get their own adapter slice. An
    `nn.Einsum` whose kernel axes are not ordered batch, input, output is left
    out; the wrapped model raises if such a layer has an adapter.
  """
  rngs = jax.random.PRNGKey(0) if rngs is None else rngs
  layouts = {}

  def record(next_fun, call_args, call_kwargs, context):
    out = next_fun(*call_args, **call_kwargs)
    module = context.module
    if context.method_name == "__call__" and type(module) in SUPPORTED:
      kernel = module.get_variable(PARAMS, "kernel")
      try:
        layout = _contraction(module, kernel, call_args, call_kwargs)
      except ValueError as error:
        logger.info("No adapter layout for %s: %s", _dotted(module), error)
      else:
        layouts[_dotted(module)] = layout.kernel_axes
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(rngs, *args, method=method, **kwargs)

  jax.eval_shape(init)
  return layouts


def _add_adapter_output(next_fun, args, kwargs, context):
  """Method interceptor: add the adapter's output to targeted linear layers."""
  module = context.module
  if context.method_name == "setup" or module.scope is None:
    return next_fun(*args, **kwargs)

  kind = type(module)
  if kind in SUPPORTED and context.method_name != "__call__":
    return next_fun(*args, **kwargs)
  lora = _adapter(module)
  if lora is None:
    return next_fun(*args, **kwargs)
  if kind not in SUPPORTED:
    raise ValueError(
        f"Module {_dotted(module)} ({kind.__name__}) has a LoRA adapter, but"
        " jaxlora.wrap adds adapters only to nn.Dense, nn.DenseGeneral and"
        " nn.Einsum. Leave this module out of the LoRA targets, or run the"
        " model with jaxlora.wrap_merged, which folds the adapters into the"
        " kernels on every call."
    )

  # NOTE: the adapter path has no dropout here, unlike `lora_dropout` in
  # jaxlora's own models.
  y = next_fun(*args, **kwargs)
  kernel = module.get_variable(PARAMS, "kernel")
  layout = _contraction(module, kernel, args, kwargs)
  layout.check_adapter(kernel.shape, lora, _dotted(module))
  x = args[0] if args else kwargs["inputs"]
  return y + layout.adapter_output(
      x, lora, dtype=y.dtype, precision=module.precision
  )


def _adapter(module):
  """Return the module's `lora` subtree, or None if it has none."""
  if not module.has_variable(PARAMS, LORA) or not module.has_variable(PARAMS, "kernel"):
    return None
  lora = module.get_variable(PARAMS, LORA)
  if not isinstance(lora, Mapping) or set(lora) != ADAPTER_KEYS:
    return None
  return lora


def _contraction(module, kernel, args, kwargs):
  """Return the einsum that `module`, called with `args` and `kwargs`, computes."""
  x = args[0] if args else kwargs["inputs"]
  if isinstance(module, nn.Einsum):
    equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    equation = module.einsum_str if equation is None else equation
    return contraction_lib.from_einsum(equation, x.ndim, kernel.ndim)
  if isinstance(module, nn.DenseGeneral):
    return contraction_lib.dense_general(
        x.ndim, _as_tuple(module.axis), _as_tuple(module.batch_dims),
        len(_as_tuple(module.features)),
    )
  return contraction_lib.dense(x.ndim)


def _as_tuple(value):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _dotted(module):
  return ".".join(module.path)

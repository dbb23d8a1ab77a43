"""LoRA for any function of a parameter tree, by merging inside the forward pass.

`wrap_merged(fn)` returns a function that takes the adapted tree from
`jaxlora.apply` and calls `fn` on `jaxlora.merge` of it, so each adapted kernel
is `W + scale * A @ B` for that call. It is correct for any `fn` that reads its
weights from the tree, including plain JAX functions with their own matrix
products and modules that `jaxlora.wrap` and `jaxlora.nnx_model` do not handle
(convolutions, custom layers).

Its cost is paid on every call. The forward pass forms one `[..., in, out]`
sum per adapted kernel. The backward pass computes the full weight gradient
`[..., in, out]` of each adapted kernel and only then reduces it to the
gradients of A and B. That is the memory and compute of a full fine-tuning gradient for
those kernels (though not the optimizer state). Prefer `jaxlora.wrap` (Linen)
or `jaxlora.nnx_model` (NNX), which never form these arrays, where the layers
allow.
"""

import functools
from collections.abc import Callable
from typing import Any

from jaxlora.lora import merge


def wrap_merged(fn: Callable[..., Any], *, argnum: int = 0) -> Callable[..., Any]:
  """Return `fn` taking an adapted tree at position `argnum`, merged on each call.

  Args:
    fn: any function that takes a nested dict of parameters, with each
      kernel to adapt stored as a `kernel` leaf `[..., in, out]`, for example
      `model.apply` of a Linen model (the tree may be `{"params": params}`)
      or a plain JAX function.
    argnum: the position of the parameter tree among `fn`'s arguments.

  Returns:
    A function with the signature of `fn` that replaces argument `argnum` by
    `jaxlora.merge(argument)` before calling `fn`. Gradients with respect to
    the adapters flow through the merge. The cost per call is a full
    `[..., in, out]` weight and weight gradient for every adapted kernel.

  Example:
    >>> def predict(params, x):
    ...   return jnp.tanh(x @ params["hidden"]["kernel"]) @ params["out"]["kernel"]
    >>> params = jaxlora.apply(base, rank=4, targets=["hidden"])
    >>> y = jaxlora.wrap_merged(predict)(params, x)
  """

  @functools.wraps(fn)
  def merged_fn(*args, **kwargs):
    if argnum >= len(args):
      raise ValueError(
          f"wrap_merged expects the parameter tree as positional argument"
          f" {argnum}, but the call has {len(args)} positional arguments."
          " Pass the tree positionally, or set argnum."
      )
    args = list(args)
    args[argnum] = merge(args[argnum])
    return fn(*args, **kwargs)

  return merged_fn

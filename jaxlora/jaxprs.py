"""Inspecting what a traced function computes, to check where weight gradients form."""

import collections
from collections.abc import Callable, Iterator
from typing import Any

import jax


def dot_shapes(fn: Callable[..., Any], *args, **kwargs) -> collections.Counter:
  """Count the output shapes of the matrix products that `fn(*args, **kwargs)` traces.

  Every `dot_general` (from `@`, `jnp.einsum`, `jnp.dot`, `lax.dot_general`)
  is counted, including those inside `jit`, `scan`, `remat`, `cond` and custom
  derivatives. Pass a gradient function to see whether it forms a weight
  gradient: a frozen kernel `[in, out]` that only enters a product with
  activations shows up as an output of that shape (or `[out, in]`) only if its
  gradient is computed.

  Returns:
    `Counter({shape tuple: number of products with that output shape})`.
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return collections.Counter(
      tuple(eqn.outvars[0].aval.shape)
      for eqn in _equations(closed.jaxpr)
      if eqn.primitive.name == "dot_general"
  )


def _equations(jaxpr) -> Iterator[Any]:
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for inner in _sub_jaxprs(value):
        yield from _equations(inner)


def _sub_jaxprs(value):
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)

"""The merge-in-forward fallback `jaxlora.wrap_merged`, on plain JAX and on modules `wrap` rejects."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import paths
from jaxlora.jaxprs import dot_shapes

# Input width IN, hidden width F, classes C, batch B: all different.
IN, F, C, B = 9, 13, 4, 6


def base_tree(seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
      "hidden": {"kernel": jax.random.normal(keys[0], (IN, F)) / math.sqrt(IN), "bias": jnp.zeros((F,))},
      "out": {"kernel": jax.random.normal(keys[1], (F, C)) / math.sqrt(F)},
  }


def predict(params, x):
  """A plain JAX classifier that does its own matrix products."""
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return h @ params["out"]["kernel"]


def random_b(params, seed=3):
  key = jax.random.PRNGKey(seed)
  return paths.map_with_path(
      lambda path, leaf: jax.random.normal(jax.random.fold_in(key, len(path)), leaf.shape)
      if path[-2:] == ("lora", "b") else leaf,
      params,
  )


@pytest.fixture
def x():
  return jax.random.normal(jax.random.PRNGKey(1), (B, IN))


def test_merged_identity_at_init(x):
  params = jaxlora.apply(base_tree(), rank=3, targets="all-linear")
  np.testing.assert_array_equal(jaxlora.wrap_merged(predict)(params, x), predict(base_tree(), x))


def test_merged_equals_low_rank_update(x):
  params = random_b(jaxlora.apply(base_tree(), rank=3, alpha=5, targets=["hidden"]))
  lora = params["hidden"]["lora"]
  kernel = params["hidden"]["kernel"] + 5 / 3 * lora["a"] @ lora["b"]
  expected = jnp.tanh(x @ kernel + params["hidden"]["bias"]) @ params["out"]["kernel"]

  adapted = jax.jit(jaxlora.wrap_merged(predict))(params, x)
  np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(adapted, predict(jaxlora.merge(params), x), rtol=1e-6, atol=1e-6)
  assert not np.allclose(adapted, predict(base_tree(), x), atol=1e-3)


def test_merged_step_updates_only_adapters(x):
  params = random_b(jaxlora.apply(base_tree(), rank=3, targets="all-linear"))
  trainable, frozen = jaxlora.partition(params)
  forward = jaxlora.wrap_merged(predict)
  labels = jnp.arange(B) % C

  def loss(trainable):
    logits = forward(jaxlora.combine(trainable, frozen), x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  tx = optax.sgd(1e-2)
  updates, _ = tx.update(jax.grad(loss)(trainable), tx.init(trainable))
  new = jaxlora.combine(optax.apply_updates(trainable, updates), frozen)
  old_leaves = dict(paths.iter_leaves(params))
  for path, leaf in paths.iter_leaves(new):
    if jaxlora.is_adapter_weight(path):
      assert not np.array_equal(leaf, old_leaves[path]), path
    else:
      np.testing.assert_array_equal(leaf, old_leaves[path], err_msg=paths.module_name(path))


def test_merged_gradient_forms_weight_gradient(x):
  """Checks the jaxpr: the merged route's gradient has a `dot_general` output `[in, out]` per kernel.

  This is the cost `wrap_merged` states; `wrap` and `nnx_model` are tested for
  its absence.
  """
  params = random_b(jaxlora.apply(base_tree(), rank=3, targets="all-linear"))
  trainable, frozen = jaxlora.partition(params)
  forward = jaxlora.wrap_merged(predict)
  shapes = dot_shapes(jax.grad(lambda t: forward(jaxlora.combine(t, frozen), x).sum()), trainable)
  assert (IN, F) in shapes  # A @ B of the hidden kernel, and its gradient
  assert (F, C) in shapes

  direct = dot_shapes(jax.grad(lambda t: predict(jaxlora.combine(t, frozen), x).sum()), trainable)
  assert (IN, F) not in direct  # without the merge, nothing of that shape


def test_apply_unknown_target_lists_paths():
  with pytest.raises(ValueError) as info:
    jaxlora.apply(base_tree(), rank=3, targets=["dense"])
  assert "full paths: hidden, out" in str(info.value)


def test_merged_argnum(x):
  params = random_b(jaxlora.apply(base_tree(), rank=3, targets=["out"]))
  swapped = jaxlora.wrap_merged(lambda x, params: predict(params, x), argnum=1)
  np.testing.assert_allclose(swapped(x, params), predict(jaxlora.merge(params), x), rtol=1e-6)
  with pytest.raises(ValueError, match="positional argument 1"):
    swapped(x, params=params)


class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3,), name="conv")(x)
    return nn.Dense(C, name="head")(x.mean(axis=1))


def test_merged_linen_conv():
  """`nn.Conv`, which `jaxlora.wrap` rejects, runs through the merged route."""
  model = ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(1), (B, 5, IN))
  base = model.init(jax.random.PRNGKey(0), x)
  params = random_b(jaxlora.apply(base["params"], rank=2, targets=["conv", "head"]))
  assert params["conv"]["lora"]["a"].shape == (3, IN, 2)  # one adapter per kernel tap

  adapted = jaxlora.wrap_merged(model.apply)({"params": params}, x)
  np.testing.assert_allclose(adapted, model.apply({"params": jaxlora.merge(params)}, x), rtol=1e-6)
  assert not np.allclose(adapted, model.apply(base, x), atol=1e-3)

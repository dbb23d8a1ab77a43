"""LoRA on a user's NNX model through `jaxlora.nnx_model`: Linear, LinearGeneral, Einsum."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora import paths
from jaxlora.jaxprs import dot_shapes

# Every dimension differs: input width IN, model width D, heads H, head width
# HD, MLP width F, classes C, batch B, tokens T.
IN, D, H, HD, F, C, B, T = 7, 10, 3, 4, 14, 5, 2, 6
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


class Block(nnx.Module):
  """Attention and MLP with every supported layer type."""

  def __init__(self, rngs):
    self.query = nnx.LinearGeneral(D, (H, HD), rngs=rngs)  # kernel [D, H, HD]
    self.key = nnx.Einsum("btd,dhk->bthk", (D, H, HD), (H, HD), rngs=rngs)
    self.out = nnx.LinearGeneral((H, HD), D, axis=(-2, -1), rngs=rngs)  # kernel [H, HD, D]
    self.up = nnx.Linear(D, F, rngs=rngs)
    self.down = nnx.Linear(F, D, rngs=rngs)

  def __call__(self, x):
    q, k = self.query(x), self.key(x)
    weights = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(HD))
    x = x + self.out(jnp.einsum("bhts,bshk->bthk", weights, q))
    return x + self.down(jax.nn.gelu(self.up(x)))


class Model(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Linear(IN, D, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.head = nnx.Linear(D, C, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for layer in self.blocks:
      x = layer(x)
    return self.head(x.mean(axis=1))


@pytest.fixture(scope="module")
def setup():
  model = Model(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, IN))
  return model, graphdef, nnx.to_pure_dict(state), x


def adapted_tree(setup, targets="all-linear", random_b=True):
  model, _, base, _ = setup
  params = jaxlora.apply(base, rank=2, alpha=3, targets=targets, kernel_axes=jaxlora.nnx_kernel_axes(model))
  if not random_b:
    return params
  key = jax.random.PRNGKey(5)

  def fill(path, leaf):
    if path[-2:] == ("lora", "b"):
      return 0.3 * jax.random.normal(jax.random.fold_in(key, len(paths.module_name(path))), leaf.shape)
    return leaf

  return paths.map_with_path(fill, params)


def load_example(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_kernel_axes_read_from_model(setup):
  model = setup[0]
  expected = {"embed": (1, 1), "head": (1, 1)}
  for layer in ("blocks.0", "blocks.1"):
    expected.update({
        f"{layer}.query": (1, 2), f"{layer}.key": (1, 2), f"{layer}.out": (2, 1),
        f"{layer}.up": (1, 1), f"{layer}.down": (1, 1),
    })
  assert jaxlora.nnx_kernel_axes(model) == expected


def test_apply_integer_keys(setup):
  params = adapted_tree(setup, targets=r"blocks\.1\.(query|out)", random_b=False)
  query = params["blocks"][1]["query"]["lora"]
  assert query["a"].shape == (D, 2)
  assert query["b"].shape == (2, H, HD)
  assert params["blocks"][1]["out"]["lora"]["a"].shape == (H, HD, 2)
  assert "lora" not in params["blocks"][0]["query"]


def test_nnx_identity_at_init(setup):
  model, graphdef, _, x = setup
  params = adapted_tree(setup, random_b=False)
  np.testing.assert_array_equal(jaxlora.nnx_model(graphdef, params)(x), model(x))


def test_nnx_equals_merged(setup):
  model, graphdef, _, x = setup
  params = adapted_tree(setup)
  adapted = jax.jit(lambda params, x: jaxlora.nnx_model(graphdef, params)(x))(params, x)
  plain = nnx.merge(graphdef, jaxlora.merge(params))
  assert type(plain.blocks[0].query) is nnx.LinearGeneral
  np.testing.assert_allclose(adapted, plain(x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(adapted, model(x), atol=1e-3)


def test_nnx_model_leaves_user_model(setup):
  model, graphdef, _, x = setup
  before = model(x)
  adapted = jaxlora.nnx_model(graphdef, adapted_tree(setup))
  assert type(adapted.blocks[0].up) is jaxlora.nnx.AdaptedLinear
  assert adapted.blocks[0].up.lora_module == "blocks.0.up"
  assert type(model.blocks[0].up) is nnx.Linear
  assert not hasattr(model.blocks[0].up, "lora")
  np.testing.assert_array_equal(model(x), before)


def loss_fn(graphdef, frozen, x, labels):
  def loss(trainable):
    logits = jaxlora.nnx_model(graphdef, jaxlora.combine(trainable, frozen))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss


def test_nnx_functional_step_updates_only_adapters(setup):
  _, graphdef, _, x = setup
  params = adapted_tree(setup)
  trainable, frozen = jaxlora.partition(params)
  loss = loss_fn(graphdef, frozen, x, jnp.arange(B) % C)

  tx = optax.adam(1e-2)
  grads = jax.jit(jax.grad(loss))(trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  new = jaxlora.combine(optax.apply_updates(trainable, updates), frozen)

  old_leaves = dict(paths.iter_leaves(params))
  changed = 0
  for path, leaf in paths.iter_leaves(new):
    if jaxlora.is_adapter_weight(path):
      changed += 1
      assert not np.array_equal(leaf, old_leaves[path]), path
    else:
      np.testing.assert_array_equal(leaf, old_leaves[path], err_msg=paths.module_name(path))
  assert changed == 2 * 12


def test_nnx_optimizer_updates_only_adapters(setup):
  _, graphdef, _, x = setup
  params = adapted_tree(setup)
  model = jaxlora.nnx_model(graphdef, params)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), jnp.arange(B) % C).mean()

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  new = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert jax.tree.structure(new) == jax.tree.structure(params)
  old_leaves = dict(paths.iter_leaves(params))
  for path, leaf in paths.iter_leaves(new):
    if jaxlora.is_adapter_weight(path):
      assert not np.array_equal(leaf, old_leaves[path]), path
    else:
      np.testing.assert_array_equal(leaf, old_leaves[path], err_msg=paths.module_name(path))

  plain = nnx.merge(graphdef, jaxlora.merge(new))
  np.testing.assert_allclose(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_nnx_gradient_has_no_weight_gradient(setup):
  """Checks the jaxpr: no `dot_general` of the adapter gradient outputs a frozen kernel's shape.

  Kernel shapes are compared as sorted tuples, also flattened to `[in, out]`,
  because a weight gradient may come out in any axis order. The same check on
  the gradient with respect to the whole tree finds every kernel, so it can
  fail.
  """
  _, graphdef, _, x = setup
  params = adapted_tree(setup)
  trainable, frozen = jaxlora.partition(params)
  labels = jnp.arange(B) % C

  kernels = {}
  for path, node in paths.iter_modules(params):
    shape = node["kernel"].shape
    n_in = node["lora"]["a"].ndim - 1
    kernels[paths.module_name(path)] = {
        tuple(sorted(shape)),
        tuple(sorted((math.prod(shape[:n_in]), math.prod(shape[n_in:])))),
    }
  assert len(kernels) == 12

  def weight_gradients(shapes):
    found = {tuple(sorted(shape)) for shape in shapes}
    return sorted(name for name, forms in kernels.items() if forms & found)

  assert weight_gradients(dot_shapes(jax.grad(loss_fn(graphdef, frozen, x, labels)), trainable)) == []
  full = loss_fn(graphdef, {}, x, labels)
  assert weight_gradients(dot_shapes(jax.grad(full), params)) == sorted(kernels)


class ScannedMlp(nnx.Module):
  """L MLP blocks created under `nnx.vmap` (kernels `[L, in, out]`) and run under `nnx.scan`."""

  def __init__(self, rngs, layers=3):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Dict(up=nnx.Linear(D, F, rngs=rngs), down=nnx.Linear(F, D, rngs=rngs))

    self.stack = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return x + block["down"](jax.nn.gelu(block["up"](x)))

    return body(x, self.stack)


def test_nnx_scan_stacked_layers():
  model = ScannedMlp(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = jaxlora.apply(nnx.to_pure_dict(state), rank=2, targets="all-linear")
  assert params["stack"]["up"]["lora"]["a"].shape == (3, D, 2)
  params = paths.map_with_path(
      lambda path, leaf: 0.3 * jax.random.normal(jax.random.PRNGKey(len(path)), leaf.shape)
      if path[-2:] == ("lora", "b") else leaf,
      params,
  )
  x = jax.random.normal(jax.random.PRNGKey(1), (B, D))

  adapted = jaxlora.nnx_model(graphdef, params)(x)
  np.testing.assert_allclose(adapted, nnx.merge(graphdef, jaxlora.merge(params))(x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(adapted, model(x), atol=1e-3)


def test_apply_unknown_target_lists_paths(setup):
  with pytest.raises(ValueError) as info:
    adapted_tree(setup, targets=["q_proj"])
  message = str(info.value)
  for name in ("blocks.0.query", "blocks.1.key", "blocks.1.out", "embed", "head"):
    assert name in message


def test_nnx_without_kernel_axes_raises(setup):
  _, graphdef, base, x = setup
  params = jaxlora.apply(base, rank=2, targets=["blocks.0.query"])  # [D, H, HD] read as [.., H, HD]
  with pytest.raises(ValueError, match=r"adapter of blocks.0.query does not fit.*nnx_kernel_axes"):
    jaxlora.nnx_model(graphdef, params)(x)


class ConvNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(IN, 6, (3,), rngs=rngs)
    self.head = nnx.Linear(6, C, rngs=rngs)

  def __call__(self, x):
    return self.head(self.conv(x).mean(axis=1))


def test_nnx_unsupported_module_raises():
  graphdef, state = nnx.split(ConvNet(nnx.Rngs(0)))
  params = jaxlora.apply(nnx.to_pure_dict(state), rank=2, targets=["conv"])
  with pytest.raises(ValueError, match=r"Module conv \(Conv\) has a LoRA adapter.*wrap_merged"):
    jaxlora.nnx_model(graphdef, params)


def test_example_nnx_trains():
  example = load_example("custom_nnx")
  result = example.main(["--base-steps", "60", "--steps", "30"])
  assert result["loss_after"] < 0.8 * result["loss_before"]
  assert result["merged_max_difference"] < 1e-4

"""LoRA on a user's Linen model through `jaxlora.wrap`: Dense, DenseGeneral, Einsum, scan, remat."""

import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import contraction, paths
from jaxlora.jaxprs import dot_shapes

# Every dimension differs, so a transposed or mislabelled axis cannot pass:
# input width IN, model width D, heads H, head width HD, MLP width F, classes C,
# layers L, batch B, tokens T.
IN, D, H, HD, F, C, L, B, T = 7, 10, 3, 4, 14, 5, 2, 2, 6
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


class Block(nn.Module):
  """Attention and MLP with every supported layer type; a scan body `(x, None)`."""

  @nn.compact
  def __call__(self, x, _):
    q = nn.DenseGeneral((H, HD), name="query")(x)  # kernel [D, H, HD]
    k = nn.Einsum((D, H, HD), "btd,dhk->bthk", name="key")(x)
    v = nn.DenseGeneral((H, HD), use_bias=False, name="value")(x)
    weights = jax.nn.softmax(jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(HD))
    o = jnp.einsum("bhts,bshk->bthk", weights, v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(o)  # kernel [H, HD, D]
    h = nn.gelu(nn.Dense(F, name="up")(x))
    return x + nn.Dense(D, name="down")(h), None


class Encoder(nn.Module):
  """Input projection, L scanned and rematerialised blocks, one remat block, a head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="embed")(x)
    stack = nn.scan(
        nn.remat(Block), variable_axes={"params": 0},
        split_rngs={"params": True}, length=L,
    )
    x, _ = stack(name="layers")(x, None)
    x, _ = nn.remat(Block)(name="top")(x, None)
    return nn.Dense(C, name="head")(x.mean(axis=1))


@pytest.fixture(scope="module")
def setup():
  model = Encoder()
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, IN))
  base = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
  axes = jaxlora.linen_kernel_axes(model, x)
  return model, x, base, axes


def randomize_b(params, seed=1, scale=0.3):
  """Return a copy with every adapter B drawn at random, so adapters change the output."""
  key = jax.random.PRNGKey(seed)

  def fill(path, leaf):
    if path[-2:] == ("lora", "b"):
      return scale * jax.random.normal(jax.random.fold_in(key, len(paths.module_name(path))), leaf.shape)
    return leaf

  return paths.map_with_path(fill, params)


def kernel_shapes(params):
  """Return `{module: shapes its weight gradient could have}` for the adapted modules.

  A weight gradient can come out of `dot_general` in any axis order, with the
  kernel's own axes or flattened to `[in, out]`, so shapes are sorted tuples.
  The scan axis L is left off: the gradient forms per layer, inside the loop.
  """
  shapes = {}
  for path, node in paths.iter_modules(params):
    if "lora" not in node:
      continue
    n_lead = jnp.ndim(node["lora"]["scale"])
    shape = node["kernel"].shape[n_lead:]
    n_in = node["lora"]["a"].ndim - n_lead - 1
    shapes[paths.module_name(path)] = {
        tuple(sorted(shape)),
        tuple(sorted((math.prod(shape[:n_in]), math.prod(shape[n_in:])))),
    }
  return shapes


def weight_gradients(shapes, kernels):
  """Return the modules of `kernels` with a product output among `shapes`."""
  found = {tuple(sorted(shape)) for shape in shapes}
  return sorted(name for name, forms in kernels.items() if forms & found)


def load_example(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- the kernel layouts -------------------------------------------------------


def test_kernel_axes_read_from_model(setup):
  _, _, _, axes = setup
  expected = {"embed": (1, 1), "head": (1, 1)}
  for block in ("layers", "top"):
    expected.update({
        f"{block}.query": (1, 2), f"{block}.key": (1, 2), f"{block}.value": (1, 2),
        f"{block}.out": (2, 1), f"{block}.up": (1, 1), f"{block}.down": (1, 1),
    })
  assert axes == expected


def test_apply_multi_axis_shapes(setup):
  _, _, base, axes = setup
  params = jaxlora.apply(base, rank=2, targets=["query", "out"], kernel_axes=axes)
  query = params["layers"]["query"]["lora"]
  assert query["a"].shape == (L, D, 2)
  assert query["b"].shape == (L, 2, H, HD)
  assert query["scale"].shape == (L,)
  out = params["top"]["out"]["lora"]
  assert out["a"].shape == (H, HD, 2)
  assert out["b"].shape == (2, D)
  assert out["scale"].shape == ()


def test_contraction_roles():
  layout = contraction.from_einsum("...thd,hdk->...thk", 4, 3)
  assert layout.roles == ("h", "d", "k")
  general = contraction.dense_general(4, axis=(-2, -1), batch_dims=(0,), n_features=1)
  assert general.kernel_axes == (2, 1)
  assert general.roles[0] == general.inputs[0]


@pytest.mark.parametrize(
    "equation, message",
    [
        ("BTD,NDH->BTNH", "ordered 'NDH'"),
        ("btd,d->bt", "one axis contracted"),
        ("btd,dkz->btk", "summed out"),
    ],
)
def test_contraction_rejects_layout(equation, message):
  with pytest.raises(ValueError, match=message):
    contraction.from_einsum(equation, 3, len(equation.split(",")[1].split("-")[0]))


# --- the wrapped forward pass -------------------------------------------------


def test_wrap_identity_at_init(setup):
  model, x, base, axes = setup
  params = jaxlora.apply(base, rank=2, targets="all-linear", kernel_axes=axes)
  adapted = jaxlora.wrap(model.apply)({"params": params}, x)
  np.testing.assert_array_equal(adapted, model.apply({"params": base}, x))


@pytest.mark.parametrize("jit", [False, True])
def test_wrap_equals_merged(setup, jit):
  model, x, base, axes = setup
  params = randomize_b(jaxlora.apply(base, rank=2, alpha=3, targets="all-linear", kernel_axes=axes))
  apply_fn = jaxlora.wrap(model.apply)
  apply_fn = jax.jit(apply_fn) if jit else apply_fn

  adapted = apply_fn({"params": params}, x)
  merged = jaxlora.merge(params)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  expected = model.apply({"params": merged}, x)
  np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(adapted, model.apply({"params": base}, x), atol=1e-3)


def test_wrap_each_layer_type(setup):
  """One adapted layer at a time, so that no layer's error hides behind another's."""
  model, x, base, axes = setup
  plain = model.apply({"params": base}, x)
  for target in ("layers.query", "layers.key", "top.value", "top.out", "layers.down", "embed"):
    params = randomize_b(jaxlora.apply(base, rank=2, targets=target, kernel_axes=axes))
    adapted = jaxlora.wrap(model.apply)({"params": params}, x)
    expected = model.apply({"params": jaxlora.merge(params)}, x)
    np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5, err_msg=target)
    assert not np.allclose(adapted, plain, atol=1e-4), target


def test_wrap_nested_adds_once(setup):
  model, x, base, axes = setup
  params = randomize_b(jaxlora.apply(base, rank=2, targets=["down"], kernel_axes=axes))
  inner = jaxlora.wrap(model.apply)
  outer = jaxlora.wrap(lambda variables, x: inner(variables, x))
  np.testing.assert_array_equal(outer({"params": params}, x), inner({"params": params}, x))


def test_wrap_dense_general_batch_dims():
  layer = nn.DenseGeneral(features=4, axis=-1, batch_dims=(0,))  # kernel [3, 5, 4]
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 6, 5))
  base = layer.init(jax.random.PRNGKey(0), x)["params"]
  axes = jaxlora.linen_kernel_axes(layer, x)
  assert axes == {"": (1, 1)}

  params = randomize_b(jaxlora.apply(base, rank=2, targets="all-linear", kernel_axes=axes))
  assert params["lora"]["a"].shape == (3, 5, 2)
  assert params["lora"]["scale"].shape == (3,)
  adapted = jaxlora.wrap(layer.apply)({"params": params}, x)
  expected = layer.apply({"params": jaxlora.merge(params)}, x)
  np.testing.assert_allclose(adapted, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(adapted, layer.apply({"params": base}, x), atol=1e-4)


# --- training -----------------------------------------------------------------


def loss_fn(model, frozen, x, labels):
  apply_fn = jaxlora.wrap(model.apply)

  def loss(trainable):
    logits = apply_fn({"params": jaxlora.combine(trainable, frozen)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss


def test_wrap_step_updates_only_adapters(setup):
  model, x, base, axes = setup
  params = randomize_b(jaxlora.apply(base, rank=2, targets="all-linear", kernel_axes=axes))
  trainable, frozen = jaxlora.partition(params)
  labels = jnp.arange(B) % C
  loss = loss_fn(model, frozen, x, labels)

  tx = optax.adam(1e-2)
  grads = jax.jit(jax.grad(loss))(trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  new = jaxlora.combine(optax.apply_updates(trainable, updates), frozen)

  old_leaves = dict(paths.iter_leaves(params))
  changed = []
  for path, leaf in paths.iter_leaves(new):
    if jaxlora.is_adapter_weight(path):
      changed.append(paths.module_name(path))
      assert not np.array_equal(leaf, old_leaves[path]), path
    else:
      np.testing.assert_array_equal(leaf, old_leaves[path], err_msg=paths.module_name(path))
  assert len(changed) == 2 * 14  # A and B of 14 adapted modules
  assert float(loss(optax.apply_updates(trainable, updates))) < float(loss(trainable))


def test_wrap_gradient_has_no_weight_gradient(setup):
  """Checks the jaxpr: no `dot_general` of the adapter gradient outputs a frozen kernel's shape.

  The same check on the gradient with respect to the whole tree finds those
  shapes, so it can fail.
  """
  model, x, base, axes = setup
  params = randomize_b(jaxlora.apply(base, rank=2, targets="all-linear", kernel_axes=axes))
  trainable, frozen = jaxlora.partition(params)
  labels = jnp.arange(B) % C
  kernels = kernel_shapes(params)
  assert len(kernels) == 14

  adapter_grad = dot_shapes(jax.grad(loss_fn(model, frozen, x, labels)), trainable)
  assert weight_gradients(adapter_grad, kernels) == []

  def full_loss(params):
    logits = jaxlora.wrap(model.apply)({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  full_grad = dot_shapes(jax.grad(full_loss), params)
  assert weight_gradients(full_grad, kernels) == sorted(kernels)


# --- errors -------------------------------------------------------------------


def test_apply_unknown_target_lists_paths(setup):
  _, _, base, axes = setup
  for target in (["qkv"], ["layers/query"]):
    with pytest.raises(ValueError) as info:
      jaxlora.apply(base, rank=2, targets=target, kernel_axes=axes)
    message = str(info.value)
    assert "match no linear module" in message
    for name in ("layers.query", "layers.key", "top.out", "embed", "head"):
      assert name in message


def test_wrap_without_kernel_axes_raises(setup):
  model, x, base, _ = setup
  params = jaxlora.apply(base, rank=2, targets=["layers.query"])  # treats [L, D, H, HD] as [.., H, HD]
  with pytest.raises(ValueError, match=r"adapter of layers.query does not fit.*linen_kernel_axes"):
    jaxlora.wrap(model.apply)({"params": params}, x)


def test_apply_kernel_axes_unknown_module(setup):
  _, _, base, axes = setup
  with pytest.raises(ValueError, match="kernel_axes names modules that have no kernel: nowhere"):
    jaxlora.apply(base, rank=2, targets=["up"], kernel_axes={**axes, "nowhere": (1, 1)})


@pytest.mark.parametrize("layout", [(0, 1), (2, 2), (1,)])
def test_apply_kernel_axes_invalid(setup, layout):
  _, _, base, _ = setup
  with pytest.raises(ValueError, match=r"kernel_axes\['layers.up'\] is .* must be \(n_in, n_out\)"):
    jaxlora.apply(base, rank=2, targets=["layers.up"], kernel_axes={"layers.up": layout})


class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3,), name="conv")(x)
    return nn.Dense(C, name="head")(x.mean(axis=1))


def test_wrap_unsupported_module_raises():
  model = ConvNet()
  x = jax.random.normal(jax.random.PRNGKey(1), (B, T, IN))
  base = model.init(jax.random.PRNGKey(0), x)["params"]
  params = jaxlora.apply(base, rank=2, targets=["conv"])
  with pytest.raises(ValueError, match=r"Module conv \(Conv\) has a LoRA adapter.*wrap_merged"):
    jaxlora.wrap(model.apply)({"params": params}, x)


# --- the examples -------------------------------------------------------------


def test_example_linen_mlp_trains():
  example = load_example("custom_linen_mlp")
  result = example.main(["--base-steps", "100", "--steps", "30"])
  assert result["loss_after"] < 0.8 * result["loss_before"]
  assert result["merged_max_difference"] < 1e-4


def test_example_linen_transformer_trains():
  example = load_example("custom_linen_transformer")
  result = example.main(["--base-steps", "30", "--steps", "20", "--batch-size", "16"])
  assert result["loss_after"] < 0.8 * result["loss_before"]
  assert result["merged_max_difference"] < 1e-4

"""The LoRA core on hand-built trees: config checks, apply, merge, partition, optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import paths

# A Llama-shaped tree with every dimension different: D=6, q width 10, kv width 4,
# F=14, V=22, L=3 stacked layers.
L, D, Q, KV, F, V = 3, 6, 10, 4, 14, 22


def llama_tree(seed=0, tied=False):
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))

  def kernel(*shape):
    return jax.random.normal(next(keys), shape, jnp.float32)

  tree = {
      "model": {
          "embed_tokens": {"embedding": kernel(V, D)},
          "layers": {
              "self_attn": {
                  "q_proj": {"kernel": kernel(L, D, Q)},
                  "k_proj": {"kernel": kernel(L, D, KV)},
                  "v_proj": {"kernel": kernel(L, D, KV)},
                  "o_proj": {"kernel": kernel(L, Q, D)},
              },
              "mlp": {
                  "gate_proj": {"kernel": kernel(L, D, F)},
                  "up_proj": {"kernel": kernel(L, D, F)},
                  "down_proj": {"kernel": kernel(L, F, D)},
              },
              "input_layernorm": {"scale": jnp.ones((L, D))},
              "post_attention_layernorm": {"scale": jnp.ones((L, D))},
          },
          "norm": {"scale": jnp.ones((D,))},
      },
  }
  if not tied:
    tree["lm_head"] = {"kernel": kernel(D, V)}
  return tree


def adapted_modules(params):
  return sorted(
      paths.module_name(path) for path, node in paths.iter_modules(params) if "lora" in node
  )


def randomize_b(params, seed=1):
  """Return a copy with every adapter B drawn at random, so adapters change the output."""
  key = jax.random.PRNGKey(seed)

  def fill(path, leaf):
    if path[-2:] == ("lora", "b"):
      return jax.random.normal(jax.random.fold_in(key, hash(path) % 2**31), leaf.shape)
    return leaf

  return paths.map_with_path(fill, params)


# --- LoraConfig -------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -4])
def test_config_rank_not_positive(rank):
  with pytest.raises(ValueError, match=rf"rank must be a positive integer, got {rank}"):
    jaxlora.LoraConfig(rank=rank)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank": 2.5}, "rank must be an integer, got 2.5"),
        ({"alpha": 0}, "alpha must be a positive number, got 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"init": "orthogonal"}, "Unknown LoRA init 'orthogonal'"),
        ({"targets": []}, "targets is empty"),
        ({"targets": ["q_proj", ""]}, "target '' is not a module name"),
        ({"targets": "q_proj("}, "not a valid regular expression"),
    ],
)
def test_config_invalid_fields(fields, message):
  with pytest.raises(ValueError, match=message):
    jaxlora.LoraConfig(**fields)


def test_config_numpy_rank():
  config = jaxlora.LoraConfig(rank=np.int64(4))
  assert config.rank == 4
  assert type(config.rank) is int


def test_config_defaults_match_peft():
  config = jaxlora.LoraConfig()
  assert config.rank == 8
  assert config.alpha == 8
  assert config.targets == ("q_proj", "v_proj")
  assert config.scale == 1.0
  assert jaxlora.LoraConfig(rank=16, alpha=32).scale == 2.0
  assert jaxlora.LoraConfig(rank=16, alpha=32, use_rslora=True).scale == 8.0


# --- apply ------------------------------------------------------------------


def test_apply_defaults_target_q_and_v():
  params = jaxlora.apply(llama_tree(), rank=2)
  assert adapted_modules(params) == [
      "model.layers.self_attn.q_proj",
      "model.layers.self_attn.v_proj",
  ]
  lora = params["model"]["layers"]["self_attn"]["q_proj"]["lora"]
  assert lora["a"].shape == (L, D, 2)
  assert lora["b"].shape == (L, 2, Q)
  assert lora["scale"].shape == (L,)
  np.testing.assert_array_equal(lora["b"], 0.0)
  np.testing.assert_array_equal(lora["scale"], 4.0)


def test_apply_all_linear_skips_output_head():
  params = jaxlora.apply(llama_tree(), rank=2, targets="all-linear")
  assert "lora" not in params["lm_head"]
  assert len(adapted_modules(params)) == 7


def test_apply_regex_matches_whole_path():
  params = jaxlora.apply(llama_tree(), rank=2, targets=r".*mlp\.(up|down)_proj")
  assert adapted_modules(params) == [
      "model.layers.mlp.down_proj",
      "model.layers.mlp.up_proj",
  ]
  with pytest.raises(ValueError, match="match no linear module"):
    jaxlora.apply(llama_tree(), rank=2, targets=r"up_proj")


def test_apply_leaves_input_unchanged():
  base = llama_tree()
  before = jax.tree.map(np.asarray, base)
  jaxlora.apply(base, rank=2, targets="all-linear")
  assert "lora" not in base["model"]["layers"]["self_attn"]["q_proj"]
  jax.tree.map(np.testing.assert_array_equal, before, base)


def test_apply_kaiming_bound_and_rng():
  params = jaxlora.apply(llama_tree(), rank=4, targets=["down_proj"])
  a = params["model"]["layers"]["mlp"]["down_proj"]["lora"]["a"]
  bound = 1 / np.sqrt(F)
  assert float(jnp.max(jnp.abs(a))) <= bound
  assert float(jnp.max(jnp.abs(a))) > 0.8 * bound

  again = jaxlora.apply(llama_tree(), rank=4, targets=["down_proj"])
  other = jaxlora.apply(llama_tree(), rank=4, targets=["down_proj"], rng=jax.random.PRNGKey(7))
  np.testing.assert_array_equal(again["model"]["layers"]["mlp"]["down_proj"]["lora"]["a"], a)
  assert not np.array_equal(other["model"]["layers"]["mlp"]["down_proj"]["lora"]["a"], a)


def test_apply_rank_above_kernel_side():
  with pytest.raises(ValueError) as info:
    jaxlora.apply(llama_tree(), rank=5, targets=["k_proj"])
  message = str(info.value)
  assert "rank 5" in message
  assert "model.layers.self_attn.k_proj" in message
  assert f"[in={D}, out={KV}]" in message
  assert "at most 4" in message


def test_apply_unknown_target_lists_modules():
  with pytest.raises(ValueError) as info:
    jaxlora.apply(llama_tree(), rank=2, targets=["c_attn"])
  message = str(info.value)
  assert "['c_attn']" in message
  for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
    assert name in message


def test_apply_twice_raises():
  params = jaxlora.apply(llama_tree(), rank=2)
  with pytest.raises(ValueError, match="already has an adapter"):
    jaxlora.apply(params, rank=2)


def test_apply_config_object_and_override():
  config = jaxlora.LoraConfig(rank=3, alpha=6, targets=["o_proj"])
  params = jaxlora.apply(llama_tree(), config, alpha=12)
  lora = params["model"]["layers"]["self_attn"]["o_proj"]["lora"]
  assert lora["a"].shape == (L, Q, 3)
  np.testing.assert_allclose(lora["scale"], 4.0)


# --- adapted product and merge ----------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_adapted_matmul_equals_merged(jit):
  params = randomize_b(jaxlora.apply(llama_tree(), rank=3, alpha=5, targets=["q_proj"]))
  node = params["model"]["layers"]["self_attn"]["q_proj"]
  merged = jaxlora.merge(params)["model"]["layers"]["self_attn"]["q_proj"]
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, D))

  fn = jax.jit(jaxlora.adapted_matmul) if jit else jaxlora.adapted_matmul
  for layer in range(L):
    lora = jax.tree.map(lambda leaf: leaf[layer], node["lora"])
    adapted = fn(x, node["kernel"][layer], lora)
    expected = jnp.matmul(x, merged["kernel"][layer], precision="highest")
    np.testing.assert_allclose(adapted, expected, atol=1e-4, rtol=1e-4)
    assert not np.allclose(adapted, x @ node["kernel"][layer], atol=1e-3)


def test_adapted_matmul_identity_at_init():
  params = jaxlora.apply(llama_tree(), rank=3, targets=["q_proj"])
  node = params["model"]["layers"]["self_attn"]["q_proj"]
  x = jax.random.normal(jax.random.PRNGKey(3), (4, D))
  lora = jax.tree.map(lambda leaf: leaf[0], node["lora"])
  np.testing.assert_array_equal(
      jaxlora.adapted_matmul(x, node["kernel"][0], lora), x @ node["kernel"][0]
  )


def test_adapted_matmul_dropout():
  params = randomize_b(jaxlora.apply(llama_tree(), rank=3, targets=["q_proj"]))
  node = params["model"]["layers"]["self_attn"]["q_proj"]
  lora = jax.tree.map(lambda leaf: leaf[0], node["lora"])
  x = jnp.ones((64, D))
  plain = jaxlora.adapted_matmul(x, node["kernel"][0], lora, dropout=0.5)
  dropped = jaxlora.adapted_matmul(
      x, node["kernel"][0], lora, dropout=0.5, dropout_rng=jax.random.PRNGKey(0)
  )
  assert not np.allclose(plain, dropped)
  # Dropout only touches the adapter path: the base product is unchanged.
  np.testing.assert_allclose(
      jaxlora.adapted_matmul(x, node["kernel"][0], None, dropout=0.5, dropout_rng=jax.random.PRNGKey(0)),
      x @ node["kernel"][0],
  )


def test_merge_removes_adapters_and_is_pure():
  params = randomize_b(jaxlora.apply(llama_tree(), rank=2, targets="all-linear"))
  merged = jaxlora.merge(params)
  assert adapted_modules(merged) == []
  assert adapted_modules(params)  # input still adapted
  assert jax.tree.structure(merged) == jax.tree.structure(llama_tree())

  node = params["model"]["layers"]["mlp"]["up_proj"]
  expected = node["kernel"] + node["lora"]["scale"][:, None, None] * jnp.matmul(
      node["lora"]["a"], node["lora"]["b"], precision="highest"
  )
  np.testing.assert_allclose(merged["model"]["layers"]["mlp"]["up_proj"]["kernel"], expected, atol=1e-5)


def test_merge_bfloat16_cast_once():
  base = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), llama_tree())
  params = randomize_b(jaxlora.apply(base, rank=2, targets=["q_proj"]))
  node = params["model"]["layers"]["self_attn"]["q_proj"]
  merged = jaxlora.merge(params)["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert merged.dtype == jnp.bfloat16
  exact = node["kernel"].astype(jnp.float32) + node["lora"]["scale"][:, None, None] * (
      node["lora"]["a"] @ node["lora"]["b"]
  )
  np.testing.assert_array_equal(merged, exact.astype(jnp.bfloat16))


# --- partition, combine, optimizer ------------------------------------------


def test_partition_round_trip():
  params = jaxlora.apply(llama_tree(), rank=2)
  trainable, frozen = jaxlora.partition(params)
  trainable_paths = [paths.module_name(p) for p, _ in paths.iter_leaves(trainable)]
  assert trainable_paths == [
      "model.layers.self_attn.q_proj.lora.a",
      "model.layers.self_attn.q_proj.lora.b",
      "model.layers.self_attn.v_proj.lora.a",
      "model.layers.self_attn.v_proj.lora.b",
  ]
  assert "lora" in frozen["model"]["layers"]["self_attn"]["q_proj"]  # the scale
  assert "a" not in frozen["model"]["layers"]["self_attn"]["q_proj"]["lora"]

  joined = jaxlora.combine(trainable, frozen)
  assert jax.tree.structure(joined) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, joined, params)


def test_partition_without_adapters_raises():
  with pytest.raises(ValueError, match="no LoRA adapters"):
    jaxlora.partition(llama_tree())


def test_partition_full_mask():
  base = llama_tree()
  trainable, frozen = jaxlora.partition(base, trainable_mask=jaxlora.full_mask(base))
  assert frozen == {}
  assert jax.tree.structure(trainable) == jax.tree.structure(base)


def test_partition_mask_mismatch():
  params = jaxlora.apply(llama_tree(), rank=2)
  with pytest.raises(ValueError, match="missing .*lm_head.kernel"):
    jaxlora.partition(params, trainable_mask=jaxlora.adapter_mask(llama_tree(tied=True)))


def test_combine_overlap_raises():
  params = jaxlora.apply(llama_tree(), rank=2)
  trainable, _ = jaxlora.partition(params)
  with pytest.raises(ValueError, match="model.layers.self_attn.q_proj.lora.a"):
    jaxlora.combine(trainable, trainable)


def test_optimizer_updates_only_adapters():
  params = jaxlora.apply(llama_tree(), rank=2)
  mask = jaxlora.adapter_mask(params)
  tx = jaxlora.optimizer(optax.adam(1e-2), trainable_mask=mask)
  state = tx.init(params)

  state_shapes = [leaf.shape for leaf in jax.tree.leaves(state) if leaf.ndim > 0]
  adapter_shapes = [leaf.shape for leaf in jax.tree.leaves(jaxlora.partition(params)[0])]
  assert sorted(state_shapes) == sorted(adapter_shapes * 2)  # Adam's mu and nu

  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  for path, leaf in paths.iter_leaves(new):
    old = dict(paths.iter_leaves(params))[path]
    if jaxlora.is_adapter_weight(path):
      assert not np.array_equal(leaf, old), path
    else:
      np.testing.assert_array_equal(leaf, old)


# --- counts -----------------------------------------------------------------


def test_count_parameters_and_line(capsys):
  params = jaxlora.apply(llama_tree(), rank=2)
  base_total = sum(leaf.size for leaf in jax.tree.leaves(llama_tree()))
  count = jaxlora.count_parameters(params)
  assert count.trainable == L * (D * 2 + 2 * Q) + L * (D * 2 + 2 * KV)
  assert count.total == base_total + count.trainable

  jaxlora.print_trainable_parameters(params)
  percent = 100 * count.trainable / count.total
  assert capsys.readouterr().out == (
      f"trainable params: {count.trainable:,} || all params: {count.total:,}"
      f" || trainable%: {percent:.4f}\n"
  )


def test_format_matches_peft_example():
  line = jaxlora.format_trainable_parameters(jaxlora.ParameterCount(1234, 5678))
  assert line == "trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330"

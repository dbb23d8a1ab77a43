"""The Flax Llama against transformers' LlamaForCausalLM, and its LoRA path."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxlora
from jaxlora import paths
from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.models.llama import rope_frequencies

from conftest import LLAMA3_SCALING, TINY_LLAMA, build_hf_llama

LOGITS_ATOL = 1e-4
MERGED_ATOL = 1e-5
PAD = 7  # left padding of the second row in `padded_batch`


def params_from_torch(model, config):
  """Return our tree from a torch state dict, built here without the loader."""
  state = {key: value.detach().float().numpy() for key, value in model.state_dict().items()}

  def stacked(name, transpose):
    arrays = [state[f"model.layers.{i}.{name}"] for i in range(config.num_hidden_layers)]
    return np.stack([a.T if transpose else a for a in arrays])

  def linear(block, name):
    node = {"kernel": stacked(f"{block}.{name}.weight", True)}
    bias_key = f"model.layers.0.{block}.{name}.bias"
    if bias_key in state:
      node["bias"] = stacked(f"{block}.{name}.bias", False)
    return node

  attention = {name: linear("self_attn", name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
  mlp = {name: linear("mlp", name) for name in ("gate_proj", "up_proj", "down_proj")}
  params = {
      "model": {
          "embed_tokens": {"embedding": state["model.embed_tokens.weight"]},
          "layers": {
              "self_attn": attention,
              "mlp": mlp,
              "input_layernorm": {"scale": stacked("input_layernorm.weight", False)},
              "post_attention_layernorm": {
                  "scale": stacked("post_attention_layernorm.weight", False)
              },
          },
          "norm": {"scale": state["model.norm.weight"]},
      }
  }
  if not config.tie_word_embeddings:
    params["lm_head"] = {"kernel": state["lm_head.weight"].T}
  return jax.tree.map(jnp.asarray, params)


def padded_batch(length=40, seed=0):
  """Return `(input_ids, attention_mask)` `[2, length]`; row 1 is left-padded."""
  ids = np.random.RandomState(seed).randint(0, TINY_LLAMA["vocab_size"], (2, length))
  mask = np.ones((2, length), np.int32)
  mask[1, :PAD] = 0
  return ids.astype(np.int32), mask


def hf_logits(model, ids, mask, positions=None):
  kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
  return out.logits.float().numpy()


def assert_real_tokens_close(ours, theirs, atol):
  """Compare logits at the unpadded positions; fully masked rows are undefined."""
  np.testing.assert_allclose(ours[0], theirs[0], atol=atol, rtol=0)
  np.testing.assert_allclose(ours[1, PAD:], theirs[1, PAD:], atol=atol, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("scaling", [None, "llama3", "linear"])
def test_logits_match_transformers(tied, scaling):
  rope_scaling = {
      None: None,
      "llama3": LLAMA3_SCALING,
      "linear": {"rope_type": "linear", "factor": 2.5},
  }[scaling]
  hf = build_hf_llama(tie_word_embeddings=tied, rope_scaling=rope_scaling)
  config = LlamaConfig.from_hf(hf.config.to_dict())
  params = params_from_torch(hf, config)
  ids, mask = padded_batch()

  ours = Llama(config).apply({"params": params}, ids, attention_mask=mask)

  assert ours.dtype == jnp.float32
  assert ours.shape == (2, 40, TINY_LLAMA["vocab_size"])
  assert_real_tokens_close(np.asarray(ours), hf_logits(hf, ids, mask), LOGITS_ATOL)


def test_logits_bias_and_positions():
  hf = build_hf_llama(attention_bias=True, mlp_bias=True, seed=1)
  config = LlamaConfig.from_hf(hf.config.to_dict())
  params = params_from_torch(hf, config)
  ids, mask = padded_batch(seed=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)

  ours = jax.jit(Llama(config).apply)({"params": params}, ids, positions, mask)

  theirs = hf_logits(hf, ids, mask, positions)
  assert_real_tokens_close(np.asarray(ours), theirs, LOGITS_ATOL)


def test_padding_masks_keys():
  config = LlamaConfig(**TINY_LLAMA)
  params = init_params(config, jax.random.PRNGKey(0))
  ids, mask = padded_batch()
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

  padded = Llama(config).apply({"params": params}, ids, positions, mask)
  alone = Llama(config).apply({"params": params}, ids[1:, PAD:])

  np.testing.assert_allclose(padded[1, PAD:], alone[0], atol=1e-5, rtol=0)


def test_llama3_frequencies_match_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top

  hf = build_hf_llama(rope_scaling=LLAMA3_SCALING)
  config = LlamaConfig.from_hf(hf.config.to_dict())
  plain = np.asarray(rope_frequencies(LlamaConfig(**TINY_LLAMA)))

  ours = np.asarray(rope_frequencies(config))
  theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config)

  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
  ratio = plain / ours
  assert np.isclose(ratio[0], 1.0), "the highest frequency should be kept"
  assert 1.0 < ratio[1] < LLAMA3_SCALING["factor"], "one frequency should be blended"
  assert np.allclose(ratio[2:], LLAMA3_SCALING["factor"]), "low frequencies should be divided"


def test_unknown_rope_type_raises():
  with pytest.raises(ValueError, match="rope_type 'dynamic'"):
    LlamaConfig(**TINY_LLAMA, rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def test_tree_layout():
  config = LlamaConfig(**TINY_LLAMA)
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
  L, D, F, V = 3, 48, 80, 97

  got = {paths.module_name(path): tuple(leaf.shape) for path, leaf in paths.iter_leaves(shapes)}

  assert got == {
      "lm_head.kernel": (D, V),
      "model.embed_tokens.embedding": (V, D),
      "model.norm.scale": (D,),
      "model.layers.input_layernorm.scale": (L, D),
      "model.layers.post_attention_layernorm.scale": (L, D),
      "model.layers.self_attn.q_proj.kernel": (L, D, 72),
      "model.layers.self_attn.k_proj.kernel": (L, D, 24),
      "model.layers.self_attn.v_proj.kernel": (L, D, 24),
      "model.layers.self_attn.o_proj.kernel": (L, 72, D),
      "model.layers.mlp.gate_proj.kernel": (L, D, F),
      "model.layers.mlp.up_proj.kernel": (L, D, F),
      "model.layers.mlp.down_proj.kernel": (L, F, D),
  }


def test_tied_tree_has_no_head():
  config = LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True})
  params = init_params(config, jax.random.PRNGKey(0))
  assert "lm_head" not in params


def test_input_shape_errors():
  config = LlamaConfig(**TINY_LLAMA)
  params = init_params(config, jax.random.PRNGKey(0))
  model = Llama(config)
  with pytest.raises(ValueError, match="expected \\[batch, tokens\\]"):
    model.apply({"params": params}, jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="attention_mask has shape"):
    model.apply({"params": params}, jnp.zeros((2, 5), jnp.int32), attention_mask=jnp.ones((2, 4)))


def test_bfloat16_compute_close():
  config = LlamaConfig(**TINY_LLAMA)
  params = init_params(config, jax.random.PRNGKey(0))
  ids, mask = padded_batch()

  full = Llama(config).apply({"params": params}, ids, attention_mask=mask)
  half = Llama(config, dtype=jnp.bfloat16).apply({"params": params}, ids, attention_mask=mask)

  assert half.dtype == jnp.float32
  assert np.abs(np.asarray(half) - np.asarray(full)).max() < 0.05


def adapted_params(seed=0, **config_overrides):
  """Return `(config, base params, adapted params with random B)`."""
  config = LlamaConfig(**{**TINY_LLAMA, **config_overrides})
  base = init_params(config, jax.random.PRNGKey(seed))
  adapted = jaxlora.apply(base, rank=4, targets="all-linear", rng=jax.random.PRNGKey(1))

  def randomize_b(path, leaf):
    if path[-2:] != ("lora", "b"):
      return leaf
    key = jax.random.fold_in(jax.random.PRNGKey(2), zlib.crc32(paths.module_name(path).encode()))
    return 0.5 * jax.random.normal(key, leaf.shape, leaf.dtype)

  return config, base, adapted, paths.map_with_path(randomize_b, adapted)


def test_lora_identity_at_init():
  config, base, adapted, _ = adapted_params()
  ids, mask = padded_batch()

  plain = Llama(config).apply({"params": base}, ids, attention_mask=mask)
  with_adapters = Llama(config).apply({"params": adapted}, ids, attention_mask=mask)

  np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(plain))


@pytest.mark.parametrize("remat", [False, True])
def test_lora_equals_merged(remat):
  config, base, _, trained = adapted_params()
  ids, mask = padded_batch()
  model = Llama(config, remat=remat)

  adapted = model.apply({"params": trained}, ids, attention_mask=mask)
  merged = model.apply({"params": jaxlora.merge(trained)}, ids, attention_mask=mask)
  plain = model.apply({"params": base}, ids, attention_mask=mask)

  assert np.abs(np.asarray(adapted) - np.asarray(plain)).max() > 1e-2, "B should matter"
  np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), atol=MERGED_ATOL, rtol=0)


def test_lora_with_bias_equals_merged():
  config, _, _, trained = adapted_params(attention_bias=True, mlp_bias=True)
  ids, mask = padded_batch()
  model = Llama(config)

  adapted = model.apply({"params": trained}, ids, attention_mask=mask)
  merged = model.apply({"params": jaxlora.merge(trained)}, ids, attention_mask=mask)

  np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), atol=MERGED_ATOL, rtol=0)


def test_lora_dropout():
  config, _, _, trained = adapted_params()
  ids, mask = padded_batch()
  model = Llama(config, lora_dropout=0.3)

  def run(rng):
    return np.asarray(
        model.apply(
            {"params": trained}, ids, attention_mask=mask, deterministic=False,
            rngs={"dropout": rng},
        )
    )

  evaluation = np.asarray(model.apply({"params": trained}, ids, attention_mask=mask))
  first = run(jax.random.PRNGKey(3))
  assert np.abs(first - evaluation).max() > 1e-3
  np.testing.assert_array_equal(first, run(jax.random.PRNGKey(3)))
  assert np.abs(first - run(jax.random.PRNGKey(4))).max() > 1e-3


def test_remat_gradients_equal():
  config, _, _, trained = adapted_params()
  ids, mask = padded_batch()
  trainable, frozen = jaxlora.partition(trained)

  def loss(trainable, remat):
    params = jaxlora.combine(trainable, frozen)
    logits = Llama(config, remat=remat).apply({"params": params}, ids, attention_mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  plain = jax.grad(loss)(trainable, False)
  rematerialized = jax.grad(loss)(trainable, True)

  for (path, a), (_, b) in zip(paths.iter_leaves(plain), paths.iter_leaves(rematerialized)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=paths.module_name(path))
  q_b = plain["model"]["layers"]["self_attn"]["q_proj"]["lora"]["b"]
  assert np.abs(np.asarray(q_b)).max() > 0


def test_remat_policy_gradients_equal():
  config, _, _, trained = adapted_params()
  ids, mask = padded_batch()
  trainable, frozen = jaxlora.partition(trained)

  def loss(trainable, **model_fields):
    params = jaxlora.combine(trainable, frozen)
    logits = Llama(config, **model_fields).apply({"params": params}, ids, attention_mask=mask)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  plain = jax.grad(loss)(trainable)
  saved_dots = jax.grad(loss)(trainable, remat=True, remat_policy="dots_with_no_batch_dims_saveable")
  for (path, a), (_, b) in zip(paths.iter_leaves(plain), paths.iter_leaves(saved_dots)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=paths.module_name(path))


def test_remat_policy_unknown():
  config, _, _, trained = adapted_params()
  ids, _ = padded_batch()
  model = Llama(config, remat=True, remat_policy="save_everything")
  with pytest.raises(ValueError, match="Unknown remat_policy 'save_everything'; use one of .*nothing_saveable"):
    model.apply({"params": trained}, ids)


@pytest.mark.parametrize("tied", [False, True])
def test_no_implicit_rank_promotion(tied):
  config, _, _, trained = adapted_params(
      tie_word_embeddings=tied, attention_bias=True, mlp_bias=True, rope_scaling=LLAMA3_SCALING
  )
  ids, mask = padded_batch(length=8)
  model = Llama(config, lora_dropout=0.1, remat=True)

  with jax.numpy_rank_promotion("raise"):
    logits = model.apply(
        {"params": trained}, ids, attention_mask=mask, deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(0)},
    )

  assert logits.shape == (2, 8, TINY_LLAMA["vocab_size"])

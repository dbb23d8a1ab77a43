"""Cached decoding (`decode` with a `KVCache`) against the full forward pass.

Each architecture gets a tiny random model whose sizes all differ (see
`test_architectures.CASES`, plus Llama from `conftest.TINY_LLAMA`). The
weights are `init_params` times 3, so that the logits reach about 4 and a
wrong key or position shows, while float32 rounding stays under `ATOL`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import paths
from jaxlora.models import LlamaConfig, build_model, config_from_hf, init_params
from jaxlora.models.llama import KVCache, init_cache

from conftest import TINY_LLAMA
from test_architectures import CASES

ATOL = 1e-5
MERGED_ATOL = 1e-4
WEIGHT_SCALE = 3.0
LENGTH = 16  # tokens per row
PAD = 3  # left padding of row 1
CACHE_SIZE = 20  # S > LENGTH, so some columns are never written

ARCHITECTURES = ["llama", *sorted(CASES)]


def model_config(case):
  if case == "llama":
    return LlamaConfig.from_hf({**TINY_LLAMA, "model_type": "llama"})
  config_class, fields, *_ = CASES[case]
  return config_from_hf(config_class(**fields).to_dict())


@functools.cache
def random_params(case, seed=0):
  params = init_params(model_config(case), jax.random.PRNGKey(seed))
  return jax.tree.map(lambda leaf: leaf * WEIGHT_SCALE, params)


def batch(seed=0):
  """Return `(input_ids, attention_mask, positions)` `[2, LENGTH]` with row 1 left-padded."""
  ids = np.random.RandomState(seed).randint(0, 97, (2, LENGTH)).astype(np.int32)
  mask = np.ones((2, LENGTH), np.int32)
  mask[1, :PAD] = 0
  positions = np.stack([np.arange(LENGTH), np.maximum(np.arange(LENGTH) - PAD, 0)]).astype(np.int32)
  return ids, mask, positions


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids, mask, positions):
  return model.apply({"params": params}, ids, positions=positions, attention_mask=mask)


def full_logits(config, params, ids, mask, positions):
  return np.asarray(_forward(build_model(config), params, ids, mask, positions))


@functools.partial(jax.jit, static_argnames=("model", "prefill", "chunk"))
def _decode_all(model, params, ids, mask, positions, *, prefill, chunk):
  """Run `ids` through `decode`: `prefill` tokens, then `chunk`, then one per step under `scan`."""
  decode = functools.partial(model.apply, {"params": params}, method="decode")
  cache = init_cache(model.config, ids.shape[0], CACHE_SIZE, model.dtype)
  pieces = []
  for part in (slice(0, prefill), slice(prefill, prefill + chunk)):
    if part.stop > part.start:
      logits, cache = decode(
          ids[:, part], cache, positions=positions[:, part], attention_mask=mask[:, part]
      )
      pieces.append(logits)

  def step(cache, column):
    token, position, real = column
    logits, cache = decode(
        token[:, None], cache, positions=position[:, None], attention_mask=real[:, None]
    )
    return cache, logits[:, 0]

  rest = slice(prefill + chunk, None)
  columns = (ids[:, rest].T, positions[:, rest].T, mask[:, rest].T)
  cache, stepped_TBV = jax.lax.scan(step, cache, columns)
  pieces.append(jnp.swapaxes(stepped_TBV, 0, 1))
  return jnp.concatenate(pieces, axis=1), cache


def cached_logits(config, params, ids, mask, positions, prefill=6, chunk=0):
  """Return the logits `[B, LENGTH, V]` of `ids` run through `decode`, and the cache."""
  logits, cache = _decode_all(
      build_model(config), params, ids, mask, positions, prefill=prefill, chunk=chunk
  )
  return np.asarray(logits), cache


def assert_real_tokens_close(cached, full, atol=ATOL):
  """Compare at real tokens; a padding query attends to nothing and is undefined."""
  np.testing.assert_allclose(cached[0], full[0], atol=atol, rtol=0)
  np.testing.assert_allclose(cached[1, PAD:], full[1, PAD:], atol=atol, rtol=0)


@pytest.mark.parametrize("case", ARCHITECTURES)
def test_decode_matches_forward(case):
  config = model_config(case)
  params = random_params(case)
  ids, mask, positions = batch()

  cached, cache = cached_logits(config, params, ids, mask, positions)
  full = full_logits(config, params, ids, mask, positions)

  assert_real_tokens_close(cached, full)
  assert np.abs(full).max() > 2.0, "the logits are too flat to test anything"
  assert int(cache.length) == LENGTH
  np.testing.assert_array_equal(np.asarray(cache.valid[:, :LENGTH]), mask.astype(bool))
  assert not np.asarray(cache.valid[:, LENGTH:]).any()


@pytest.mark.parametrize("case", ["mistral", "qwen2-sliding", "phi3"])
def test_decode_sliding_window(case):
  config = model_config(case)
  params = random_params(case)
  ids, mask, positions = batch(seed=1)
  unwindowed = dataclasses.replace(config, sliding_window=None)

  cached, _ = cached_logits(config, params, ids, mask, positions)

  assert config.sliding_window < LENGTH - PAD
  assert_real_tokens_close(cached, full_logits(config, params, ids, mask, positions))
  late = slice(config.sliding_window + PAD, LENGTH)
  difference = np.abs(cached[:, late] - full_logits(unwindowed, params, ids, mask, positions)[:, late])
  assert difference.max() > 1e-2, "the window should change the late logits"


@pytest.mark.parametrize("case", ["llama", "phi3", "gpt2"])
def test_decode_with_adapters(case):
  config = model_config(case)
  base = random_params(case)
  adapted = jaxlora.apply(base, rank=3, targets="all-linear", rng=jax.random.PRNGKey(1))

  def randomize_b(path, leaf):
    if path[-2:] == ("lora", "b"):
      key = jax.random.fold_in(jax.random.PRNGKey(2), len(paths.module_name(path)))
      return 0.2 * jax.random.normal(key, leaf.shape)
    return leaf

  adapted = paths.map_with_path(randomize_b, adapted)
  ids, mask, positions = batch(seed=2)

  cached, _ = cached_logits(config, adapted, ids, mask, positions)
  merged = full_logits(config, jaxlora.merge(adapted), ids, mask, positions)

  assert_real_tokens_close(cached, full_logits(config, adapted, ids, mask, positions))
  # Merging rounds the kernels once more, so the merged model is further off.
  assert_real_tokens_close(cached, merged, atol=MERGED_ATOL)
  plain = full_logits(config, base, ids, mask, positions)
  assert np.abs(cached[0] - plain[0]).max() > 1e-2, "the adapters should change the logits"


def test_decode_chunks_agree():
  config = model_config("llama")
  params = random_params("llama")
  ids, mask, positions = batch(seed=3)

  whole, _ = cached_logits(config, params, ids, mask, positions, prefill=LENGTH, chunk=0)
  steps, _ = cached_logits(config, params, ids, mask, positions, prefill=1, chunk=0)
  chunked, _ = cached_logits(config, params, ids, mask, positions, prefill=2, chunk=LENGTH - 2)

  assert_real_tokens_close(steps, whole)
  assert_real_tokens_close(chunked, whole)


def test_decode_default_positions():
  config = model_config("qwen2")
  params = random_params("qwen2")
  ids = batch()[0][:1]
  model = build_model(config)

  @jax.jit
  def run(params, ids):
    decode = functools.partial(model.apply, {"params": params}, method="decode")
    prefill, cache = decode(ids[:, :5], init_cache(config, 1, 8))
    step, _ = decode(ids[:, 5:6], cache)
    return prefill, step, model.apply({"params": params}, ids[:, :6])

  prefill, step, full = run(params, ids)

  np.testing.assert_allclose(np.asarray(prefill), np.asarray(full[:, :5]), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 5:6]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_decode_keeps_parameter_tree(case):
  config = model_config(case)
  model = build_model(config)
  ids = jnp.zeros((1, 2), jnp.int32)

  expected = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
  got = jax.eval_shape(
      lambda rng: model.init(rng, ids, init_cache(config, 1, 4), method="decode"),
      jax.random.PRNGKey(0),
  )

  assert set(got) == {"params"}
  assert jax.tree.structure(got["params"]) == jax.tree.structure(expected)
  for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got["params"])):
    assert want.shape == have.shape


def test_init_cache_shapes():
  llama = model_config("llama")
  gpt2 = model_config("gpt2")

  cache = init_cache(llama, 2, 9, jnp.bfloat16)
  gpt2_cache = init_cache(gpt2, 3, 5)

  assert isinstance(cache, KVCache)
  assert cache.keys.shape == (3, 2, 9, 2, 12)  # L, B, S, K, hd
  assert cache.values.shape == (3, 2, 9, 2, 12)
  assert cache.keys.dtype == jnp.bfloat16
  assert cache.valid.shape == (2, 9)
  assert cache.valid.dtype == jnp.bool_
  assert cache.length.shape == ()
  assert int(cache.length) == 0
  assert gpt2_cache.keys.shape == (3, 3, 5, 4, 12)  # K = H = 4, hd = 48 / 4


def test_decode_bfloat16_close():
  config = model_config("llama")
  params = random_params("llama")
  ids, mask, positions = batch(seed=4)
  model = build_model(config, dtype=jnp.bfloat16)

  logits, cache = _decode_all(model, params, ids, mask, positions, prefill=6, chunk=3)

  assert cache.keys.dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32
  full = full_logits(config, params, ids, mask, positions)
  assert np.abs(np.asarray(logits)[0] - full[0]).max() < 0.25


@pytest.mark.parametrize(
    "cache_args, input_length, message",
    [
        ((3, CACHE_SIZE), 4, r"a batch of 2 need keys and values \(3, 2, 20, 2, 12\) and valid \(2, 20\); build it with init_cache"),
        ((2, 3), 4, "input_ids has 4 tokens, more than the cache's 3 columns"),
    ],
)
def test_decode_rejects_bad_cache(cache_args, input_length, message):
  config = model_config("llama")
  model = build_model(config)
  ids = jnp.zeros((2, input_length), jnp.int32)

  with pytest.raises(ValueError, match=message):
    model.apply({"params": random_params("llama")}, ids, init_cache(config, *cache_args), method="decode")


def test_decode_rejects_other_model_cache():
  config = model_config("llama")
  other = dataclasses.replace(config, num_hidden_layers=2)
  model = build_model(config)

  with pytest.raises(ValueError, match=r"keys \(2, 1, 4, 2, 12\)"):
    model.apply(
        {"params": random_params("llama")}, jnp.zeros((1, 2), jnp.int32), init_cache(other, 1, 4),
        method="decode",
    )


@pytest.mark.parametrize("name, value", [("batch_size", 0), ("max_length", -1), ("max_length", 2.0)])
def test_init_cache_rejects_sizes(name, value):
  sizes = {"batch_size": 1, "max_length": 4, name: value}
  with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
    init_cache(model_config("llama"), **sizes)


"""Packed rows: segment ids keep attention inside each example."""

import jax
import numpy as np
import pytest

from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.models.gpt2 import Gpt2, Gpt2Config
from jaxlora.models.gpt2 import init_params as gpt2_init_params

from conftest import TINY_LLAMA

ATOL = 1e-5


def pack(pieces, width):
  """Return `(ids, positions, segment_ids, attention_mask)` `[1, width]` of pieces side by side."""
  ids = np.zeros((1, width), np.int32)
  positions = np.zeros((1, width), np.int32)
  segments = np.zeros((1, width), np.int32)
  start = 0
  for index, piece in enumerate(pieces, start=1):
    stop = start + len(piece)
    ids[0, start:stop] = piece
    positions[0, start:stop] = np.arange(len(piece))
    segments[0, start:stop] = index
    start = stop
  return ids, positions, segments, (segments > 0).astype(np.int32)


def check_packed_equals_separate(model, params, vocab_size):
  rng = np.random.default_rng(0)
  pieces = [rng.integers(0, vocab_size, size=n).astype(np.int32) for n in (7, 11, 5)]
  ids, positions, segments, mask = pack(pieces, width=26)

  packed = model.apply(
      {"params": params}, ids, positions=positions, attention_mask=mask,
      segment_ids=segments,
  )
  start = 0
  for piece in pieces:
    alone = model.apply({"params": params}, piece[None])
    np.testing.assert_allclose(
        np.asarray(packed[0, start:start + len(piece)]), np.asarray(alone[0]), atol=ATOL
    )
    start += len(piece)

  # Without segment ids the later pieces see the earlier ones.
  leaked = model.apply({"params": params}, ids, positions=positions, attention_mask=mask)
  assert np.abs(np.asarray(leaked[0, 7:18]) - np.asarray(packed[0, 7:18])).max() > 1e-3


def test_llama_packed_rows_match_separate_examples():
  config = LlamaConfig(**TINY_LLAMA)
  params = init_params(config, jax.random.PRNGKey(0))
  check_packed_equals_separate(Llama(config), params, config.vocab_size)


def test_gpt2_packed_rows_match_separate_examples():
  config = Gpt2Config(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=3)
  params = gpt2_init_params(config, jax.random.PRNGKey(1))
  check_packed_equals_separate(Gpt2(config), params, config.vocab_size)


def test_segment_ids_shape_must_match():
  config = LlamaConfig(**TINY_LLAMA)
  params = init_params(config, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="segment_ids has shape"):
    Llama(config).apply(
        {"params": params}, np.zeros((1, 6), np.int32), segment_ids=np.zeros((1, 5), np.int32)
    )

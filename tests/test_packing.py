"""Tests for batch layouts: packed rows, padded widths, shuffling and resumption."""

import logging

import jax
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.train import data, packing, step

from conftest import TINY_LLAMA

VOCAB = TINY_LLAMA["vocab_size"]
PAD_ID = 0


def _examples(lengths, *, seq_len, seed=0):
  """Return random examples of `lengths` tokens whose first third is an unscored prompt."""
  rng = np.random.default_rng(seed)
  tokens = [rng.integers(1, VOCAB, size=n).astype(np.int32) for n in lengths]
  scored = [np.arange(n) >= max(1, n // 3) for n in lengths]
  return data.TokenizedExamples(tokens, scored, seq_len=seq_len, pad_id=PAD_ID)


def _mixed_examples(count=29, seq_len=32, seed=0):
  lengths = np.random.default_rng(seed + 100).integers(2, seq_len + 2, size=count)
  return _examples(lengths.tolist(), seq_len=seq_len, seed=seed)


def _segments(batch, row):
  """Return `(inputs, targets, positions, scored)` per segment of one packed row."""
  segment_ids = batch["segment_ids"][row]
  pieces = []
  for segment in range(1, segment_ids.max() + 1):
    where = segment_ids == segment
    pieces.append(tuple(batch[key][row][where] for key in ("input_ids", "targets", "positions", "loss_mask")))
  return pieces


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# Row assignment.

def test_pack_rows_best_fit():
  # Capacity 8: [5, 3] fill row 0 exactly; 4 opens row 1, 2 joins it;
  # 6 fits no open row (room 2), so it opens row 2.
  assert packing.pack_rows([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]


def test_pack_rows_prefers_tightest_row():
  # Rooms after the first three items: 2, 5, 3. An item of 3 takes the room
  # of 3 (row 2), not the first row that fits it (row 1).
  assert packing.pack_rows([8, 5, 7, 3], 10) == [[0], [1], [2, 3]]


def test_pack_rows_rejects_wide_items():
  with pytest.raises(ValueError, match="between 1 and 8 positions"):
    packing.pack_rows([3, 9], 8)
  with pytest.raises(ValueError, match="from 0 to 3"):
    packing.pack_rows([3, 0], 8)


# Packed layout.

def test_packed_row_layout():
  examples = _examples([6, 9, 4], seq_len=20)
  batch = packing.collate_packed(examples, [[0, 1, 2]], batch_size=2)

  assert set(batch) == set(step.BATCH_KEYS) | {"positions", "segment_ids"}
  for key, value in batch.items():
    assert value.shape == (2, 20), key
    assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key

  # 5 + 8 + 3 = 16 positions: segments 1, 2, 3, then padding.
  expected_segments = [1] * 5 + [2] * 8 + [3] * 3 + [0] * 4
  assert batch["segment_ids"][0].tolist() == expected_segments
  assert batch["positions"][0].tolist() == list(range(5)) + list(range(8)) + list(range(3)) + [0] * 4
  np.testing.assert_array_equal(batch["attention_mask"][0], batch["segment_ids"][0] > 0)
  assert not batch["loss_mask"][0, 16:].any()
  assert not batch["attention_mask"][1].any()
  assert not batch["segment_ids"][1].any()

  for index, (inputs, targets, positions, scored) in enumerate(_segments(batch, 0)):
    ids = examples.tokens[index]
    assert inputs.tolist() == ids[:-1].tolist()
    # The last target of an example is its own last token, never the next
    # example's first token.
    assert targets.tolist() == ids[1:].tolist()
    assert scored.tolist() == examples.scored[index][1:].tolist()


def test_packed_row_overflow_raises():
  examples = _examples([10, 10], seq_len=16)
  with pytest.raises(ValueError, match="Packed row 0 fills 18 positions"):
    packing.collate_packed(examples, [[0, 1]], batch_size=1)


def test_packed_epoch_keeps_examples_whole():
  examples = _mixed_examples()
  rows = packing.epoch_rows_fn(
      packing.example_widths(examples), seed=3, seq_len=examples.seq_len, pack=True
  )(0)
  assert sorted(index for row in rows for index in row) == list(range(len(examples)))

  # With B = 1, the first len(rows) batches are exactly epoch 0.
  batches = data.train_batches(examples, batch_size=1, seed=3, pack=True)
  seen = []
  for _ in range(len(rows)):
    batch = next(batches)
    for inputs, targets, positions, _ in _segments(batch, 0):
      assert positions.tolist() == list(range(len(inputs)))
      seen.append(tuple(inputs.tolist()) + (int(targets[-1]),))
  assert sorted(seen) == sorted(tuple(ids.tolist()) for ids in examples.tokens)


def test_packed_rows_fewer_than_examples():
  examples = _examples([7] * 24, seq_len=32)
  rows = packing.pack_rows(packing.example_widths(examples), examples.seq_len)
  # Five examples of 6 positions fill 30 of 32 positions per row.
  assert len(rows) == 5
  assert packing.packing_efficiency(examples, rows) == pytest.approx(24 * 6 / (5 * 32))


# Shuffling and resumption.

def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


@pytest.mark.parametrize("pack", [False, True])
def test_batches_deterministic_from_seed(pack):
  examples = _mixed_examples()
  first = _take(data.train_batches(examples, batch_size=3, seed=5, pack=pack), 12)
  again = _take(data.train_batches(examples, batch_size=3, seed=5, pack=pack), 12)
  other = _take(data.train_batches(examples, batch_size=3, seed=6, pack=pack), 12)
  _assert_batches_equal(first, again)
  assert not all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("start_batch", [1, 4, 9, 23])
def test_batches_resume_exactly(pack, start_batch):
  # 29 examples in batches of 3 cross several epoch ends within 30 batches.
  examples = _mixed_examples()
  full = _take(data.train_batches(examples, batch_size=3, seed=2, pack=pack), 30)
  resumed = _take(
      data.train_batches(examples, batch_size=3, seed=2, pack=pack, start_batch=start_batch),
      30 - start_batch,
  )
  _assert_batches_equal(full[start_batch:], resumed)


def test_packed_epochs_reshuffle():
  examples = _mixed_examples()
  rows = packing.epoch_rows_fn(packing.example_widths(examples), seed=1, seq_len=32, pack=True)
  assert rows(0) != rows(1)


def test_packing_efficiency_logged_once(caplog):
  examples = _examples([7] * 24, seq_len=32)
  with caplog.at_level(logging.INFO, logger="jaxlora.train.packing"):
    _take(data.train_batches(examples, batch_size=2, seed=0, pack=True), 8)
  messages = [record.getMessage() for record in caplog.records if "Packed" in record.getMessage()]
  assert messages == [
      "Packed 24 examples into 5 rows of 32 tokens (training, per epoch):"
      " 90.0% of the row positions hold real tokens."
  ]


# Padded widths of unpacked batches.

def test_unpacked_width_rounds_up():
  examples = _examples([10, 20, 70, 65, 150, 191], seq_len=190)
  batches = data.eval_batches(examples, batch_size=2)
  # Widest rows: 19, 69, 190 positions -> 64, 128, and 192 capped at T = 190.
  assert [batch["input_ids"].shape for batch in batches] == [(2, 64), (2, 128), (2, 190)]
  fixed = data.eval_batches(examples, batch_size=2, pad_to_multiple_of=None)
  assert [batch["input_ids"].shape for batch in fixed] == [(2, 190)] * 3
  narrow = data.eval_batches(examples, batch_size=2, pad_to_multiple_of=8)
  assert [batch["input_ids"].shape for batch in narrow] == [(2, 24), (2, 72), (2, 190)]


def test_unpacked_width_same_tokens():
  examples = _mixed_examples(seq_len=40)
  narrow = data.eval_batches(examples, batch_size=4, pad_to_multiple_of=16)
  full = data.eval_batches(examples, batch_size=4, pad_to_multiple_of=None)
  for small, wide in zip(narrow, full):
    width = small["input_ids"].shape[1]
    assert width in (16, 32, 40)
    assert not wide["attention_mask"][:, width:].any()
    for key in small:
      np.testing.assert_array_equal(small[key], wide[key][:, :width], err_msg=key)


def test_error_pad_multiple():
  examples = _mixed_examples()
  with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
    data.eval_batches(examples, batch_size=2, pad_to_multiple_of=0)
  with pytest.raises(ValueError, match="start_batch=-1"):
    data.train_batches(examples, batch_size=2, seed=0, start_batch=-1)


# Loss equality with a tiny model.

@pytest.fixture(scope="module")
def tiny():
  config = LlamaConfig(**TINY_LLAMA)
  params = init_params(config, jax.random.PRNGKey(4))
  return Llama(config), params


def _loss_sum_and_count(eval_fn, params, batches):
  total, count = 0.0, 0.0
  for batch in batches:
    batch_loss, batch_count = jax.device_get(eval_fn(params, batch))
    total += float(batch_loss)
    count += float(batch_count)
  return total, count


def test_packed_loss_equals_unpacked(tiny):
  model, params = tiny
  examples = _mixed_examples(count=17, seq_len=40, seed=8)
  eval_fn = step.make_eval_step(model)

  packed = data.eval_batches(examples, batch_size=3, pack=True)
  unpacked = data.eval_batches(examples, batch_size=3)
  assert len(packed) < len(unpacked)
  packed_sum, packed_count = _loss_sum_and_count(eval_fn, params, packed)
  unpacked_sum, unpacked_count = _loss_sum_and_count(eval_fn, params, unpacked)

  assert packed_count == unpacked_count == examples.scored_token_count()
  np.testing.assert_allclose(packed_sum / packed_count, unpacked_sum / unpacked_count, rtol=0, atol=1e-5)


def test_packed_loss_needs_segments(tiny):
  # The same packed rows without segment ids let later examples attend to
  # earlier ones, which changes the loss; the equality above is not luck.
  model, params = tiny
  examples = _mixed_examples(count=17, seq_len=40, seed=8)
  eval_fn = step.make_eval_step(model)
  packed = data.eval_batches(examples, batch_size=3, pack=True)
  leaked = [{key: value for key, value in batch.items() if key != "segment_ids"} for batch in packed]
  packed_sum, count = _loss_sum_and_count(eval_fn, params, packed)
  leaked_sum, _ = _loss_sum_and_count(eval_fn, params, leaked)
  assert abs(packed_sum - leaked_sum) / count > 1e-4


def test_stack_mixed_widths(tiny):
  model, params = tiny
  examples = _examples([5, 9, 30, 35], seq_len=40)
  batches = data.eval_batches(examples, batch_size=2, pad_to_multiple_of=16)
  assert [batch["input_ids"].shape[1] for batch in batches] == [16, 40]

  stacked = step.stack_micro_batches(batches)
  assert stacked["input_ids"].shape == (2, 2, 40)
  assert not stacked["attention_mask"][0, :, 16:].any()
  assert not stacked["loss_mask"][0, :, 16:].any()

  # Evaluating the padded slice gives what the narrow batch gives.
  eval_fn = step.make_eval_step(model)
  for index, batch in enumerate(batches):
    padded = {key: value[index] for key, value in stacked.items()}
    np.testing.assert_allclose(
        np.asarray(eval_fn(params, padded)), np.asarray(eval_fn(params, batch)), rtol=0, atol=1e-5
    )

  # A training step over both micro-batches reports their token-mean loss.
  loss_sum, count = _loss_sum_and_count(eval_fn, params, batches)
  trainable, frozen = jaxlora.partition(params, trainable_mask=jaxlora.full_mask(params))
  tx = optax.sgd(0.0)
  train_step = step.make_train_step(model, tx, grad_accum_steps=2)
  _, _, metrics = train_step(trainable, frozen, tx.init(trainable), stacked, jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(metrics["loss"]), loss_sum / count, rtol=0, atol=1e-5)

"""Tests of the training loop `fit`, its config and its metrics file."""

import dataclasses
import itertools
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import paths
from jaxlora import train
from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.train import metrics
from tensorboardX.proto import event_pb2

from conftest import SMALL_LLAMA  # pylint: disable=g-bad-import-order

CONFIG = LlamaConfig(**SMALL_LLAMA)
TOKENS = 16
RECORD_FIELDS = {"step", "loss", "grad_norm", "lr", "scored_tokens", "tokens_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def base_params():
  return init_params(CONFIG, jax.random.PRNGKey(0))


def repetitive_batches(rows=4, padding=0):
  """Yield the same batch forever: rows counting up modulo 7 from different starts.

  The last `padding` tokens of each row are padding, neither real nor scored.
  """
  sequences = (np.arange(rows)[:, None] + np.arange(TOKENS + 1)[None, :]) % 7
  attention_mask = np.ones((rows, TOKENS), np.int32)
  if padding:
    attention_mask[:, TOKENS - padding:] = 0
  batch = {
      "input_ids": sequences[:, :-1].astype(np.int32),
      "targets": sequences[:, 1:].astype(np.int32),
      "loss_mask": attention_mask.astype(np.float32),
      "attention_mask": attention_mask,
  }
  return itertools.repeat(batch)


def quiet_config(**fields):
  return train.TrainConfig(progress=False, **fields)


def read_events(path):
  """Return the `Event` protos of a TensorBoard event file, in order.

  The file is a sequence of TFRecords: a little-endian uint64 length, its
  4-byte masked CRC, the serialised Event, and the Event's 4-byte CRC.
  """
  data = path.read_bytes()
  events = []
  offset = 0
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    start = offset + 12
    events.append(event_pb2.Event.FromString(data[start:start + length]))
    offset = start + length + 4
  return events


def scalars(events):
  """Return `{tag: {step: value}}` of the scalar summaries in `events`."""
  out = {}
  for event in events:
    for value in event.summary.value:
      out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def test_fit_loss_falls(base_params):
  # The output head needs an adapter too: the random head's logits are too
  # small for adapters on q and v alone to fit the data in 30 steps.
  params = jaxlora.apply(base_params, rank=4, targets=("q_proj", "v_proj", "lm_head"))
  config = quiet_config(steps=30, learning_rate=3e-2, warmup_steps=2)

  result = train.fit(Llama(CONFIG), params, repetitive_batches(), None, config)

  losses = [record["loss"] for record in result.history]
  assert len(losses) == 30
  assert losses[0] > 3.5
  assert losses[-1] < 0.5 * losses[0]


def test_fit_frozen_leaves_identical(base_params):
  params = jaxlora.apply(base_params, rank=4)
  _, frozen = jaxlora.partition(params)
  frozen_copy = jax.tree.map(np.asarray, frozen)
  a_before = np.asarray(params["model"]["layers"]["self_attn"]["q_proj"]["lora"]["a"])

  result = train.fit(
      Llama(CONFIG), params, repetitive_batches(), None,
      quiet_config(steps=3, learning_rate=1e-2),
  )

  after = dict(paths.iter_leaves(result.params))
  copies = dict(paths.iter_leaves(frozen_copy))
  for path, leaf in paths.iter_leaves(frozen):
    name = paths.module_name(path)
    assert after[path].dtype == leaf.dtype, name
    assert np.array_equal(after[path], copies[path]), name
  # The caller's adapters are still readable and unchanged: fit donated copies.
  np.testing.assert_array_equal(
      params["model"]["layers"]["self_attn"]["q_proj"]["lora"]["a"], a_before
  )
  assert not np.array_equal(
      result.params["model"]["layers"]["self_attn"]["q_proj"]["lora"]["a"], a_before
  )


def test_fit_metrics_file(base_params, tmp_path):
  params = jaxlora.apply(base_params, rank=4)
  path = tmp_path / "run" / "metrics.jsonl"
  eval_batches = [next(repetitive_batches(rows=2))]
  config = quiet_config(steps=5, learning_rate=1e-2, eval_every=2, metrics_path=path)

  result = train.fit(Llama(CONFIG), params, repetitive_batches(), eval_batches, config)

  lines = path.read_text().splitlines()
  assert len(lines) == 5
  records = [json.loads(line) for line in lines]
  assert records == result.history
  assert [record["step"] for record in records] == [1, 2, 3, 4, 5]
  for record in records:
    assert RECORD_FIELDS <= set(record), sorted(RECORD_FIELDS - set(record))
  # Held-out loss at every second step and after the last.
  assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 5]
  assert records[-1]["elapsed_s"] >= records[0]["elapsed_s"] > 0
  assert records[1]["lr"] > 0


def test_fit_tensorboard_scalars(base_params, tmp_path):
  params = jaxlora.apply(base_params, rank=4)
  eval_batches = [next(repetitive_batches(rows=2))]
  config = quiet_config(
      steps=3, learning_rate=1e-2, eval_every=2, tensorboard_dir=tmp_path / "tensorboard"
  )

  result = train.fit(Llama(CONFIG), params, repetitive_batches(), eval_batches, config)

  (event_file,) = (tmp_path / "tensorboard").iterdir()
  found = scalars(read_events(event_file))
  assert sorted(found) == sorted(metrics.TENSORBOARD_SCALARS)
  for name in ("loss", "lr", "grad_norm", "tokens_per_s"):
    expected = {record["step"]: np.float32(record[name]) for record in result.history}
    assert found[name] == expected, name
  assert found["eval_loss"] == {
      record["step"]: np.float32(record["eval_loss"]) for record in result.history if "eval_loss" in record
  }
  assert sorted(found["eval_loss"]) == [2, 3]


def test_tensorboard_writer_purge_step(tmp_path):
  with metrics.TensorBoardWriter(tmp_path, purge_step=5) as board:
    board.write({"step": 5, "loss": 2.5, "scored_tokens": 10.0})

  (event_file,) = tmp_path.iterdir()
  events = read_events(event_file)
  starts = [event.step for event in events if event.HasField("session_log")]
  assert starts == [5]
  assert scalars(events) == {"loss": {5: 2.5}}


def test_tensorboard_writer_none_discards(tmp_path):
  with metrics.TensorBoardWriter(None) as board:
    board.write({"step": 1, "loss": 2.5})
  with pytest.raises(ValueError, match="is not open"):
    metrics.TensorBoardWriter(tmp_path).write({"step": 1, "loss": 2.5})


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines))


def test_truncate_metrics_drops_later_steps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_lines(path, [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 6)])

  kept = metrics.truncate_metrics(path, 3)

  assert kept == [{"step": step, "loss": 1.0 / step} for step in (1, 2, 3)]
  assert train.read_metrics(path) == kept
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_truncate_metrics_cut_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')

  kept = metrics.truncate_metrics(path, 4)

  assert kept == [{"step": 1, "loss": 2.0}]
  assert path.read_text() == '{"step": 1, "loss": 2.0}\n'


def test_truncate_metrics_unchanged_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_lines(path, ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}'])
  inode = path.stat().st_ino

  assert [r["step"] for r in metrics.truncate_metrics(path, 2)] == [1, 2]
  assert path.stat().st_ino == inode
  assert metrics.truncate_metrics(tmp_path / "missing.jsonl", 2) == []
  assert not (tmp_path / "missing.jsonl").exists()


def test_truncate_metrics_bad_middle_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_lines(path, ['{"step": 1}', "not json", '{"step": 3}'])

  with pytest.raises(ValueError, match="Line 2 of .* is not valid JSON"):
    metrics.truncate_metrics(path, 1)
  write_lines(path, ['{"step": 1}', '{"loss": 2.0}'])
  with pytest.raises(ValueError, match="Line 2 of .* is not a metrics record with a step"):
    metrics.truncate_metrics(path, 1)


def test_fit_metrics_file_appends(base_params, tmp_path):
  params = jaxlora.apply(base_params, rank=4)
  path = tmp_path / "metrics.jsonl"
  config = quiet_config(steps=2, learning_rate=1e-2, metrics_path=path)

  train.fit(Llama(CONFIG), params, repetitive_batches(), None, config)
  train.fit(Llama(CONFIG), params, repetitive_batches(), None, config)

  steps = [record["step"] for record in train.read_metrics(path)]
  assert steps == [1, 2, 1, 2]


def test_fit_counts_real_tokens(base_params):
  params = jaxlora.apply(base_params, rank=4)
  config = quiet_config(steps=2, learning_rate=1e-2, grad_accum_steps=3)
  # 4 rows of 16 tokens, the last 5 padding: 44 real tokens per micro-batch.
  batches = repetitive_batches(rows=4, padding=5)
  consumed = []

  def counting(iterator):
    for batch in iterator:
      consumed.append(1)
      yield batch

  result = train.fit(Llama(CONFIG), params, counting(batches), None, config)

  assert len(consumed) == 6
  for record in result.history:
    assert record["scored_tokens"] == 3 * 44
    assert record["tokens_per_s"] > 0


def test_fit_full_mode(base_params):
  result = train.fit(
      Llama(CONFIG), base_params, repetitive_batches(), None,
      quiet_config(steps=2, learning_rate=1e-2, mode="full"),
  )

  after = dict(paths.iter_leaves(result.params))
  for path, leaf in paths.iter_leaves(base_params):
    assert not np.array_equal(after[path], leaf), f"{paths.module_name(path)} did not change"
  moments = dict(paths.iter_leaves(result.opt_state[1][0].mu))
  assert moments.keys() == after.keys()


def test_fit_mask_replaces_mode(base_params):
  params = jaxlora.apply(base_params, rank=4)
  # Train only the final norm: the mask wins over mode="lora".
  mask = paths.map_with_path(lambda path, _: path == ("model", "norm", "scale"), params)

  result = train.fit(
      Llama(CONFIG), params, repetitive_batches(), None,
      quiet_config(steps=1, learning_rate=1e-2), trainable_mask=mask,
  )

  after = dict(paths.iter_leaves(result.params))
  for path, leaf in paths.iter_leaves(params):
    changed = not np.array_equal(after[path], leaf)
    assert changed == (path == ("model", "norm", "scale")), paths.module_name(path)


@pytest.fixture(scope="module")
def lora_reference(base_params):
  """Two float32 LoRA steps: the adapted tree, the config and the result."""
  params = jaxlora.apply(base_params, rank=4)
  config = quiet_config(steps=2, learning_rate=1e-2)
  result = train.fit(Llama(CONFIG), params, repetitive_batches(), None, config)
  return params, config, [record["loss"] for record in result.history]


def test_fit_lora_bfloat16_base(lora_reference):
  params, config, plain_losses = lora_reference

  half = train.fit(
      Llama(CONFIG), params, repetitive_batches(), None,
      dataclasses.replace(config, frozen_dtype="bfloat16"),
  )

  for path, leaf in paths.iter_leaves(half.params):
    name = paths.module_name(path)
    if path[-2] == "lora":
      assert leaf.dtype == jnp.float32, name
    else:
      assert leaf.dtype == jnp.bfloat16, name
  for path, leaf in paths.iter_leaves(half.opt_state[1][0].mu):
    assert jaxlora.is_adapter_weight(path), paths.module_name(path)
    assert leaf.dtype == jnp.float32, paths.module_name(path)
  half_losses = [record["loss"] for record in half.history]
  np.testing.assert_allclose(half_losses, plain_losses, rtol=2e-2)
  assert half_losses != plain_losses


def test_fit_compute_bfloat16(lora_reference):
  params, config, plain_losses = lora_reference

  half = train.fit(
      Llama(CONFIG), params, repetitive_batches(), None,
      dataclasses.replace(config, compute_dtype="bfloat16"),
  )

  half_losses = [record["loss"] for record in half.history]
  np.testing.assert_allclose(half_losses, plain_losses, rtol=2e-2)
  assert half_losses != plain_losses
  # Weights keep their dtype; only the products run in bfloat16.
  assert half.params["model"]["layers"]["self_attn"]["q_proj"]["lora"]["a"].dtype == jnp.float32
  assert half.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.float32


def test_fit_remat_same_losses(lora_reference):
  params, config, plain_losses = lora_reference

  remat = train.fit(
      Llama(CONFIG), params, repetitive_batches(), None,
      dataclasses.replace(config, remat=True, remat_policy="dots_with_no_batch_dims_saveable"),
  )

  np.testing.assert_allclose([r["loss"] for r in remat.history], plain_losses, rtol=1e-5)


def test_fit_checkpoints(base_params, tmp_path):
  params = jaxlora.apply(base_params, rank=4)
  config = quiet_config(
      steps=3, learning_rate=1e-2, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2,
  )

  result = train.fit(Llama(CONFIG), params, repetitive_batches(), None, config)

  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000002", "step_00000003"]
  trainable, _ = jaxlora.partition(result.params)
  step, restored, state = train.checkpoint.restore(
      tmp_path / "ckpt", trainable=trainable, opt_state=result.opt_state
  )
  assert step == 3
  for (path, leaf), (_, saved) in zip(paths.iter_leaves(trainable), paths.iter_leaves(restored)):
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(leaf), paths.module_name(path))
  assert int(state[1][0].count) == 3


def test_fit_without_adapters_raises(base_params):
  with pytest.raises(ValueError, match="no LoRA adapters"):
    train.fit(
        Llama(CONFIG), base_params, repetitive_batches(), None, quiet_config(steps=1)
    )


def test_fit_nan_loss_names_step(base_params):
  params = jaxlora.apply(base_params, rank=4)
  embedding = params["model"]["embed_tokens"]["embedding"]
  params["model"]["embed_tokens"]["embedding"] = embedding.at[3].set(jnp.inf)

  with pytest.raises(FloatingPointError, match=r"diverged at step 1: loss is nan"):
    train.fit(
        Llama(CONFIG), params, repetitive_batches(), None,
        quiet_config(steps=3, learning_rate=1e-2),
    )


def test_fit_huge_learning_rate_raises(base_params):
  params = jaxlora.apply(base_params, rank=4, targets=("q_proj", "v_proj", "lm_head"))
  config = quiet_config(steps=20, learning_rate=1e30, max_grad_norm=None)

  with pytest.raises(FloatingPointError, match=r"diverged at step ([2-9]|1\d|20):"):
    train.fit(Llama(CONFIG), params, repetitive_batches(), None, config)


def test_fit_batches_run_out(base_params):
  params = jaxlora.apply(base_params, rank=4)
  batches = itertools.islice(repetitive_batches(), 3)
  config = quiet_config(steps=2, grad_accum_steps=2)

  with pytest.raises(ValueError, match="ran out at step 2 of 2, after 3 batches"):
    train.fit(Llama(CONFIG), params, batches, None, config)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"steps": 2.5}, "steps must be an integer, got 2.5"),
        ({"steps": 10, "warmup_steps": 11}, "warmup_steps=11 exceeds steps=10"),
        ({"steps": 10, "warmup_steps": -1}, "warmup_steps must be at least 0, got -1"),
        ({"steps": 10, "learning_rate": 0.0}, "learning_rate must be a positive number, got 0.0"),
        ({"steps": 10, "learning_rate": float("inf")}, "learning_rate must be finite"),
        ({"steps": 10, "grad_accum_steps": 0}, "grad_accum_steps must be at least 1, got 0"),
        ({"steps": 10, "min_lr_ratio": 1.5}, r"min_lr_ratio must be in \[0.0, 1.0\], got 1.5"),
        ({"steps": 10, "weight_decay": -0.1}, r"weight_decay must be in \[0.0, inf\], got -0.1"),
        ({"steps": 10, "max_grad_norm": 0.0}, "max_grad_norm must be a positive number"),
        ({"steps": 10, "eval_every": -2}, "eval_every must be at least 0, got -2"),
        ({"steps": 10, "b2": 1.0}, r"b2 must be in \[0, 1\), got 1.0"),
        ({"steps": 1, "mode": "half"}, "mode must be 'lora' or 'full', got 'half'"),
        ({"steps": 1, "compute_dtype": "float16"}, "compute_dtype must be 'float32', 'bfloat16'"),
        ({"steps": 1, "mode": "full", "frozen_dtype": "bfloat16"}, "frozen_dtype='bfloat16' applies to"),
        ({"steps": 1, "remat_policy": "everything"}, "Unknown remat_policy 'everything'"),
        ({"steps": 1, "remat": 1}, "remat must be True, False or None"),
        ({"steps": 1, "mesh": {"model": 2}}, "Unknown mesh axis 'model'"),
        ({"steps": 1, "mesh": {"data": 0}}, "Mesh axis 'data' has size 0"),
        ({"steps": 1, "checkpoint_every": -1}, "checkpoint_every must be at least 0"),
        ({"steps": 1, "keep_checkpoints": -1}, "keep_checkpoints must be at least 0, got -1"),
        ({"steps": 1, "resume": "yes"}, "resume must be True or False, got 'yes'"),
    ],
)
def test_train_config_rejects(fields, message):
  with pytest.raises(ValueError, match=message):
    train.TrainConfig(**fields)


def test_train_config_accepts_edges():
  config = train.TrainConfig(steps=5, warmup_steps=5, min_lr_ratio=0.0, max_grad_norm=None)
  assert config.warmup_steps == config.steps

"""Tests of the parameter table `train.summary.parameter_summary` and its log line in fit."""

import logging
import re

import jax
import jax.numpy as jnp
import pytest

import jaxlora
from jaxlora import paths
from jaxlora import train
from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.train import summary

from conftest import SMALL_LLAMA  # pylint: disable=g-bad-import-order

CONFIG = LlamaConfig(**SMALL_LLAMA)


@pytest.fixture(scope="module")
def lora_params():
  return jaxlora.apply(init_params(CONFIG, jax.random.PRNGKey(0)), rank=4)


def table_rows(text):
  """Return `{module: (parameters, dtype, status, shape)}` of a summary's table rows."""
  rows = {}
  for line in text.splitlines()[1:]:
    cells = re.split(r" {2,}", line)
    if len(cells) == 5:
      rows.setdefault(cells[0], []).append(tuple(cells[1:]))
  return rows


def totals(text):
  """Return `{label: count}` of the Total, Trainable and Frozen lines."""
  out = {}
  for line in text.splitlines():
    match = re.fullmatch(r"(Total|Trainable|Frozen) +([\d,]+)", line)
    if match:
      out[match.group(1)] = int(match.group(2).replace(",", ""))
  return out


def test_summary_lora_rows(lora_params):
  text = summary.parameter_summary(lora_params, trainable_mask=jaxlora.adapter_mask(lora_params))

  rows = table_rows(text)
  assert text.splitlines()[0].split() == ["Module", "Parameters", "Dtype", "Status", "Shape"]
  assert rows["model.layers.self_attn.q_proj"] == [("1,536", "float32", "frozen", "kernel [2, 24, 32]")]
  assert rows["model.layers.self_attn.q_proj.lora"] == [
      ("448", "float32", "trainable", "a [2, 24, 4], b [2, 4, 32]")
  ]
  assert rows["model.layers.self_attn.v_proj.lora"] == [
      ("320", "float32", "trainable", "a [2, 24, 4], b [2, 4, 16]")
  ]
  assert rows["model.embed_tokens"] == [("1,464", "float32", "frozen", "embedding [61, 24]")]
  assert rows["model.norm"] == [("24", "float32", "frozen", "scale [24]")]
  assert "scale [2]" not in text
  assert len(rows) == 14


def test_summary_totals_match_count(lora_params):
  mask = jaxlora.adapter_mask(lora_params)

  text = summary.parameter_summary(lora_params, trainable_mask=mask)

  count = jaxlora.count_parameters(lora_params, trainable_mask=mask)
  assert totals(text) == {
      "Total": count.total,
      "Trainable": count.trainable,
      "Frozen": count.total - count.trainable,
  }
  assert text.splitlines()[-1] == jaxlora.format_trainable_parameters(count)
  row_sum = sum(
      int(cells[0].replace(",", "")) for entries in table_rows(text).values() for cells in entries
  )
  assert row_sum == count.total


def test_summary_full_mask(lora_params):
  text = summary.parameter_summary(lora_params, trainable_mask=jaxlora.full_mask(lora_params))

  statuses = {cells[2] for entries in table_rows(text).values() for cells in entries}
  assert statuses == {"trainable"}
  assert totals(text)["Frozen"] == 0


def test_summary_splits_dtypes_and_status():
  params = {
      "dense": {
          "kernel": jnp.zeros((3, 5), jnp.bfloat16),
          "bias": jnp.zeros((5,), jnp.float32),
          "extra": jnp.zeros((7,), jnp.float32),
      }
  }
  mask = paths.map_with_path(lambda path, _: path[-1] != "extra", params)

  rows = table_rows(summary.parameter_summary(params, trainable_mask=mask))

  assert sorted(rows["dense"]) == [
      ("15", "bfloat16", "trainable", "kernel [3, 5]"),
      ("5", "float32", "trainable", "bias [5]"),
      ("7", "float32", "frozen", "extra [7]"),
  ]


def test_fit_logs_summary_once(lora_params, caplog):
  config = train.TrainConfig(steps=1, progress=False)

  # Empty training batches stop fit at its first batch, after the summary is
  # logged and before anything is compiled.
  with caplog.at_level(logging.INFO, logger="jaxlora.train.loop"):
    with pytest.raises(ValueError, match="ran out at step 1"):
      train.fit(Llama(CONFIG), lora_params, [], None, config)

  messages = [record.getMessage() for record in caplog.records]
  assert sum("trainable params:" in message for message in messages) == 1
  (table,) = [message for message in messages if message.startswith("Parameters:\n")]
  assert table == "Parameters:\n" + summary.parameter_summary(
      lora_params, trainable_mask=jaxlora.adapter_mask(lora_params)
  )

"""Full fine-tuning end to end: train every weight, export, reload with transformers."""

import itertools

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxlora
from jaxlora import models
from jaxlora import paths
from jaxlora import train

STEPS = 12
TOKENS = 16
# The largest logit difference allowed between the JAX model and transformers
# on the exported float32 weights.
LOGIT_ATOL = 1e-4


def repeating_batches(vocab_size, rows=4):
  """Yield one batch forever: rows that count up modulo 11 from different starts."""
  sequences = (np.arange(rows)[:, None] * 3 + np.arange(TOKENS + 1)[None, :]) % 11
  sequences = (sequences * 7) % vocab_size
  batch = {
      "input_ids": sequences[:, :-1].astype(np.int32),
      "targets": sequences[:, 1:].astype(np.int32),
      "loss_mask": np.ones((rows, TOKENS), np.float32),
      "attention_mask": np.ones((rows, TOKENS), np.int32),
  }
  return itertools.repeat(batch)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Load a random transformers Llama, train every weight, and export the result."""
  from conftest import build_hf_llama  # pylint: disable=import-outside-toplevel

  folder = tmp_path_factory.mktemp("full") / "hf"
  build_hf_llama(seed=3).save_pretrained(folder)
  pretrained = models.load(folder)
  before = jax.tree.map(np.asarray, pretrained.params)
  config = train.TrainConfig(
      steps=STEPS, learning_rate=3e-3, warmup_steps=1, mode="full", progress=False,
  )

  result = train.fit(
      models.Llama(pretrained.config), pretrained.params,
      repeating_batches(pretrained.config.vocab_size), None, config,
  )

  merged = jaxlora.merge(result.params)
  export = folder.parent / "export"
  models.save_pretrained(export, pretrained.config, merged)
  return {
      "config": pretrained.config, "before": before, "result": result,
      "merged": merged, "export": export, "source": folder,
  }


def test_full_loss_falls(trained):
  losses = [record["loss"] for record in trained["result"].history]
  assert len(losses) == STEPS
  assert losses[-1] < 0.5 * losses[0], losses


def test_full_every_leaf_changes(trained):
  after = dict(paths.iter_leaves(trained["result"].params))
  for path, leaf in paths.iter_leaves(trained["before"]):
    name = paths.module_name(path)
    assert after[path].dtype == leaf.dtype, name
    assert not np.array_equal(np.asarray(after[path]), leaf), f"{name} did not change"


def test_full_state_for_every_leaf(trained):
  leaves = {path for path, _ in paths.iter_leaves(trained["before"])}
  adam = trained["result"].opt_state[1][0]
  assert {path for path, _ in paths.iter_leaves(adam.mu)} == leaves
  assert {path for path, _ in paths.iter_leaves(adam.nu)} == leaves


def test_merge_is_identity_without_adapters(trained):
  merged = dict(paths.iter_leaves(trained["merged"]))
  params = dict(paths.iter_leaves(trained["result"].params))
  assert merged.keys() == params.keys()
  for path, leaf in params.items():
    np.testing.assert_array_equal(np.asarray(merged[path]), np.asarray(leaf), paths.module_name(path))


def test_export_holds_trained_weights(trained):
  exported = transformers.AutoModelForCausalLM.from_pretrained(trained["export"], dtype=torch.float32)
  source = transformers.AutoModelForCausalLM.from_pretrained(trained["source"], dtype=torch.float32)
  exported_weights = dict(exported.named_parameters())

  assert exported_weights.keys() == dict(source.named_parameters()).keys()
  for name, weight in source.named_parameters():
    assert not torch.equal(exported_weights[name], weight), f"{name} was exported untrained"


def test_export_logits_match_transformers(trained):
  exported = transformers.AutoModelForCausalLM.from_pretrained(trained["export"], dtype=torch.float32)
  exported.eval()
  ids = np.random.default_rng(0).integers(0, trained["config"].vocab_size, size=(2, 13))

  with torch.no_grad():
    expected = exported(torch.tensor(ids)).logits.numpy()
  actual = models.Llama(trained["config"]).apply(
      {"params": jax.device_get(trained["result"].params)}, ids.astype(np.int32)
  )

  np.testing.assert_allclose(np.asarray(actual), expected, atol=LOGIT_ATOL)

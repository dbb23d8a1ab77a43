"""Tests of the mesh, the sharding rules and sharded training.

The runs on 8 fake CPU devices happen in one subprocess (tests/sharded_worker.py),
because the device count is fixed when jax starts; the tests here check the
JSON report it writes. Tolerances against the one-device run: losses within a
relative 1e-5, every parameter within 5e-5 absolute after three AdamW steps at
a learning rate of 1e-2 (different meshes sum in a different order; the
largest difference seen is about 7e-6).
"""

import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import paths
from jaxlora import train
from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.train import mesh as mesh_lib
from jaxlora.train import sharding

WORKER = pathlib.Path(__file__).with_name("sharded_worker.py")
MESHES = ("8,1,1", "1,8,1", "2,2,2", "1,2,4")
MODES = ("full", "lora")
LOSS_RTOL = 1e-5
PARAM_ATOL = 5e-5

# Every width differs: D=24, F=40, H*hd=32, K*hd=16, V=62, L=2.
CONFIG = LlamaConfig(
    vocab_size=62,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
SIZES = {"data": 1, "fsdp": 2, "tensor": 4}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  output = tmp_path_factory.mktemp("sharded") / "report.json"
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  completed = subprocess.run(
      [sys.executable, str(WORKER), str(output)],
      env=env, capture_output=True, text=True, timeout=600, check=False,
  )
  assert completed.returncode == 0, completed.stderr[-4000:]
  return json.loads(output.read_text())


@pytest.fixture(scope="module")
def base_params():
  return init_params(CONFIG, jax.random.PRNGKey(0))


def test_worker_sees_eight_devices(report):
  assert report["device_count"] == 8


@pytest.mark.parametrize("mode", MODES)
def test_reference_changes_every_trainable_leaf(report, mode):
  assert report["modes"][mode]["unchanged"] == []


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("mode", MODES)
def test_mesh_losses_match(report, mode, mesh):
  entry = report["modes"][mode]
  np.testing.assert_allclose(
      entry["meshes"][mesh]["losses"], entry["reference_losses"], rtol=LOSS_RTOL
  )


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("mode", MODES)
def test_mesh_params_match(report, mode, mesh):
  run = report["modes"][mode]["meshes"][mesh]
  assert run["max_param_difference"] <= PARAM_ATOL, run["worst_leaf"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("mode", MODES)
def test_mesh_leaves_placed_by_rule(report, mode, mesh):
  assert report["modes"][mode]["meshes"][mesh]["placement_errors"] == []


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("mode", MODES)
def test_mesh_optimizer_state(report, mode, mesh):
  state = report["modes"][mode]["meshes"][mesh]["state"]

  assert state["outside_trainable"] == []
  assert state["sharding_mismatch"] == []
  # Adam's two moments per trainable leaf and nothing else of a leaf's size.
  assert state["moment_arrays"] == 2 * state["trainable_leaves"]


def test_lora_state_skips_frozen(report):
  full = report["modes"]["full"]["meshes"]["2,2,2"]["state"]
  lora = report["modes"]["lora"]["meshes"]["2,2,2"]["state"]
  # LoRA trains A and B of the 7 adapted kernels; full trains all 12 leaves.
  assert lora["trainable_leaves"] == 14
  assert full["trainable_leaves"] == 12


def test_valid_run_compiles(report):
  case = report["bad_input"]["valid"]
  assert case["error"] is None
  assert case["compiles"] > 0


@pytest.mark.parametrize(
    "case, parts",
    [
        ("mesh_product", ["{'data': 3, 'fsdp': 2, 'tensor': 1}", "uses 6 devices", "there are 8"]),
        ("indivisible", ["lm_head.kernel", "(40, 100)", "rule 7", "size 100", "8 shards", "'tensor'"]),
        ("unknown_axis", ["'model'", "does not exist", "data, fsdp, tensor"]),
        ("unmatched_rule", ["rule 8", "gate", "matches no leaf"]),
        ("batch_rows", ["4 rows", "multiple of 8"]),
    ],
)
def test_bad_input_fails_before_compiling(report, case, parts):
  result = report["bad_input"][case]
  assert result["error"] is not None
  for part in parts:
    assert part in result["error"]
  assert result["compiles"] == 0


def test_mesh_shape_fills_free_axis():
  assert mesh_lib.mesh_shape({"data": 2, "tensor": -1}, 8) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert mesh_lib.mesh_shape(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 2, "fsdp": 2, "tensor": 2}, "uses 8 devices, but there are 1"),
        ({"model": 1}, "Unknown mesh axis 'model'"),
        ({"data": 0}, "has size 0"),
        ({"data": -1, "fsdp": -1}, "2 axes of size -1"),
        ({"data": 2, "fsdp": -1}, "does not divide the 1 devices"),
    ],
)
def test_make_mesh_rejects(sizes, message):
  with pytest.raises(ValueError, match=message):
    train.make_mesh(sizes)


@pytest.mark.parametrize(
    "rules, message",
    [
        ([("a",)], "a rule is a pair"),
        ([("a(", P())], "not a valid regular expression"),
        ([("a", (None, "fsdp"))], "must be a jax.sharding.PartitionSpec"),
        ([("a", P("model"))], "mesh axis 'model', which does not exist"),
        ([("a", P("fsdp", ("data", "fsdp")))], "uses the mesh axis 'fsdp' twice"),
    ],
)
def test_rules_reject_when_built(rules, message):
  with pytest.raises(ValueError, match=message):
    train.ShardingRules(rules)


def test_rules_first_match_wins(base_params):
  rules = train.ShardingRules([
      (r".*kernel", P("fsdp")),
      (r"lm_head\.kernel", P(None, "tensor")),
      (r".*", P()),
  ])

  assert rules.match("lm_head.kernel") == (0, P("fsdp"))
  # Rule 0 takes every kernel, so rule 1 is never reached.
  with pytest.raises(ValueError, match=r"Sharding rule 1 .* matches no leaf"):
    rules.specs(base_params, SIZES)


def test_rules_leaf_without_rule(base_params):
  rules = train.ShardingRules([(r".*kernel", P())])
  with pytest.raises(ValueError, match=r"No sharding rule matches model\.embed_tokens\.embedding \(shape \(62, 24\)\)"):
    rules.specs(base_params, SIZES)


def test_rules_too_many_entries(base_params):
  rules = train.ShardingRules([(r"model\.norm\.scale", P(None, "fsdp")), (r".*", P())])
  with pytest.raises(ValueError, match=r"model\.norm\.scale has shape \(24,\), 1 axes, but rule 0"):
    rules.specs(base_params, SIZES)


def test_rules_indivisible_names_leaf(base_params):
  rules = train.llama_rules(CONFIG)
  # V=62 does not split over tensor=4.
  with pytest.raises(ValueError, match=r"lm_head\.kernel has shape \(24, 62\); rule 7 \(r'lm_head\\\.kernel', P\('fsdp', 'tensor'\)\) splits its axis 1 \(size 62\) into 4 shards"):
    rules.specs(base_params, SIZES)


def test_llama_specs_and_adapters(base_params):
  config = dataclasses.replace(CONFIG, vocab_size=64)
  targets = ("q_proj", "o_proj", "up_proj", "down_proj", "lm_head")
  params = jaxlora.apply(init_params(config, jax.random.PRNGKey(0)), rank=4, targets=targets)

  specs = dict(paths.iter_leaves(train.llama_rules(config).specs(params, SIZES)))

  attention = ("model", "layers", "self_attn")
  mlp = ("model", "layers", "mlp")
  assert specs[attention + ("q_proj", "kernel")] == P(None, "fsdp", "tensor")
  assert specs[attention + ("o_proj", "kernel")] == P(None, "tensor", "fsdp")
  assert specs[mlp + ("up_proj", "kernel")] == P(None, "fsdp", "tensor")
  assert specs[mlp + ("down_proj", "kernel")] == P(None, "tensor", "fsdp")
  assert specs[("model", "embed_tokens", "embedding")] == P("tensor", "fsdp")
  assert specs[("lm_head", "kernel")] == P("fsdp", "tensor")
  assert specs[("model", "norm", "scale")] == P()
  # A takes the kernel's input-axis spec, B its output-axis spec.
  assert specs[attention + ("q_proj", "lora", "a")] == P(None, "fsdp", None)
  assert specs[attention + ("q_proj", "lora", "b")] == P(None, None, "tensor")
  assert specs[attention + ("o_proj", "lora", "a")] == P(None, "tensor", None)
  assert specs[attention + ("o_proj", "lora", "b")] == P(None, None, "fsdp")
  assert specs[("lm_head", "lora", "a")] == P("fsdp", None)
  assert specs[("lm_head", "lora", "b")] == P(None, "tensor")
  assert specs[attention + ("q_proj", "lora", "scale")] == P()


def test_llama_rules_biases_and_tied():
  config = dataclasses.replace(
      CONFIG, attention_bias=True, mlp_bias=True, tie_word_embeddings=True
  )
  params = init_params(config, jax.random.PRNGKey(0))

  specs = dict(paths.iter_leaves(train.llama_rules(config).specs(params, {"data": 1, "fsdp": 2, "tensor": 2})))

  assert ("lm_head", "kernel") not in specs
  assert specs[("model", "layers", "self_attn", "k_proj", "bias")] == P(None, "tensor")
  assert specs[("model", "layers", "self_attn", "o_proj", "bias")] == P()
  assert specs[("model", "layers", "mlp", "gate_proj", "bias")] == P(None, "tensor")


def test_rules_log_each_leaf(base_params, caplog):
  config = dataclasses.replace(CONFIG, vocab_size=64)
  params = init_params(config, jax.random.PRNGKey(0))

  with caplog.at_level(logging.DEBUG, logger="jaxlora.train.sharding"):
    train.llama_rules(config).specs(params, SIZES)

  lines = [record.getMessage() for record in caplog.records]
  assert len(lines) == len(list(paths.iter_leaves(params)))
  assert any(
      line.startswith("model.layers.mlp.down_proj.kernel (2, 40, 24): P(None, 'tensor', 'fsdp') from rule 4 r'model\\.layers\\.mlp\\.down_proj\\.kernel'.")
      for line in lines
  ), lines


def test_optimizer_shardings_follow_params(base_params):
  mesh = train.make_mesh({"data": 1})
  shardings = train.llama_rules(CONFIG).shardings(base_params, mesh)
  tx = train.adamw(lambda count: 1e-3, weight_decay=0.1, max_grad_norm=1.0)

  state = train.optimizer_shardings(tx, base_params, shardings, mesh)

  adam = state[1][0]
  assert adam.mu["lm_head"]["kernel"] is shardings["lm_head"]["kernel"]
  assert adam.nu["model"]["norm"]["scale"] is shardings["model"]["norm"]["scale"]
  assert adam.count.spec == P()


def test_place_copies(base_params):
  mesh = train.make_mesh({"data": 1})
  shardings = train.llama_rules(CONFIG).shardings(base_params, mesh)
  placed = train.place(base_params, shardings)

  leaf = placed["model"]["norm"]["scale"]
  assert leaf is not base_params["model"]["norm"]["scale"]
  assert leaf.sharding == shardings["model"]["norm"]["scale"]
  np.testing.assert_array_equal(leaf, base_params["model"]["norm"]["scale"])


def test_fit_rejects_two_meshes(base_params):
  params = jaxlora.apply(base_params, rank=4)
  config = train.TrainConfig(steps=1, progress=False, mesh={"data": 1})
  with pytest.raises(ValueError, match="pass one of them"):
    train.fit(Llama(CONFIG), params, [], None, config, mesh=train.make_mesh({"data": 1}))

"""Train a tiny Llama on 8 fake CPU devices and print what test_sharding checks, as JSON.

Run as a script, in its own process: the device count is fixed when jax
starts, so the flag is set here before jax is imported.

    python tests/sharded_worker.py OUTPUT.json

For each mode ("full", "lora") it trains three steps on one device, then on
each mesh of `MESHES`, and records the losses, the largest parameter
difference from the one-device run, every leaf whose placement differs from
the rule that should have placed it, and the optimizer state's leaves. It
also records the errors that bad meshes and rules raise, with the number of
compilations that ran before each error.
"""

import os
import sys

# The last two flags cut XLA's compile time, which dominates these tiny runs;
# every run here, the one-device reference included, compiles with them.
os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true"
)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # pylint: disable=wrong-import-position
import logging  # pylint: disable=wrong-import-position
import math  # pylint: disable=wrong-import-position
import re  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

import jaxlora  # pylint: disable=wrong-import-position
from jaxlora import paths  # pylint: disable=wrong-import-position
from jaxlora import train  # pylint: disable=wrong-import-position
from jaxlora.models import Llama, LlamaConfig, init_params  # pylint: disable=wrong-import-position

jax.config.update("jax_default_matmul_precision", "highest")

# Every width differs and every split divides: D=40 (fsdp 8), H*hd=48,
# K*hd=24, F=56 and V=100 (tensor 4), hd=6, L=2.
CONFIG = LlamaConfig(
    vocab_size=100,
    hidden_size=40,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=6,
    max_position_embeddings=32,
)
MESHES = {
    "8,1,1": {"data": 8, "fsdp": 1, "tensor": 1},
    "1,8,1": {"data": 1, "fsdp": 8, "tensor": 1},
    "2,2,2": {"data": 2, "fsdp": 2, "tensor": 2},
    "1,2,4": {"data": 1, "fsdp": 2, "tensor": 4},
}
ROWS, TOKENS, STEPS = 8, 12, 3


def make_batches():
  """Return three `[8, 12]` batches with padding and partly scored rows."""
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    tokens = rng.integers(0, CONFIG.vocab_size, size=(ROWS, TOKENS + 1))
    attention_mask = np.ones((ROWS, TOKENS), np.int32)
    attention_mask[::3, TOKENS - 4:] = 0
    loss_mask = attention_mask.astype(np.float32)
    loss_mask[:, :3] = 0.0
    batches.append({
        "input_ids": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
    })
  return batches


def make_params(mode):
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  if mode == "lora":
    params = jaxlora.apply(params, rank=4, targets="all-linear", rng=jax.random.PRNGKey(1))
  return params


def run(mode, mesh):
  config = train.TrainConfig(
      steps=STEPS, learning_rate=1e-2, warmup_steps=0, mode=mode, progress=False,
  )
  return train.fit(Llama(CONFIG), make_params(mode), make_batches(), None, config, mesh=mesh)


def expected_spec(name, shape, rules, kernel_specs):
  """Return the spec that should place leaf `name`, found here without `specs`."""
  if ".lora." in name:
    module = name.rsplit(".lora.", 1)[0]
    kernel = kernel_specs[module]
    if name.endswith(".scale"):
      return P()
    *lead, s_in, s_out = tuple(kernel) + (None,) * (len(shape) - len(kernel))
    return P(*lead, s_in, None) if name.endswith(".a") else P(*lead, None, s_out)
  for pattern, spec in rules.rules:
    if re.fullmatch(pattern, name):
      return spec
  raise AssertionError(f"no rule for {name}")


def shard_shape(shape, spec, mesh):
  out = list(shape)
  for axis, entry in enumerate(spec):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out[axis] //= math.prod(mesh.shape[n] for n in names)
  return tuple(out)


def placement_errors(params, mesh):
  """List every leaf whose spec or local shard shape differs from its rule's."""
  rules = train.llama_rules(CONFIG)
  leaves = {paths.module_name(path): leaf for path, leaf in paths.iter_leaves(params)}
  kernel_specs = {
      name.rsplit(".", 1)[0]: expected_spec(name, leaf.shape, rules, {})
      for name, leaf in leaves.items() if name.endswith(".kernel")
  }
  errors = []
  for name, leaf in leaves.items():
    spec = expected_spec(name, leaf.shape, rules, kernel_specs)
    actual = tuple(leaf.sharding.spec)
    while actual and actual[-1] is None:
      actual = actual[:-1]
    expected = tuple(spec)
    while expected and expected[-1] is None:
      expected = expected[:-1]
    if actual != expected:
      errors.append(f"{name}: spec {actual} != {expected}")
    local = leaf.addressable_shards[0].data.shape
    if local != shard_shape(leaf.shape, spec, mesh):
      errors.append(f"{name}: shard {local} != {shard_shape(leaf.shape, spec, mesh)}")
  return errors


def state_report(result, mode):
  """Describe the optimizer state: its array leaves by parameter path, with shardings."""
  mask = jaxlora.full_mask if mode == "full" else jaxlora.adapter_mask
  trainable, _ = jaxlora.partition(result.params, trainable_mask=mask(result.params))
  trainable = {path: leaf for path, leaf in paths.iter_leaves(trainable)}
  outside, mismatched, moments = [], [], 0
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(result.opt_state):
    if leaf.ndim == 0:
      continue
    path = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
    if path not in trainable:
      outside.append(paths.module_name(path))
      continue
    moments += 1
    if not leaf.sharding.is_equivalent_to(trainable[path].sharding, leaf.ndim):
      mismatched.append(paths.module_name(path))
  return {
      "trainable_leaves": len(trainable),
      "moment_arrays": moments,
      "outside_trainable": outside,
      "sharding_mismatch": mismatched,
  }


def max_difference(a, b):
  worst, name = 0.0, ""
  b = dict(paths.iter_leaves(b))
  for path, leaf in paths.iter_leaves(a):
    difference = float(np.max(np.abs(np.asarray(leaf, np.float32) - np.asarray(b[path], np.float32))))
    if difference > worst:
      worst, name = difference, paths.module_name(path)
  return worst, name


def changed_leaves(params, mode):
  start = dict(paths.iter_leaves(make_params(mode)))
  mask = dict(paths.iter_leaves(
      jaxlora.full_mask(params) if mode == "full" else jaxlora.adapter_mask(params)
  ))
  return sorted(
      paths.module_name(path) for path, leaf in paths.iter_leaves(params)
      if mask[path] and np.array_equal(np.asarray(leaf), np.asarray(start[path]))
  )


def bad_input_errors():
  """Run each bad input through `fit` and record its message and the compilations before it."""
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _duration, **_: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None
  )
  cases = {
      "valid": dict(config_mesh={"data": 2, "fsdp": 2, "tensor": 2}),
      "mesh_product": dict(config_mesh={"data": 3, "fsdp": 2, "tensor": 1}),
      "indivisible": dict(config_mesh={"data": 1, "fsdp": 1, "tensor": 8}),
      "unknown_axis": dict(rules=[(r"model\.norm\.scale", P("model"))]),
      "unmatched_rule": dict(
          rules=list(train.llama_rules(CONFIG).rules) + [(r"model\.layers\.gate", P())]
      ),
      "batch_rows": dict(config_mesh={"data": 8}, rows=4),
  }
  out = {}
  for name, case in cases.items():
    before = len(compiles)
    try:
      rules = train.ShardingRules(case["rules"]) if "rules" in case else None
      config = train.TrainConfig(
          steps=1, mode="full", progress=False, mesh=case.get("config_mesh"),
      )
      batches = [{k: v[: case.get("rows", ROWS)] for k, v in b.items()} for b in make_batches()]
      train.fit(Llama(CONFIG), make_params("full"), batches, None, config, rules=rules)
      out[name] = {"error": None, "compiles": len(compiles) - before}
    except ValueError as error:
      out[name] = {"error": str(error), "compiles": len(compiles) - before}
  return out


def main(output):
  logging.basicConfig(level=logging.WARNING)
  report = {"device_count": jax.device_count(), "modes": {}}
  for mode in ("full", "lora"):
    reference = run(mode, train.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    entry = {
        "reference_losses": [r["loss"] for r in reference.history],
        "unchanged": changed_leaves(reference.params, mode),
        "meshes": {},
    }
    for label, shape in MESHES.items():
      mesh = train.make_mesh(shape)
      result = run(mode, mesh)
      difference, leaf = max_difference(result.params, reference.params)
      entry["meshes"][label] = {
          "losses": [r["loss"] for r in result.history],
          "max_param_difference": difference,
          "worst_leaf": leaf,
          "placement_errors": placement_errors(result.params, mesh),
          "state": state_report(result, mode),
      }
    report["modes"][mode] = entry
  report["bad_input"] = bad_input_errors()
  with open(output, "w") as file:
    json.dump(report, file, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])

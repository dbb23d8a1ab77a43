"""Tests of multi-process training with jax.distributed on loopback.

Two processes (tests/multihost_worker.py), one CPU device each, train a tiny
Llama with its kernels split between them; this process repeats the run on
one device and compares. Tolerances: losses within a relative 1e-5 and
parameters within 5e-5 absolute, as for the fake-device meshes.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxlora import models
from jaxlora import paths
from jaxlora import train
from jaxlora.train import checkpoint
from jaxlora.train import distributed
from jaxlora.train import mesh as mesh_lib

import multihost_worker  # pylint: disable=wrong-import-order

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
LOSS_RTOL = 1e-5
PARAM_ATOL = 5e-5


def free_port():
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def worker_env():
  env = dict(os.environ)
  # Faster compiles; the one-device run in this process compiles without
  # them, which moves results by far less than the tolerances.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  for variable in (distributed.ADDRESS_VARIABLE, distributed.COUNT_VARIABLE, distributed.INDEX_VARIABLE):
    env.pop(variable, None)
  return env


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
  """Run the two workers; return their output folder."""
  output = tmp_path_factory.mktemp("pair")
  port = free_port()
  workers = [
      subprocess.Popen(
          [sys.executable, str(WORKER), str(index), "2", str(port), str(output)],
          env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for index in range(2)
  ]
  logs = []
  try:
    for worker in workers:
      logs.append(worker.communicate(timeout=300)[0])
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
  for index, worker in enumerate(workers):
    assert worker.returncode == 0, f"process {index}:\n{logs[index][-4000:]}"
  return output


@pytest.fixture(scope="module")
def single_run():
  """Train the same three steps in this process, on one device, with all rows."""
  mesh = train.make_mesh({"data": 1}, devices=jax.devices()[:1])
  eval_batches = train.distributed.process_eval_batches(
      multihost_worker.eval_examples(), mesh, batch_size=2
  )
  config = train.TrainConfig(
      steps=multihost_worker.STEPS, learning_rate=1e-2, mode="full", progress=False,
  )
  params = models.init_params(multihost_worker.CONFIG, jax.random.PRNGKey(0))
  return train.fit(
      models.Llama(multihost_worker.CONFIG), params, multihost_worker.global_batches(),
      eval_batches, config, mesh=mesh,
  )


def test_pair_losses_match_single(pair_run, single_run):
  history = json.loads((pair_run / "history.json").read_text())

  np.testing.assert_allclose(
      [r["loss"] for r in history], [r["loss"] for r in single_run.history], rtol=LOSS_RTOL
  )
  np.testing.assert_allclose(history[-1]["eval_loss"], single_run.history[-1]["eval_loss"], rtol=LOSS_RTOL)
  assert [r["scored_tokens"] for r in history] == [r["scored_tokens"] for r in single_run.history]


def test_pair_params_match_single(pair_run, single_run):
  pair = np.load(pair_run / "result.npz")

  for path, leaf in paths.iter_leaves(single_run.params):
    name = paths.module_name(path)
    np.testing.assert_allclose(pair[name], np.asarray(leaf), atol=PARAM_ATOL, err_msg=name)


def test_pair_processes_feed_own_rows(pair_run):
  reports = [json.loads((pair_run / f"process_{i}.json").read_text()) for i in range(2)]

  assert sorted(report["slot"] for report in reports) == [0, 1]
  assert {report["slot_count"] for report in reports} == {2}
  # Five held-out examples, batches of 2 rows, 1 per process: 3 batches each,
  # the last of process 1 is filler.
  assert [report["eval_batches"] for report in reports] == [3, 3]
  assert sum(sum(report["eval_rows"]) for report in reports) == 5


def test_pair_checkpoint_restores_single(pair_run):
  pair = np.load(pair_run / "result.npz")
  mesh = train.make_mesh({"data": 1}, devices=jax.devices()[:1])
  params = models.init_params(multihost_worker.CONFIG, jax.random.PRNGKey(1))
  shardings = train.llama_rules(multihost_worker.CONFIG).shardings(params, mesh)
  trainable = train.place(params, shardings)
  tx = train.adamw(lambda count: 1e-2, weight_decay=0.0, max_grad_norm=1.0)
  opt_state = jax.jit(
      tx.init, out_shardings=train.optimizer_shardings(tx, trainable, shardings, mesh)
  )(trainable)

  step, restored, restored_state = checkpoint.restore(
      pair_run / "checkpoints", trainable=trainable, opt_state=opt_state
  )

  assert step == multihost_worker.STEPS
  assert checkpoint.latest_step(pair_run / "checkpoints") == multihost_worker.STEPS
  for path, leaf in paths.iter_leaves(restored):
    name = paths.module_name(path)
    assert leaf.sharding == dict(paths.iter_leaves(shardings))[path], name
    np.testing.assert_array_equal(np.asarray(leaf), pair[name], err_msg=name)
  assert int(restored_state[1][0].count) == multihost_worker.STEPS
  mu = restored_state[1][0].mu["lm_head"]["kernel"]
  assert float(np.abs(np.asarray(mu)).max()) > 0


def test_pair_writes_each_file_once(pair_run):
  names = sorted(path.name for path in pair_run.iterdir())
  assert names == [
      "checkpoints", "export", "history.json", "process_0.json", "process_1.json", "result.npz",
  ]
  assert [path.name for path in (pair_run / "checkpoints").iterdir()] == ["step_00000003"]


def test_pair_export_loads_in_transformers(pair_run):
  pair = np.load(pair_run / "result.npz")
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      pair_run / "export", dtype=torch.float32
  )
  ids = np.arange(9, dtype=np.int64)[None] % multihost_worker.CONFIG.vocab_size

  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  params = paths.map_with_path(
      lambda path, _: pair[paths.module_name(path)],
      models.init_params(multihost_worker.CONFIG, jax.random.PRNGKey(0)),
  )
  actual = models.Llama(multihost_worker.CONFIG).apply({"params": params}, ids.astype(np.int32))

  np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-4)


def test_unreachable_coordinator_times_out():
  port = free_port()
  code = (
      "from jaxlora.train import distributed\n"
      f"distributed.initialize('127.0.0.1:{port}', 2, 1, timeout_s=3)\n"
  )
  start = time.monotonic()

  completed = subprocess.run(
      [sys.executable, "-c", code], env=worker_env(), capture_output=True,
      text=True, timeout=60, check=False,
  )

  elapsed = time.monotonic() - start
  assert completed.returncode == 1
  assert "TimeoutError: Timed out after 3 s" in completed.stderr
  assert f"coordinator at 127.0.0.1:{port}" in completed.stderr
  assert elapsed < 30


def test_initialize_single_process(monkeypatch):
  for variable in (distributed.ADDRESS_VARIABLE, distributed.COUNT_VARIABLE, distributed.INDEX_VARIABLE):
    monkeypatch.delenv(variable, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize("127.0.0.1:1234", 1, 0) is False


@pytest.mark.parametrize(
    "arguments, environment, message",
    [
        (("127.0.0.1:1234", 2, None), {}, r"process_id \(JAX_PROCESS_ID\) not set"),
        ((None, None, 1), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "num_processes .* not set"),
        (("127.0.0.1", 2, 1), {}, "'127.0.0.1' is not host:port"),
        (("127.0.0.1:99999", 2, 1), {}, "is not host:port"),
        (("127.0.0.1:1234", 2, 2), {}, r"process_id 2 is outside \[0, 1\]"),
        ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                              "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ],
)
def test_initialize_rejects(monkeypatch, arguments, environment, message):
  for variable in (distributed.ADDRESS_VARIABLE, distributed.COUNT_VARIABLE, distributed.INDEX_VARIABLE):
    monkeypatch.delenv(variable, raising=False)
  for variable, value in environment.items():
    monkeypatch.setenv(variable, value)

  with pytest.raises(ValueError, match=message):
    distributed.initialize(*arguments)


def test_initialize_port_in_use():
  with socket.socket() as busy:
    busy.bind(("", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(ValueError, match=f"cannot listen on port {port}"):
      distributed.initialize(f"127.0.0.1:{port}", 2, 0)


def test_process_batches_single_process():
  mesh = train.make_mesh({"data": 1})
  examples = multihost_worker.eval_examples()

  assert mesh_lib.process_batch_slot(mesh) == (0, 1)
  batches = distributed.process_eval_batches(examples, mesh, batch_size=2)
  assert len(batches) == 3
  assert batches[0]["input_ids"].shape == (2, multihost_worker.TOKENS)
  first = next(distributed.process_train_batches(examples, mesh, batch_size=2, seed=0))
  assert first["input_ids"].shape == (2, multihost_worker.TOKENS)

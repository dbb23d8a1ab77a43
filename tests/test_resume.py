"""Tests of checkpointed runs: exact resume, mismatched settings, kills and NaN stops."""

import dataclasses
import functools
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxlora
from jaxlora import paths
from jaxlora import train
from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.train import checkpoint

import resume_worker  # pylint: disable=g-bad-import-order
from conftest import SMALL_LLAMA  # pylint: disable=g-bad-import-order
from test_train_loop import read_events  # pylint: disable=g-bad-import-order

CONFIG = LlamaConfig(**SMALL_LLAMA)
MODEL_INFO = CONFIG.to_hf()
LORA = jaxlora.LoraConfig(
    rank=4,
    alpha=6.0,
    targets=("q_proj", "v_proj", "lm_head"),
    use_rslora=True,
    rank_pattern={"layers.1.self_attn.q_proj": 2},
    alpha_pattern={"v_proj": 3.0},
)
ROWS, TOKENS = 3, 10
WORKER = Path(__file__).with_name("resume_worker.py")
# Faster XLA compilation for the worker processes. Every run of a comparison
# uses the same flags, so their numbers stay comparable bit for bit.
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
WORKER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def base_params():
  return init_params(CONFIG, jax.random.PRNGKey(0))


def batch_at(index):
  """Return training batch `index`: random tokens, a few padded tokens per row."""
  rng = np.random.default_rng(500 + index)
  tokens = rng.integers(0, CONFIG.vocab_size, size=(ROWS, TOKENS + 1))
  attention_mask = (np.arange(TOKENS)[None, :] < TOKENS - np.arange(ROWS)[:, None]).astype(np.int32)
  return {
      "input_ids": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "loss_mask": attention_mask.astype(np.float32),
      "attention_mask": attention_mask,
  }


def batches_from(start, *, interrupt_at=None, nan_at=None):
  """Yield batches `start, start + 1, ...`.

  Asking for batch `interrupt_at` raises KeyboardInterrupt, as Ctrl-C would;
  batch `nan_at` has a NaN loss mask, which makes its step's loss NaN.
  """
  for index in itertools.count(start):
    if index == interrupt_at:
      raise KeyboardInterrupt
    batch = batch_at(index)
    if index == nan_at:
      batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
    yield batch


def run_config(folder, **fields):
  settings = {
      "steps": 6,
      "learning_rate": 1e-2,
      "warmup_steps": 1,
      "checkpoint_every": 2,
      "checkpoint_dir": folder / "checkpoints",
      "metrics_path": folder / "metrics.jsonl",
      "progress": False,
  }
  settings.update(fields)
  return train.TrainConfig(**settings)


def losses(history):
  return [record["loss"] for record in history]


def test_resume_same_losses(base_params, tmp_path):
  params = jaxlora.apply(base_params, LORA)
  model = Llama(CONFIG, lora_dropout=0.1)
  # Two micro-batches per step: step 6 takes batches 10 and 11.
  whole = train.fit(
      model, params, batches_from, None, run_config(tmp_path / "whole", grad_accum_steps=2),
      lora_config=LORA, model_info=MODEL_INFO,
  )
  config = run_config(tmp_path / "run", grad_accum_steps=2, tensorboard_dir=tmp_path / "tensorboard")

  with pytest.raises(KeyboardInterrupt):
    train.fit(
        model, params, functools.partial(batches_from, interrupt_at=10), None, config,
        lora_config=LORA, model_info=MODEL_INFO,
    )
  assert checkpoint.saved_steps(config.checkpoint_dir) == [2, 4]
  assert [r["step"] for r in train.read_metrics(config.metrics_path)] == [1, 2, 3, 4, 5]
  resumed = train.fit(
      model, params, batches_from, None, config, lora_config=LORA, model_info=MODEL_INFO,
  )

  assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
  assert losses(resumed.history) == losses(whole.history)
  assert [r["grad_norm"] for r in resumed.history] == [r["grad_norm"] for r in whole.history]
  records = train.read_metrics(config.metrics_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert losses(records) == losses(whole.history)
  resumed_leaves = dict(paths.iter_leaves(resumed.params))
  for path, leaf in paths.iter_leaves(whole.params):
    assert np.array_equal(resumed_leaves[path], leaf), paths.module_name(path)
  assert int(resumed.opt_state[1][0].count) == 6
  assert checkpoint.saved_steps(config.checkpoint_dir) == [2, 4, 6]

  # Each event file starts with a purge event at its first step, so
  # TensorBoard hides the interrupted process's events from step 5 on.
  runs = [read_events(path) for path in (tmp_path / "tensorboard").iterdir()]
  purges = [[event.step for event in events if event.HasField("session_log")] for events in runs]
  assert sorted(purges) == [[1], [5]]
  steps = [sorted({event.step for event in events if event.summary.value}) for events in runs]
  assert sorted(steps) == [[1, 2, 3, 4, 5], [5, 6]]


@pytest.fixture(scope="module")
def saved_run(base_params, tmp_path_factory):
  """A finished two-step LoRA run: its folder, adapted tree and config."""
  folder = tmp_path_factory.mktemp("saved_run")
  params = jaxlora.apply(base_params, LORA)
  config = run_config(folder, steps=2)
  result = train.fit(Llama(CONFIG), params, batches_from, None, config, lora_config=LORA, model_info=MODEL_INFO)
  return folder, params, config, result


def test_checkpoint_holds_adapters_only(saved_run):
  folder, params, config, _ = saved_run
  path = checkpoint.step_path(config.checkpoint_dir, 2)

  trainable = ocp.StandardCheckpointer().metadata(path / "trainable").item_metadata
  opt_state = ocp.StandardCheckpointer().metadata(path / "opt_state").item_metadata

  adapters = {paths.module_name(p) for p, _ in paths.iter_leaves(params) if jaxlora.is_adapter_weight(p)}
  assert {leaf.name for leaf in jax.tree.leaves(trainable)} == adapters
  for leaf in jax.tree.leaves(opt_state):
    # Names such as 1.0.mu.lm_head.lora.a: the Adam moments of the adapters, and counts.
    moment = re.fullmatch(r"[\d.]*(?:mu|nu)\.(.+)", leaf.name)
    assert leaf.name.endswith("count") or (moment and moment.group(1) in adapters), leaf.name
  metadata = checkpoint.read_metadata(config.checkpoint_dir)
  assert set(metadata["tree"]) == adapters
  assert metadata["mode"] == "lora"
  assert metadata["model_info"] == json.loads(json.dumps(MODEL_INFO))
  assert metadata["step"] == 2
  assert metadata["batches"] == 2
  assert metadata["rng"] == np.asarray(jax.random.PRNGKey(0)).tolist()
  assert sorted(child.name for child in folder.iterdir()) == ["checkpoints", "metrics.jsonl"]


def test_checkpoint_keeps_lora_patterns(saved_run):
  _, params, config, _ = saved_run

  metadata = checkpoint.read_metadata(config.checkpoint_dir)

  saved = jaxlora.LoraConfig.from_dict(metadata["lora_config"])
  assert saved == LORA
  assert saved.use_rslora
  assert saved.rank_for("model.layers.1.self_attn.q_proj") == 2
  assert saved.alpha_for("model.layers.0.self_attn.v_proj") == 3.0
  # q_proj's adapter is as wide as its largest rank, 4, and layer 1 uses 2 of them.
  assert metadata["tree"]["model.layers.self_attn.q_proj.lora.a"] == "float32[2,24,4]"
  _, restored, _ = checkpoint.restore(config.checkpoint_dir, trainable=jaxlora.partition(params)[0])
  a = np.asarray(restored["model"]["layers"]["self_attn"]["q_proj"]["lora"]["a"])
  assert np.all(a[1, :, 2:] == 0)
  assert np.any(a[0, :, 2:] != 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"lora_config": dataclasses.replace(LORA, use_rslora=False)},
            r"\(1 differences\)\. lora_config\.use_rslora: checkpoint true, this run false\.",
        ),
        (
            {"lora_config": dataclasses.replace(LORA, rank_pattern={})},
            r'lora_config\.rank_pattern: checkpoint \{"layers\.1\.self_attn\.q_proj": 2\}, this run \{\}',
        ),
        (
            {"model_info": {**MODEL_INFO, "rope_theta": 20000.0}},
            r"model_info\.rope_theta: checkpoint 10000\.0, this run 20000\.0",
        ),
        (
            {"model_info": None},
            r"model_info: checkpoint <absent>, this run null; model_info\.architectures:",
        ),
        (
            {"mode": "full"},
            r'mode: checkpoint "lora", this run "full"; tree\.lm_head\.kernel: checkpoint <absent>,'
            r' this run "float32\[24,61\]";.*; and \d+ more',
        ),
        (
            {"norm_trains": True},
            r'\(1 differences\)\. tree\.model\.norm\.scale: checkpoint <absent>, this run "float32\[24\]"',
        ),
    ],
)
def test_resume_other_settings_raises(saved_run, change, message):
  folder, params, config, _ = saved_run
  change = dict(change)
  lora_config = change.pop("lora_config", LORA)
  model_info = change.pop("model_info", MODEL_INFO)
  mask = None
  if change.pop("norm_trains", False):
    mask = paths.map_with_path(
        lambda path, _: jaxlora.is_adapter_weight(path) or path == ("model", "norm", "scale"), params
    )
  config = dataclasses.replace(config, **change)

  with pytest.raises(ValueError, match="Cannot resume from .*step_00000002: it was saved by a run with other settings") as error:
    train.fit(
        Llama(CONFIG), params, batches_from, None, config,
        trainable_mask=mask, lora_config=lora_config, model_info=model_info,
    )
  assert error.match(message)
  assert checkpoint.saved_steps(config.checkpoint_dir) == [2]
  assert [r["step"] for r in train.read_metrics(folder / "metrics.jsonl")] == [1, 2]


def test_resume_iterable_raises(saved_run):
  _, params, config, _ = saved_run
  batches = itertools.repeat(batch_at(0))

  with pytest.raises(ValueError, match="needs the training batches from batch 2 on, but train_batches is a repeat"):
    train.fit(
        Llama(CONFIG), params, batches, None, dataclasses.replace(config, steps=4),
        lora_config=LORA, model_info=MODEL_INFO,
    )


def test_resume_false_raises(saved_run):
  _, params, config, _ = saved_run

  with pytest.raises(ValueError, match="already contains a checkpoint of step 2, and resume=False"):
    train.fit(
        Llama(CONFIG), params, batches_from, None, dataclasses.replace(config, resume=False),
        lora_config=LORA, model_info=MODEL_INFO,
    )


def test_resume_past_steps_raises(saved_run):
  _, params, config, _ = saved_run

  with pytest.raises(ValueError, match="is at step 2, past steps=1"):
    train.fit(
        Llama(CONFIG), params, batches_from, None, dataclasses.replace(config, steps=1),
        lora_config=LORA, model_info=MODEL_INFO,
    )


def test_resume_finished_run_returns(saved_run):
  _, params, config, first = saved_run

  def no_batches(start):
    raise AssertionError(f"a finished run asked for batches from {start}")

  again = train.fit(
      Llama(CONFIG), params, no_batches, None, config, lora_config=LORA, model_info=MODEL_INFO,
  )

  assert again.history == first.history
  again_leaves = dict(paths.iter_leaves(again.params))
  for path, leaf in paths.iter_leaves(first.params):
    assert np.array_equal(again_leaves[path], leaf), paths.module_name(path)
  assert int(again.opt_state[1][0].count) == 2


def test_nan_loss_keeps_last_checkpoint(base_params, tmp_path):
  params = jaxlora.apply(base_params, LORA)
  config = run_config(tmp_path)

  with pytest.raises(FloatingPointError, match="diverged at step 5: loss is nan"):
    train.fit(
        Llama(CONFIG), params, functools.partial(batches_from, nan_at=4), None, config,
        lora_config=LORA, model_info=MODEL_INFO,
    )

  assert sorted(p.name for p in config.checkpoint_dir.iterdir()) == ["step_00000002", "step_00000004"]
  assert [r["step"] for r in train.read_metrics(config.metrics_path)] == [1, 2, 3, 4]
  trainable, _ = jaxlora.partition(params)
  step, restored, _ = checkpoint.restore(config.checkpoint_dir, trainable=trainable)
  assert step == 4
  for path, leaf in paths.iter_leaves(restored):
    assert np.all(np.isfinite(np.asarray(leaf))), paths.module_name(path)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_infinite_parameters_not_saved(base_params, tmp_path):
  params = jaxlora.apply(base_params, LORA)
  # 1e39 overflows float32: the first update makes the adapters infinite or
  # NaN while the step's own loss, taken before the update, is finite.
  # The step's record carries an infinite lr, which a JSON metrics file cannot store.
  config = run_config(
      tmp_path, learning_rate=1e39, warmup_steps=0, checkpoint_every=1, metrics_path=None
  )

  with pytest.raises(FloatingPointError, match=r"diverged at step 1: the parameters after the step contain NaN or infinite values \(lm_head\.lora\.a, "):
    train.fit(Llama(CONFIG), params, batches_from, None, config, lora_config=LORA)

  assert not config.checkpoint_dir.exists() or not list(config.checkpoint_dir.iterdir())


def worker_env(**pause):
  env = {key: value for key, value in os.environ.items() if not key.startswith("RESUME_WORKER_")}
  env.update(
      XLA_FLAGS=FAST_XLA_FLAGS, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
      **pause,
  )
  return env


def start_worker(output, **pause):
  """Start `resume_worker.py OUTPUT` with its stdout and stderr in OUTPUT/log_<n>.txt."""
  output.mkdir(exist_ok=True)
  log = output / f"log_{len(list(output.glob('log_*.txt')))}.txt"
  with open(log, "w", encoding="utf-8") as file:
    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(output)], env=worker_env(**pause),
        stdout=file, stderr=subprocess.STDOUT,
    )
  process.log = log
  return process


def run_worker(output):
  """Run the worker to its end and return the history it wrote."""
  process = start_worker(output)
  code = process.wait(timeout=WORKER_TIMEOUT_S)
  assert code == 0, process.log.read_text()[-3000:]
  return json.loads((output / "history.json").read_text())


def kill_when_paused(process, output):
  """Wait until the worker writes its pause marker, then SIGKILL it."""
  deadline = time.monotonic() + WORKER_TIMEOUT_S
  while not os.path.exists(resume_worker.marker(output)):
    assert process.poll() is None, process.log.read_text()[-3000:]
    assert time.monotonic() < deadline, "the worker did not pause in time"
    time.sleep(0.1)
  process.send_signal(signal.SIGKILL)
  assert process.wait(timeout=60) == -signal.SIGKILL
  os.remove(resume_worker.marker(output))


@pytest.fixture(scope="module")
def reference_history(tmp_path_factory):
  """The records of an uninterrupted worker run."""
  return run_worker(tmp_path_factory.mktemp("reference"))


def test_kill_mid_training_resumes(reference_history, tmp_path):
  folder = tmp_path / "checkpoints"
  # Batch 5 is step 6's: steps 1 to 5 ran and the checkpoint of step 4 is the latest.
  kill_when_paused(start_worker(tmp_path, RESUME_WORKER_PAUSE_AT_BATCH="5"), tmp_path)
  assert checkpoint.saved_steps(folder) == [2, 4]
  assert [r["step"] for r in train.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]

  history = run_worker(tmp_path)

  assert losses(history) == losses(reference_history)
  assert history[-1]["loss"] == reference_history[-1]["loss"]
  records = train.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, resume_worker.STEPS + 1))
  assert losses(records) == losses(reference_history)
  assert checkpoint.saved_steps(folder) == [4, 6]


def test_kill_during_save_keeps_previous(reference_history, tmp_path):
  folder = tmp_path / "checkpoints"
  kill_when_paused(start_worker(tmp_path, RESUME_WORKER_PAUSE_IN_SAVE="4"), tmp_path)
  assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004.partial"]
  assert checkpoint.latest_step(folder) == 2
  assert checkpoint.read_metadata(folder)["batches"] == 2

  history = run_worker(tmp_path)

  assert losses(history) == losses(reference_history)
  assert "Removing" in (tmp_path / "log_1.txt").read_text()
  assert sorted(p.name for p in folder.iterdir()) == ["step_00000004", "step_00000006"]
  records = train.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(1, resume_worker.STEPS + 1))

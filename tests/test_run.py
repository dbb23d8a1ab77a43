"""Tests for one training run from a config: files written, exports, checkpoints, resume."""

import json
import os

import jax
import numpy as np
import pytest
import tokenizers
import transformers
import yaml

import jaxlora
from conftest import TINY_LLAMA, build_hf_llama
from jaxlora import models, paths
from jaxlora.train import metrics, plot, run
from jaxlora.train.config import load_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["w5 w6 w7", "w20 w21 w22"]


def word_tokenizer():
  """Return a word-level tokenizer over TINY_LLAMA's 97 ids, without a chat template."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"w{i}": i for i in range(3, TINY_LLAMA["vocab_size"])})
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
  )


def write_job(root, seed=0, **model_overrides):
  """Write a tiny random Llama folder with a tokenizer, a Q/A JSONL and a config; return the config path.

  The pairs count up, "w5 w6 w7" -> "w8 w9", so a few steps lower the loss.
  """
  root.mkdir(parents=True, exist_ok=True)
  build_hf_llama(seed=seed, **model_overrides).save_pretrained(root / "model")
  word_tokenizer().save_pretrained(root / "model")
  with open(root / "pairs.jsonl", "w", encoding="utf-8") as file:
    for start in range(3, 43):
      words = [f"w{start + i}" for i in range(5)]
      file.write(json.dumps({"prompt": " ".join(words[:3]), "completion": " ".join(words[3:])}) + "\n")

  config = {
      "model": {"path": str(root / "model")},
      "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
      "data": {"train_file": str(root / "pairs.jsonl"), "eval_fraction": 0.2, "seq_len": 16, "batch_size": 4},
      "train": {
          "steps": 4, "learning_rate": 1e-2, "warmup_steps": 1, "eval_every": 2,
          "checkpoint_every": 2, "keep_checkpoints": 0,
      },
      "output": {"dir": str(root / "run"), "export": "both", "prompts": PROMPTS, "max_new_tokens": 3},
  }
  path = root / "job.yaml"
  path.write_text(yaml.safe_dump(config))
  return str(path)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  return write_job(tmp_path_factory.mktemp("job"))


@pytest.fixture(scope="module")
def lora_run(job):
  return run.train(load_config(job))


def _leaves(tree):
  return {paths.module_name(path): np.asarray(leaf) for path, leaf in paths.iter_leaves(jax.device_get(tree))}


def _assert_trees_equal(actual, expected, atol=0.0):
  actual, expected = _leaves(actual), _leaves(expected)
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(actual[key], value, atol=atol, rtol=0, err_msg=key)


def test_run_writes_files(lora_run):
  folder = lora_run.paths.dir
  assert sorted(os.listdir(folder)) == [
      "adapter", "checkpoints", "config.yaml", "loss.png", "merged",
      "metrics.jsonl", "summary.json", "tensorboard",
  ]
  assert sorted(os.listdir(lora_run.paths.checkpoints)) == ["step_00000002", "step_00000004"]
  assert lora_run.paths.plot.read_bytes().startswith(PNG_SIGNATURE)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(lora_run.paths.tensorboard))


def test_run_saves_resolved_config(lora_run, job):
  assert load_config(lora_run.paths.config) == load_config(job)


def test_run_history_from_metrics(lora_run):
  assert [record["step"] for record in lora_run.history] == [1, 2, 3, 4]
  assert lora_run.history == metrics.read_metrics(lora_run.paths.metrics)
  assert [r["step"] for r in lora_run.history if "eval_loss" in r] == [2, 4]
  assert lora_run.eval_loss_after == lora_run.history[-1]["eval_loss"]
  assert lora_run.eval_loss_after < lora_run.eval_loss_before


def test_run_summary(lora_run):
  summary = json.loads(lora_run.paths.summary.read_text())
  assert summary["steps"] == 4
  assert summary["eval_loss_before"] == lora_run.eval_loss_before
  assert summary["eval_loss_after"] == lora_run.eval_loss_after
  assert summary["resumed_from"] is None
  assert [item["prompt"] for item in summary["answers"]] == PROMPTS
  assert summary["exports"] == {"merged": str(lora_run.paths.merged), "adapter": str(lora_run.paths.adapter)}


def test_run_answers_prompts(lora_run):
  assert [prompt for prompt, _ in lora_run.answers] == PROMPTS
  assert all(isinstance(answer, str) for _, answer in lora_run.answers)


def test_merged_export_equals_merge(lora_run):
  merged = models.load(lora_run.paths.merged)
  _assert_trees_equal(merged.params, jaxlora.merge(lora_run.params), atol=1e-6)
  assert merged.tokenizer("w5 w6")["input_ids"] == [5, 6]


def test_adapter_export_loads(lora_run, job):
  base = models.load(load_config(job).model.path)
  adapter = models.load_peft_adapter(lora_run.paths.adapter, base.config, base.params)
  _assert_trees_equal(adapter.params, lora_run.params)
  assert adapter.lora_config.rank == 4


def test_checkpoint_restores_final_params(lora_run, job):
  trained = run.load_trained(load_config(job).model.path, checkpoint=lora_run.paths.checkpoints)
  _assert_trees_equal(trained.params, lora_run.params)
  assert trained.lora_config == load_config(job).lora.to_lora_config()


def test_step_folder_restores_that_step(lora_run, job):
  step_2 = lora_run.paths.checkpoints / "step_00000002"
  trained = run.load_trained(load_config(job).model.path, adapter=step_2)
  restored = _leaves(trained.params)
  final = _leaves(lora_run.params)
  key = "model.layers.self_attn.q_proj.lora.b"
  assert not np.array_equal(restored[key], final[key])


def test_checkpoint_on_other_model_raises(lora_run, tmp_path):
  other = write_job(tmp_path, intermediate_size=88)
  with pytest.raises(ValueError, match="model_info.intermediate_size: checkpoint 80, this run 88"):
    run.load_trained(load_config(other).model.path, checkpoint=lora_run.paths.checkpoints)


def test_missing_adapter_folder_raises(job, tmp_path):
  with pytest.raises(ValueError, match="not found"):
    run.load_trained(load_config(job).model.path, adapter=tmp_path / "absent")


def test_folder_without_checkpoint_raises(job, tmp_path):
  with pytest.raises(ValueError, match="neither a peft adapter folder"):
    run.load_trained(load_config(job).model.path, adapter=tmp_path)


def test_existing_checkpoints_need_resume(lora_run, job):
  config = load_config(job, ["train.resume=false"])
  with pytest.raises(ValueError, match="already contains checkpoints .* and train.resume is false"):
    run.train(config)


def test_resume_with_other_config_raises(lora_run, job):
  config = load_config(job, ["data.seed=3", "lora.rank=2"])
  with pytest.raises(ValueError, match=r"data\.seed: 0 before, 3 now; lora\.rank: 4 before, 2 now") as raised:
    run.train(config)
  assert "train.steps" not in str(raised.value)


def test_finished_run_resumes_to_same_result(lora_run, job):
  again = run.train(load_config(job, ["output.prompts=[]", "output.export=none"]))
  assert again.resumed_from == 4
  assert again.history == lora_run.history
  _assert_trees_equal(again.params, lora_run.params)


def test_full_mode_run(tmp_path):
  config_path = write_job(tmp_path)
  stale = tmp_path / "run" / "metrics.jsonl"
  stale.parent.mkdir()
  stale.write_text('{"step": 99, "loss": 1.0}\n')
  config = load_config(config_path, [
      "train.mode=full", "train.steps=2", "train.learning_rate=1e-3",
      "output.export=merged", "output.prompts=[]", "output.tensorboard=false",
  ])

  result = run.train(config)

  assert [record["step"] for record in result.history] == [1, 2]
  assert not result.paths.tensorboard.exists()
  assert not result.paths.adapter.exists()
  _assert_trees_equal(models.load(result.paths.merged).params, result.params, atol=0.0)
  trained = run.load_trained(config.model.path, checkpoint=result.paths.checkpoints)
  assert trained.lora_config is None
  _assert_trees_equal(trained.params, result.params)


def test_plot_losses_writes_png(tmp_path):
  history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.7}]
  path = tmp_path / "curve" / "loss.png"
  plot.plot_losses(history, path, eval_loss_before=3.1, title="test")
  assert path.read_bytes().startswith(PNG_SIGNATURE)
  assert os.listdir(path.parent) == ["loss.png"]

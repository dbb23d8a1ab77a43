"""Tests for reading, overriding and checking run configs."""

import dataclasses
import os

import pytest
import yaml

from jaxlora.train import config as config_lib
from jaxlora.train.config import ConfigError, load_config

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "configs")


def _write(tmp_path, text, name="run.yaml"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _problems(path, overrides=()):
  with pytest.raises(ConfigError) as raised:
    load_config(path, overrides)
  return raised.value.problems


def test_lora_example_is_default():
  config = load_config(os.path.join(EXAMPLES, "smollm2_lora.yaml"))
  defaults = config_lib.RunConfig()
  assert config.model == defaults.model
  assert config.lora == defaults.lora
  assert config.data == defaults.data
  assert config.train == defaults.train
  assert config.output.prompts


def test_full_example_loads():
  config = load_config(os.path.join(EXAMPLES, "smollm2_full.yaml"))
  assert config.train.mode == "full"
  assert config.output.export == "merged"
  assert config.train.to_train_config().mode == "full"


def test_compare_example_loads():
  config = load_config(os.path.join(EXAMPLES, "smollm2_compare.yaml"))
  lora = load_config(os.path.join(EXAMPLES, "smollm2_lora.yaml"))
  assert config.model == lora.model
  assert config.lora == lora.lora
  assert config.data == lora.data
  assert config.train.steps < lora.train.steps
  assert len(config.compare.lora_learning_rates) == len(config.compare.full_learning_rates) == 3


def test_empty_file_gives_defaults(tmp_path):
  assert load_config(_write(tmp_path, "")) == config_lib.RunConfig()


def test_every_problem_listed(tmp_path):
  path = _write(tmp_path, """
lora:
  rank: 0
data:
  batch_size: 0
  seq_len: many
train:
  steps: 10
  warmup_steps: 20
  max_grad_norm: -1
  mode: partial
output:
  max_new_tokens: 0
""")
  problems = _problems(path)
  text = "\n".join(problems)
  assert len(problems) == 7, text
  assert f"{path}: lora.rank: LoRA rank must be a positive integer, got 0" in text
  assert f"{path}: data.batch_size: batch_size=0" in text
  assert f"{path}: data.seq_len: must be an integer, got 'many'" in text
  assert f"{path}: train.max_grad_norm: max_grad_norm must be a positive number" in text
  assert f"{path}: train.mode: must be one of 'lora', 'full', got 'partial'" in text
  assert f"{path}: train: warmup_steps=20 exceeds steps=10" in text
  assert f"{path}: output.max_new_tokens: must be at least 1, got 0" in text


def test_error_message_lists_problems(tmp_path):
  path = _write(tmp_path, "lora: {rank: 0}\ntrain: {steps: 0}\n")
  with pytest.raises(ValueError, match=r"2 problems in the config:\n  .*lora\.rank.*\n  .*train\.steps"):
    load_config(path)


def test_unknown_key_suggests_closest(tmp_path):
  problems = _problems(_write(tmp_path, "train:\n  stepz: 5\n  learnin_rate: 0.1\n"))
  assert any("train.stepz: unknown key; did you mean train.steps?" in p for p in problems)
  assert any("train.learnin_rate: unknown key; did you mean train.learning_rate?" in p for p in problems)


def test_key_in_wrong_section_suggests_section(tmp_path):
  problems = _problems(_write(tmp_path, "lora:\n  learning_rate: 0.1\n"))
  assert problems == [f"{tmp_path / 'run.yaml'}: lora.learning_rate: unknown key; did you mean train.learning_rate?"]


def test_unknown_section_suggests_closest(tmp_path):
  problems = _problems(_write(tmp_path, "trian:\n  steps: 5\n"))
  assert problems == [f"{tmp_path / 'run.yaml'}: trian: unknown section; did you mean train?"]


def test_overrides_replace_values(tmp_path):
  path = _write(tmp_path, "train:\n  steps: 10\ndata:\n  eval_fraction: 0.2\n")
  config = load_config(path, [
      "train.steps=50",
      "lora.targets=[q_proj,v_proj]",
      "lora.rank_pattern.q_proj=4",
      "data.eval_fraction=null",
      "train.learning_rate=3e-4",
      "output.prompts=[Name a prime number]",
  ])
  assert config.train.steps == 50
  assert config.lora.targets == ["q_proj", "v_proj"]
  assert config.lora.rank_pattern == {"q_proj": 4}
  assert config.data.eval_fraction is None
  assert config.train.learning_rate == 3e-4
  assert config.output.prompts == ["Name a prime number"]


def test_override_error_names_override(tmp_path):
  path = _write(tmp_path, "train:\n  steps: 10\n")
  problems = _problems(path, ["train.steps=0", "train.stepz=3", "steps"])
  assert problems[0] == "override 'steps': expected section.key=value, such as train.steps=50."
  assert any(p.startswith("override 'train.stepz=3': train.stepz: unknown key; did you mean train.steps?") for p in problems)
  assert any(p.startswith("override 'train.steps=0': train.steps: steps must be at least 1") for p in problems)


def test_override_invalid_yaml(tmp_path):
  problems = _problems(_write(tmp_path, ""), ["lora.targets=[q_proj"])
  assert problems[0].startswith("override 'lora.targets=[q_proj': lora.targets: the value is not valid YAML")


def test_exponent_without_dot_is_float(tmp_path):
  config = load_config(_write(tmp_path, "train:\n  learning_rate: 1e-3\n  min_lr_ratio: 5E-2\n"))
  assert config.train.learning_rate == 1e-3
  assert config.train.min_lr_ratio == 0.05


def test_integer_where_number_expected(tmp_path):
  config = load_config(_write(tmp_path, "lora:\n  alpha: 16\n"))
  assert config.lora.alpha == 16.0
  assert isinstance(config.lora.alpha, float)


def test_bool_is_not_integer(tmp_path):
  problems = _problems(_write(tmp_path, "train:\n  steps: true\n"))
  assert problems == [f"{tmp_path / 'run.yaml'}: train.steps: must be an integer, got True."]


def test_list_element_type_checked(tmp_path):
  problems = _problems(_write(tmp_path, "compare:\n  lora_learning_rates: [1e-4, fast]\n"))
  assert problems == [
      f"{tmp_path / 'run.yaml'}: compare.lora_learning_rates: must be a list of numbers,"
      " got [0.0001, 'fast']."
  ]


def test_missing_file_raises(tmp_path):
  problems = _problems(str(tmp_path / "absent.yaml"))
  assert problems == [f"{tmp_path / 'absent.yaml'}: config file not found; check the path."]


def test_non_mapping_file_raises(tmp_path):
  problems = _problems(_write(tmp_path, "- train\n- lora\n"))
  assert "the config must be a mapping of sections" in problems[0]


def test_invalid_yaml_names_line(tmp_path):
  problems = _problems(_write(tmp_path, "train:\n  steps: [1, 2\n"))
  assert "invalid YAML" in problems[0]
  assert "line 3" in problems[0]


def test_section_not_mapping(tmp_path):
  problems = _problems(_write(tmp_path, "train: 5\n"))
  assert problems == [f"{tmp_path / 'run.yaml'}: train: must be a mapping of keys, got 5."]


def test_missing_model_and_data_files(tmp_path):
  problems = _problems(_write(tmp_path, f"model:\n  path: {tmp_path}/none\ndata:\n  train_file: {tmp_path}/none.jsonl\n"))
  assert any("model.path:" in p and "not found" in p for p in problems)
  assert any("data.train_file: Data file" in p and "not found" in p for p in problems)


def test_data_format_and_columns_checked(tmp_path):
  problems = _problems(_write(tmp_path, "data:\n  data_format: rows\n  columns: {question: q}\n"))
  assert any(p.split(": ")[1] == "data.data_format" and "'rows'" in p for p in problems)
  assert any(p.split(": ")[1] == "data.columns" and "'question'" in p for p in problems)


def test_pydoc_qa_rejects_eval_file(tmp_path):
  eval_file = tmp_path / "eval.jsonl"
  eval_file.write_text('{"text": "a"}\n')
  problems = _problems(_write(tmp_path, f"data:\n  eval_file: {eval_file}\n"))
  assert len(problems) == 1
  assert "data.eval_file: must be null with train_file 'pydoc-qa'" in problems[0]


def test_eval_file_and_fraction_conflict(tmp_path):
  for name in ("train.jsonl", "eval.jsonl"):
    (tmp_path / name).write_text('{"text": "a"}\n')
  path = _write(tmp_path, f"data:\n  train_file: {tmp_path}/train.jsonl\n  eval_file: {tmp_path}/eval.jsonl\n  eval_fraction: 0.2\n")
  problems = _problems(path)
  assert len(problems) == 1
  assert "data.eval_fraction: is 0.2 but data.eval_file is set" in problems[0]


def test_eval_fraction_resolved():
  assert config_lib.DataSection().resolved_eval_fraction() == 0.1
  assert config_lib.DataSection(eval_file="e.jsonl").resolved_eval_fraction() == 0.0
  assert config_lib.DataSection(eval_fraction=0.0).resolved_eval_fraction() == 0.0


def test_adapter_export_needs_lora(tmp_path):
  problems = _problems(_write(tmp_path, "train: {mode: full}\noutput: {export: both}\n"))
  assert len(problems) == 1
  assert "output.export: is 'both', but train.mode 'full' trains no adapters" in problems[0]


def test_frozen_dtype_needs_lora(tmp_path):
  problems = _problems(_write(tmp_path, "train: {mode: full, frozen_dtype: bfloat16}\noutput: {export: merged}\n"))
  assert len(problems) == 1
  assert "train: frozen_dtype='bfloat16' applies to the frozen base" in problems[0]


def test_mesh_and_remat_policy_checked(tmp_path):
  problems = _problems(_write(tmp_path, "train:\n  mesh: {pipeline: 2}\n  remat_policy: everything\n"))
  assert any(p.split(": ")[1] == "train.mesh" for p in problems)
  assert any(p.split(": ")[1] == "train.remat_policy" for p in problems)


def test_compare_section_checked(tmp_path):
  problems = _problems(_write(tmp_path, "compare:\n  full_learning_rates: []\n  qa_items: -1\n"))
  assert any("compare.full_learning_rates: is empty" in p for p in problems)
  assert any("compare.qa_items: must be at least 0" in p for p in problems)


def test_config_from_dict_checks(tmp_path):
  config = config_lib.config_from_dict({"train": {"steps": 10}, "lora": {"rank": 4}})
  assert config.train.steps == 10
  assert config.lora.rank == 4
  with pytest.raises(ConfigError) as raised:
    config_lib.config_from_dict({"train": {"steps": 0}}, source="compare worker")
  assert raised.value.problems[0].startswith("compare worker: train.steps: steps must be at least 1")


def test_save_config_round_trip(tmp_path):
  config = load_config(os.path.join(EXAMPLES, "smollm2_lora.yaml"), ["lora.rank_pattern.q_proj=4"])
  path = tmp_path / "saved.yaml"
  config_lib.save_config(config, path)
  assert load_config(path) == config
  assert sorted(os.listdir(tmp_path)) == ["saved.yaml"]


def test_saved_config_is_plain_yaml(tmp_path):
  path = tmp_path / "saved.yaml"
  config_lib.save_config(config_lib.RunConfig(), path)
  raw = yaml.safe_load(path.read_text())
  assert list(raw) == list(config_lib.SECTIONS)
  assert raw["train"]["steps"] == 60


def test_to_train_config_passes_files(tmp_path):
  train_config = config_lib.TrainSection(steps=7).to_train_config(checkpoint_dir=tmp_path)
  assert train_config.steps == 7
  assert train_config.checkpoint_dir == tmp_path
  assert train_config.keep_checkpoints == 3


def test_every_key_described():
  described = config_lib.describe_keys()
  assert [key for key, _, _ in described] == config_lib.valid_keys()
  assert all(text for _, _, text in described)
  assert ("train.steps", 60, "optimizer steps.") in described


def test_duplicate_key_raises(tmp_path):
  problems = _problems(_write(tmp_path, "train:\n  steps: 5\n  steps: 7\n"))
  assert "found the key 'steps' twice" in problems[0]
  assert "line 3" in problems[0]


def test_output_dir_under_a_file(tmp_path):
  (tmp_path / "afile").write_text("x")
  problems = _problems(_write(tmp_path, ""), [f"output.dir={tmp_path / 'afile' / 'run'}"])
  assert any("output.dir" in p and "is a file" in p for p in problems)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_dir_not_writable(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o500)
  problems = _problems(_write(tmp_path, ""), [f"output.dir={locked / 'run'}"])
  assert any("is not writable" in p for p in problems)

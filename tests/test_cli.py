"""Tests for the `jaxlora` command: help, errors, train, generate, export, resume."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy

from jaxlora.train import metrics
from jaxlora.train.cli import main
from jaxlora.train.config import load_config
from test_run import PROMPTS, write_job

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Run `jaxlora train` on the tiny job once; return `(config path, run folder, stdout)`."""
  config_path = write_job(tmp_path_factory.mktemp("cli"))
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    status = main(["train", config_path])
  assert status == 0
  return config_path, load_config(config_path).output.dir, stdout.getvalue()


def _run(argv, capsys):
  """Return `(status, stdout, stderr)` of `main(argv)`."""
  status = main(argv)
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def _tensors(path):
  return safetensors.numpy.load_file(path)


def _assert_same_tensors(actual_path, expected_path):
  actual, expected = _tensors(actual_path), _tensors(expected_path)
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.mark.parametrize("command, expected", [
    ([], ["train", "generate", "export", "compare", "(default INFO)"]),
    (["train"], ["key=value", "train.steps [60]: optimizer steps.", "data.seq_len [128]: tokens per row, T."]),
    (["generate"], ["(default smollm2)", "(default 128)", "(default 0)", "(default 1)", "--no-chat"]),
    (["export"], ["(default 5GB)", "(default merged)", "--checkpoint", "(default: the base checkpoint's dtype)"]),
    (["compare"], ["key=value", "compare.output_dir"]),
])
def test_help_states_defaults(command, expected, capsys):
  with pytest.raises(SystemExit) as raised:
    main([*command, "--help"])
  assert raised.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for phrase in expected:
    assert phrase in text


def test_missing_command_exits(capsys):
  with pytest.raises(SystemExit) as raised:
    main([])
  assert raised.value.code == 2
  assert "required: COMMAND" in capsys.readouterr().err


def test_config_error_exits_2(tmp_path, capsys):
  path = tmp_path / "bad.yaml"
  path.write_text("train:\n  stepz: 5\nlora:\n  rank: 0\n")
  status, out, err = _run(["train", str(path), "data.batch_size=0"], capsys)
  assert status == 2
  assert out == ""
  assert err.startswith("error: 3 problems in the config:")
  assert "train.stepz: unknown key; did you mean train.steps?" in err
  assert "Traceback" not in err


def test_compare_checks_config_first(tmp_path, capsys):
  path = tmp_path / "bad.yaml"
  path.write_text("compare:\n  qa_itemz: 5\n")
  status, _, err = _run(["compare", str(path)], capsys)
  assert status == 2
  assert "compare.qa_itemz: unknown key; did you mean compare.qa_items?" in err


def test_train_prints_answers(trained):
  _, folder, stdout = trained
  summary = json.loads(open(os.path.join(folder, "summary.json"), encoding="utf-8").read())
  assert stdout.startswith("held-out loss: ")
  for item in summary["answers"]:
    assert f"Q: {item['prompt']}\nA: {item['answer'].strip()}" in stdout


def _generate(capsys, *model_args):
  prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
  status, out, err = _run(["generate", *model_args, *prompts, "--max-new-tokens", "3"], capsys)
  assert status == 0, err
  return out


def test_generate_answers_with_trained_model(trained, capsys):
  config_path, folder, _ = trained
  base = load_config(config_path).model.path
  summary = json.loads(open(os.path.join(folder, "summary.json"), encoding="utf-8").read())
  expected = "".join(f"Q: {item['prompt']}\nA: {item['answer'].strip()}\n\n" for item in summary["answers"])

  assert _generate(capsys, "--model", os.path.join(folder, "merged")) == expected
  assert _generate(capsys, "--model", base, "--adapter", os.path.join(folder, "adapter")) == expected
  assert _generate(capsys, "--model", base, "--adapter", os.path.join(folder, "checkpoints")) == expected


def test_generate_one_prompt_prints_reply(trained, capsys):
  _, folder, _ = trained
  status, out, _ = _run(
      ["generate", "--model", os.path.join(folder, "merged"), "--prompt", "w9 w10", "--max-new-tokens", "2"],
      capsys,
  )
  assert status == 0
  assert not out.startswith("Q: ")
  assert out.endswith("\n")


def test_generate_bad_top_p_exits_2(trained, capsys):
  _, folder, _ = trained
  status, _, err = _run(
      ["generate", "--model", os.path.join(folder, "merged"), "--prompt", "w9", "--top-p", "0"], capsys
  )
  assert status == 2
  assert err.startswith("error: ")
  assert "--top-p" in err


def test_export_merged_from_checkpoint(trained, tmp_path, capsys):
  config_path, folder, _ = trained
  out = tmp_path / "merged"
  status, stdout, err = _run(
      ["export", "--model", load_config(config_path).model.path,
       "--checkpoint", os.path.join(folder, "checkpoints"), "--out", str(out)],
      capsys,
  )
  assert status == 0, err
  assert stdout == f"wrote {out}\n"
  _assert_same_tensors(out / "model.safetensors", os.path.join(folder, "merged", "model.safetensors"))
  assert os.path.isfile(out / "tokenizer.json")


def test_export_merged_from_adapter(trained, tmp_path, capsys):
  config_path, folder, _ = trained
  out = tmp_path / "merged"
  status, _, err = _run(
      ["export", "--model", load_config(config_path).model.path,
       "--adapter", os.path.join(folder, "adapter"), "--out", str(out), "--dtype", "float32"],
      capsys,
  )
  assert status == 0, err
  expected = _tensors(os.path.join(folder, "merged", "model.safetensors"))
  actual = _tensors(out / "model.safetensors")
  for key, value in expected.items():
    np.testing.assert_allclose(actual[key], value, atol=1e-6, rtol=0, err_msg=key)


def test_export_adapter_from_checkpoint(trained, tmp_path, capsys):
  config_path, folder, _ = trained
  out = tmp_path / "adapter"
  status, _, err = _run(
      ["export", "--model", load_config(config_path).model.path, "--format", "adapter",
       "--checkpoint", os.path.join(folder, "checkpoints", "step_00000004"), "--out", str(out)],
      capsys,
  )
  assert status == 0, err
  _assert_same_tensors(out / "adapter_model.safetensors", os.path.join(folder, "adapter", "adapter_model.safetensors"))
  with open(out / "adapter_config.json", encoding="utf-8") as file:
    written = json.load(file)
  with open(os.path.join(folder, "adapter", "adapter_config.json"), encoding="utf-8") as file:
    assert written == json.load(file)


def test_export_existing_out_exits_2(trained, tmp_path, capsys):
  _, folder, _ = trained
  status, _, err = _run(["export", "--model", os.path.join(folder, "merged"), "--out", str(tmp_path)], capsys)
  assert status == 2
  assert "already exists; pass --overwrite" in err


def test_export_adapter_needs_source(trained, tmp_path, capsys):
  _, folder, _ = trained
  status, _, err = _run(
      ["export", "--model", os.path.join(folder, "merged"), "--format", "adapter", "--out", str(tmp_path / "a")],
      capsys,
  )
  assert status == 2
  assert "--format adapter needs --adapter or --checkpoint" in err


def _wait_for(path, process, timeout_s):
  deadline = time.monotonic() + timeout_s
  while not os.path.isdir(path):
    if process.poll() is not None or time.monotonic() > deadline:
      return False
    time.sleep(0.01)
  return True


@pytest.mark.slow
def test_interrupted_train_resumes(tmp_path, capsys):
  config_path = write_job(tmp_path)
  folder = tmp_path / "run"
  overrides = [
      "train.steps=60", "train.checkpoint_every=10", "train.eval_every=0",
      "output.prompts=[]", "output.export=none",
  ]
  command = [sys.executable, "-m", "jaxlora.train.cli", "train", config_path, *overrides]
  process = subprocess.Popen(command, cwd=REPOSITORY, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    started = _wait_for(folder / "checkpoints" / "step_00000010", process, timeout_s=120)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
  finally:
    if process.poll() is None:
      process.kill()
  assert started, err.decode()[-2000:]
  assert process.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
  assert not (folder / "summary.json").exists()
  assert load_config(folder / "config.yaml") == load_config(config_path, overrides)
  interrupted = metrics.read_metrics(folder / "metrics.jsonl")
  assert 10 <= len(interrupted) < 60

  status, out, _ = _run(["train", config_path, *overrides], capsys)

  assert status == 0
  assert out.startswith("held-out loss: ")
  summary = json.loads((folder / "summary.json").read_text())
  assert summary["resumed_from"] >= 10
  resumed = metrics.read_metrics(folder / "metrics.jsonl")
  assert [r["step"] for r in resumed] == list(range(1, 61))
  assert resumed[:summary["resumed_from"]] == interrupted[:summary["resumed_from"]]


def test_export_out_under_file(tmp_path, capsys):
  (tmp_path / "afile").write_text("x")
  status, _, err = _run(
      ["export", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "afile" / "out")],
      capsys,
  )
  assert status == 2
  assert "is not a folder" in err


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "1.5")])
def test_generate_checks_sampling_before_loading(flag, value, tmp_path, capsys):
  status, _, err = _run(
      ["generate", "--model", str(tmp_path / "absent"), "--prompt", "hi", flag, value], capsys
  )
  assert status == 2
  assert flag in err

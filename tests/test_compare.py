"""Tests for `jaxlora compare`: LoRA against full fine-tuning on a tiny random Llama.

One comparison runs end to end in worker processes. One of its full
fine-tuning rates is large enough to diverge. The tests check its report
against the files each run wrote, and test the scoring, data and selection
helpers alone.
"""

import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import transformers

from conftest import TINY_LLAMA, build_hf_llama
from jaxlora.train import compare, compare_worker, metrics
from jaxlora.train.config import config_from_dict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ids 0-4 are special tokens, and the words w5..w96 take ids 5..96 of TINY_LLAMA.
SPECIAL = ["<unk>", "<s>", "</s>", "<user>", "<bot>"]
WORDS = [f"w{i}" for i in range(len(SPECIAL), TINY_LLAMA["vocab_size"])]
TEMPLATE = (
    "{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<bot> ' }}"
    "{{ m['content'] }} {% if m['role'] != 'user' %}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<bot> {% endif %}"
)
QA_ITEMS = 3
DIVERGING_RATE = 1e30


def chat_tokenizer():
  """Return a word-level tokenizer over TINY_LLAMA's 97 ids with a chat template."""
  vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
  )
  tokenizer.chat_template = TEMPLATE
  return tokenizer


def chat_rows(count=24):
  """Return chat rows whose answers count on from the question: "w5 w6" -> "w7 w8"."""
  rows = []
  for start in range(count):
    words = WORDS[start:start + 4]
    rows.append({"messages": [
        {"role": "user", "content": " ".join(words[:2])},
        {"role": "assistant", "content": " ".join(words[2:])},
    ]})
  return rows


def write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as file:
    for row in rows:
      file.write(json.dumps(row) + "\n")


def compare_config(root, *, full_rates):
  """Write the tiny model, the data and the general text under `root`; return the RunConfig."""
  root.mkdir(parents=True, exist_ok=True)
  build_hf_llama(seed=3).save_pretrained(root / "model")
  chat_tokenizer().save_pretrained(root / "model")
  write_jsonl(root / "pairs.jsonl", chat_rows())
  (root / "general.txt").write_text(" ".join(WORDS[::-1] * 2) + "\n")
  return config_from_dict({
      "model": {"path": str(root / "model")},
      "lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
      "data": {"train_file": str(root / "pairs.jsonl"), "eval_fraction": 0.25, "seq_len": 16, "batch_size": 4},
      "train": {"steps": 4, "warmup_steps": 0, "eval_every": 2},
      "compare": {
          "lora_learning_rates": [3e-2],
          "full_learning_rates": full_rates,
          "general_eval_file": str(root / "general.txt"),
          "qa_items": QA_ITEMS,
          "output_dir": str(root / "compare"),
      },
  })


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
  """The result of one comparison: LoRA at 3e-2, full at 1e-2 and at a diverging rate."""
  root = tmp_path_factory.mktemp("compare")
  config = compare_config(root, full_rates=[1e-2, DIVERGING_RATE])
  return compare.main(config)


@pytest.fixture(scope="module")
def written(outcome):
  """report.json as read back from disk."""
  return json.loads((outcome.output_dir / "report.json").read_text())


def _run(report, name):
  return next(run for run in report["runs"] if run["name"] == name)


def _file_bytes(folder):
  return sum(entry.stat().st_size for entry in os.scandir(folder) if entry.is_file())


def _tensor_elements(path):
  return sum(array.size for array in safetensors.numpy.load_file(path).values())


# ------------------------------------------------------------ end to end


def test_compare_writes_report_files(outcome):
  names = sorted(os.listdir(outcome.output_dir))
  for name in ("report.md", "report.json", "loss_curves.png", "costs.png", "before_after.png", "runs", "data"):
    assert name in names
  for chart in ("loss_curves", "costs", "before_after"):
    assert outcome.files[chart].read_bytes().startswith(PNG_SIGNATURE)
  assert not [name for name in names if name.endswith(".tmp")]


def test_compare_runs_every_rate(written):
  names = [run["name"] for run in written["runs"]]
  assert names == ["lora-lr0.03", "full-lr0.01", f"full-lr{DIVERGING_RATE:g}"]
  assert [run["status"] for run in written["runs"]] == ["ok", "ok", "diverged"]
  assert written["best"] == {"lora": "lora-lr0.03", "full": "full-lr0.01"}


def test_compare_reports_divergence(outcome, written):
  diverged = _run(written, f"full-lr{DIVERGING_RATE:g}")
  assert "diverged" in diverged["error"]
  assert diverged["domain"]["loss_after"] is None
  markdown = (outcome.output_dir / "report.md").read_text()
  assert f"`full-lr{DIVERGING_RATE:g}` diverged" in markdown
  assert any("1 of 2 runs did not finish" in sentence for sentence in written["verdict"])


def test_compare_history_matches_metrics(written):
  for name in ("lora-lr0.03", "full-lr0.01"):
    run = _run(written, name)
    assert run["history"] == metrics.read_metrics(run["metrics_file"])
    assert [record["step"] for record in run["history"]] == [1, 2, 3, 4]
    assert run["domain"]["loss_after"] == run["history"][-1]["eval_loss"]
    assert run["train_seconds"] == run["history"][-1]["elapsed_s"]


def test_compare_saved_sizes(written):
  lora, full = _run(written, "lora-lr0.03"), _run(written, "full-lr0.01")
  assert sorted(os.listdir(lora["saved"]["path"])) == ["adapter_config.json", "adapter_model.safetensors"]
  assert sorted(os.listdir(full["saved"]["path"])) == ["config.json", "model.safetensors"]
  for run in (lora, full):
    assert run["saved"]["bytes"] == _file_bytes(run["saved"]["path"])
    assert run["saved"]["files"] == 2
  assert lora["saved"]["bytes"] < full["saved"]["bytes"]


def test_compare_parameter_counts(written):
  lora, full = _run(written, "lora-lr0.03"), _run(written, "full-lr0.01")
  adapter_elements = _tensor_elements(os.path.join(lora["saved"]["path"], "adapter_model.safetensors"))
  model_elements = _tensor_elements(os.path.join(full["saved"]["path"], "model.safetensors"))
  assert lora["parameters"]["trainable"] == adapter_elements
  assert full["parameters"] == {"trainable": model_elements, "total": model_elements}
  assert lora["parameters"]["total"] == model_elements + adapter_elements


def test_compare_before_after_losses(written):
  baseline = written["baseline"]
  for run in written["runs"]:
    assert run["domain"]["loss_before"] == baseline["domain"]["loss"]
    assert run["general"]["loss_before"] == baseline["general"]["loss"]
  for name in ("lora-lr0.03", "full-lr0.01"):
    run = _run(written, name)
    for key in ("domain", "general"):
      assert math.isfinite(run[key]["loss_after"])
      assert run[key]["perplexity_after"] == pytest.approx(math.exp(run[key]["loss_after"]))
    assert run["domain"]["loss_after"] < run["domain"]["loss_before"]


def test_compare_same_token_budget(written):
  finished = [run for run in written["runs"] if run["status"] == "ok"]
  assert written["budget"]["token_slots"] == 4 * 1 * 4 * 16
  assert len({run["real_tokens"] for run in finished}) == 1
  assert finished[0]["real_tokens"] > 0


def test_compare_speed_and_memory(written):
  for name in ("lora-lr0.03", "full-lr0.01"):
    run = _run(written, name)
    later = [record["tokens_per_s"] for record in run["history"][1:]]
    assert run["tokens_per_s"] == pytest.approx(statistics.median(later))
    assert run["memory"]["peak_host_mib"] > 0
    if sys.platform == "linux":
      assert run["memory"]["host_source"] == "VmHWM"
    assert run["memory"]["peak_device_mib"] is None  # XLA's CPU backend keeps no statistics


def test_compare_qa_scores(written):
  baseline = written["baseline"]["qa"]
  assert baseline["items"] == QA_ITEMS
  references = [example["reference"] for example in baseline["examples"]]
  held_out = [json.loads(line) for line in open(written["data"]["eval_file"], encoding="utf-8")]
  assert references == [row["messages"][-1]["content"] for row in held_out[:QA_ITEMS]]
  for name in ("lora-lr0.03", "full-lr0.01"):
    qa = _run(written, name)["qa"]
    scores = compare.score_answers(qa["answers_after"], references)
    assert qa["exact_match_after"] == scores["exact_match"]
    assert qa["token_f1_after"] == scores["token_f1"]


def test_compare_split_is_disjoint(written, tmp_path):
  rows = [json.dumps(row, sort_keys=True) for row in chat_rows()]
  train = [json.dumps(json.loads(line), sort_keys=True) for line in open(written["data"]["train_file"], encoding="utf-8")]
  held_out = [json.dumps(json.loads(line), sort_keys=True) for line in open(written["data"]["eval_file"], encoding="utf-8")]
  assert len(held_out) == round(0.25 * len(rows))
  assert not set(train) & set(held_out)
  assert sorted(train + held_out) == sorted(rows)
  assert written["data"]["eval_examples"] == len(held_out)


def test_compare_markdown_numbers(outcome, written):
  markdown = (outcome.output_dir / "report.md").read_text()
  for name in ("lora-lr0.03", "full-lr0.01"):
    run = _run(written, name)
    assert f"{run['domain']['loss_after']:.4f}" in markdown
    assert f"{run['saved']['bytes']:,} bytes" in markdown
    assert f"{run['parameters']['trainable']:,}" in markdown
  for sentence in written["verdict"]:
    assert sentence in markdown
  for chart in ("loss_curves", "costs", "before_after"):
    assert f"({chart}.png)" in markdown


def test_compare_result_fields(outcome, written):
  assert outcome.verdict == written["verdict"]
  assert outcome.best["full"]["name"] == "full-lr0.01"
  assert outcome.best["lora"]["name"] == "lora-lr0.03"


# ---------------------------------------------------------------- workers


def test_worker_failure_reported(tmp_path):
  spec = {"role": "baseline", "config": {"model": {"path": str(tmp_path / "missing")}}}
  result = compare.run_worker(tmp_path / "run", spec)
  assert result["status"] == "failed"
  assert result["exit_code"] == 1
  assert "ConfigError" in result["error"]
  assert "missing" in result["error"]
  assert os.path.isfile(result["log_file"])


def test_worker_crash_reported(tmp_path, monkeypatch):
  # A stand-in interpreter that exits the way a killed worker does: no result file.
  crash = tmp_path / "crash.sh"
  crash.write_text("#!/bin/sh\necho 'out of memory' >&2\nexit 137\n")
  crash.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(crash))
  result = compare.run_worker(tmp_path / "run", {"role": "baseline", "config": {}})
  assert result["status"] == "failed"
  assert result["exit_code"] == 137
  assert "exited with code 137 without a result" in result["error"]
  assert "out of memory" in result["error"]


# ---------------------------------------------------------------- helpers


def test_config_rejects_repeated_rate(tmp_path):
  config = config_from_dict({"compare": {"lora_learning_rates": [1e-3, 0.001], "output_dir": str(tmp_path)}})
  with pytest.raises(ValueError, match="lists the same rate twice"):
    compare.main(config)


def test_config_rejects_no_held_out(tmp_path):
  path = tmp_path / "pairs.jsonl"
  write_jsonl(path, chat_rows(4))
  config = config_from_dict({
      "data": {"train_file": str(path), "eval_fraction": 0.0},
      "compare": {"output_dir": str(tmp_path / "out")},
  })
  with pytest.raises(ValueError, match="needs held-out data"):
    compare.main(config)


def test_split_rows_deterministic(tmp_path):
  path = tmp_path / "pairs.jsonl"
  write_jsonl(path, chat_rows(20))
  data = config_from_dict({"data": {"train_file": str(path), "eval_fraction": 0.3}}).data
  first = compare.split_rows(data, tmp_path / "a")
  second = compare.split_rows(data, tmp_path / "b")
  for first_path, second_path in zip(first, second):
    assert first_path.read_text() == second_path.read_text()
  assert len(first[1].read_text().splitlines()) == 6
  assert len(first[0].read_text().splitlines()) == 14


def test_split_rows_keeps_text(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("w3 w4 w5\n")
  data = config_from_dict({"data": {"train_file": str(path)}}).data
  assert compare.split_rows(data, tmp_path / "out") == (str(path), None)


def test_qa_items_prompt_completion(tmp_path):
  path = tmp_path / "eval.jsonl"
  write_jsonl(path, [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2}"} for i in range(3, 8)])
  data = config_from_dict({"data": {"columns": {"prompt": "question", "completion": "answer"}}}).data
  items, note = compare.qa_items(path, data, 2)
  assert note is None
  assert items == [
      {"prompt": "w3 w4", "question": "w3 w4", "reference": "w5", "chat": False},
      {"prompt": "w4 w5", "question": "w4 w5", "reference": "w6", "chat": False},
  ]


def test_qa_items_chat_last_reply(tmp_path):
  path = tmp_path / "eval.jsonl"
  messages = [
      {"role": "system", "content": "w3"},
      {"role": "user", "content": "w4"},
      {"role": "assistant", "content": "w5"},
      {"role": "user", "content": "w6"},
      {"role": "assistant", "content": "w7"},
  ]
  write_jsonl(path, [{"messages": messages}, {"messages": messages[:2]}])
  data = config_from_dict({}).data
  items, note = compare.qa_items(path, data, 5)
  assert note is None
  assert items == [{"prompt": messages[:4], "question": "w6", "reference": "w7", "chat": True}]


def test_qa_items_text_has_none(tmp_path):
  path = tmp_path / "eval.jsonl"
  write_jsonl(path, [{"text": "w3 w4"}])
  items, note = compare.qa_items(path, config_from_dict({}).data, 5)
  assert items == []
  assert "text" in note


@pytest.mark.parametrize(
    "answer, reference, expected",
    [
        ("Returns a  list.", "returns a list.", 1.0),
        ("a b c", "a b d", 2 / 3),
        ("a a", "a", 2 / 3),
        ("", "", 1.0),
        ("x", "", 0.0),
        ("(JSON), string!", "json string", 1.0),
    ],
)
def test_token_f1_cases(answer, reference, expected):
  assert compare.token_f1(answer, reference) == pytest.approx(expected)


def test_score_answers_exact_match():
  scores = compare.score_answers(["Hello  World", "hello"], ["hello world", "bye"])
  assert scores["exact_match"] == 0.5
  assert scores["token_f1"] == pytest.approx(0.5)


def test_score_answers_rejects_mismatch():
  with pytest.raises(ValueError, match="2 answers for 1 references"):
    compare.score_answers(["a", "b"], ["a"])


def test_pick_best_skips_failed():
  runs = [
      {"name": "lora-a", "method": "lora", "status": "ok", "domain": {"loss_after": 2.0}},
      {"name": "lora-b", "method": "lora", "status": "ok", "domain": {"loss_after": 1.5}},
      {"name": "full-a", "method": "full", "status": "diverged", "domain": {"loss_after": None}},
  ]
  assert compare.pick_best(runs) == {"lora": "lora-b", "full": None}


def test_median_tokens_per_s_skips_first():
  history = [{"tokens_per_s": 1.0}, {"tokens_per_s": 10.0}, {"tokens_per_s": 30.0}, {"tokens_per_s": 20.0}]
  assert compare_worker.median_tokens_per_s(history) == (20.0, "steps 2-4")
  assert compare_worker.median_tokens_per_s(history[:1]) == (1.0, "step 1, compilation included")


def test_counting_batches_counts_real_tokens():
  batches = [{"attention_mask": np.array([[1, 1, 0], [1, 0, 0]])}] * 3
  counter = compare_worker.CountingBatches(batches)
  taken = [next(counter), next(counter)]
  assert len(taken) == 2
  assert counter.real_tokens == 6


def test_folder_bytes_counts_files(tmp_path):
  (tmp_path / "a.bin").write_bytes(b"x" * 10)
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 7)
  assert compare_worker.folder_bytes(tmp_path) == (17, 2)


def test_peak_host_memory_positive():
  peak, source = compare_worker.peak_host_memory_mib()
  assert peak > 0
  assert source in ("VmHWM", "ru_maxrss")


def test_default_general_text_shipped():
  path = compare.default_general_text()
  text = path.read_text(encoding="utf-8")
  assert path.is_file()
  assert 15_000 <= len(text.encode("utf-8")) <= 25_000
  assert text.startswith("<!--")


def test_parent_leaves_device_alone(tmp_path):
  # An accelerator initialized by the parent would hold memory the workers need.
  path = tmp_path / "pairs.jsonl"
  write_jsonl(path, chat_rows(8))
  code = (
      "import sys\n"
      "from jax._src import xla_bridge\n"
      "from jaxlora.train import compare, report\n"
      "from jaxlora.train.config import config_from_dict\n"
      f"config = config_from_dict({{'data': {{'train_file': {str(path)!r}, 'eval_fraction': 0.25}}}})\n"
      f"compare.prepare_data(config, {str(tmp_path / 'data')!r})\n"
      "sys.exit(1 if xla_bridge.backends_are_initialized() else 0)\n"
  )
  process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert process.returncode == 0, process.stderr[-2000:]

"""Tests for the comparison report: the verdict, the charts and the files, on made-up numbers."""

import copy
import json
import math
import os

import pytest

from jaxlora.train import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOMAIN_BEFORE = 3.0
GENERAL_BEFORE = 2.5


def make_run(method, rate, *, domain, general, memory, speed, size, status="ok"):
  """Return a run record as `compare.run_record` builds it, with the given outcome."""
  finished = status == "ok"
  return {
      "name": f"{method}-lr{rate:g}",
      "method": method,
      "learning_rate": rate,
      "status": status,
      "error": None if finished else f"Training diverged at step 2: loss is nan (rate {rate:g})",
      "exit_code": 0,
      "log_file": f"runs/{method}-lr{rate:g}/worker.log",
      "worker_seconds": 12.0,
      "parameters": {"trainable": 1000 if method == "lora" else 50000, "total": 51000 if method == "lora" else 50000},
      "memory": {"peak_host_mib": memory, "host_source": "VmHWM", "peak_device_mib": None} if finished else None,
      "tokens_per_s": speed if finished else None,
      "tokens_per_s_steps": "steps 2-4",
      "real_tokens": 256,
      "train_seconds": 9.0,
      "saved": {"kind": "folder", "path": "x", "bytes": size, "files": 2, "dtype": "float32"} if finished else None,
      "metrics_file": "metrics.jsonl",
      "history": [
          {"step": 1, "loss": DOMAIN_BEFORE, "tokens_per_s": 1.0, "elapsed_s": 1.0},
          {"step": 2, "loss": domain + 0.1, "eval_loss": domain, "tokens_per_s": speed or 1.0, "elapsed_s": 2.0},
      ] if finished else [],
      "domain": {
          "loss_before": DOMAIN_BEFORE,
          "loss_after": domain if finished else None,
          "perplexity_before": math.exp(DOMAIN_BEFORE),
          "perplexity_after": math.exp(domain) if finished else None,
      },
      "general": {
          "loss_before": GENERAL_BEFORE,
          "loss_after": general if finished else None,
          "perplexity_before": math.exp(GENERAL_BEFORE),
          "perplexity_after": math.exp(general) if finished else None,
      },
      "qa": {
          "items": 4, "max_new_tokens": 12,
          "exact_match_before": 0.0, "exact_match_after": 0.5 if method == "full" else 0.25,
          "token_f1_before": 0.1, "token_f1_after": 0.6, "answers_after": ["a", "b", "c", "d"],
      } if finished else None,
  }


def make_summary(runs):
  """Return a summary as `compare.build_report` builds it, best runs picked by domain loss."""
  best = {}
  for method in report.METHODS:
    finished = [run for run in runs if run["method"] == method and run["status"] == "ok"]
    best[method] = min(finished, key=lambda run: run["domain"]["loss_after"])["name"] if finished else None
  summary = {
      "model": "tiny",
      "data": {
          "train_file": "train.jsonl", "eval_file": "eval.jsonl", "eval_examples": 6,
          "general_eval_file": "general.md", "general_tokens": 1234, "qa_note": None,
      },
      "budget": {"steps": 2, "grad_accum_steps": 1, "batch_size": 4, "seq_len": 16, "token_slots": 128},
      "lora": {"rank": 4, "alpha": 8.0, "targets": ["q_proj"]},
      "learning_rates": {
          method: [run["learning_rate"] for run in runs if run["method"] == method] for method in report.METHODS
      },
      "baseline": {
          "domain": {"loss": DOMAIN_BEFORE, "perplexity": math.exp(DOMAIN_BEFORE)},
          "general": {"loss": GENERAL_BEFORE, "perplexity": math.exp(GENERAL_BEFORE)},
          "qa": {
              "items": 4, "max_new_tokens": 12, "exact_match": 0.0, "token_f1": 0.1,
              "examples": [{"question": f"q{i}", "reference": f"r{i}", "answer": f"b{i}"} for i in range(4)],
          },
          "worker_seconds": 5.0,
          "log_file": "runs/baseline/worker.log",
      },
      "runs": runs,
      "best": best,
      "wall_seconds": 60.0,
  }
  summary["verdict"] = report.verdict(summary)
  return summary


def full_wins():
  """Full fine-tuning learns more but costs more and forgets more."""
  return make_summary([
      make_run("lora", 1e-3, domain=2.0, general=2.52, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("lora", 1e-4, domain=2.6, general=2.50, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("full", 1e-5, domain=1.5, general=2.9, memory=6000.0, speed=600.0, size=500_000_000),
  ])


def lora_wins():
  """The opposite outcome: LoRA reaches the lower loss, full forgets less."""
  return make_summary([
      make_run("lora", 1e-3, domain=1.2, general=2.9, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("lora", 1e-4, domain=2.6, general=2.50, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("full", 1e-5, domain=1.8, general=2.55, memory=6000.0, speed=600.0, size=500_000_000),
  ])


# ------------------------------------------------------------------ verdict


def test_verdict_full_wins():
  text = " ".join(full_wins()["verdict"])
  assert "Full fine-tuning reached the lower held-out domain loss: 1.5000 against 2.0000" in text
  assert "0.5000 lower" in text
  assert "2.00 times the peak host memory of LoRA (6,000 against 3,000 MiB)" in text
  assert "0.67 times its speed (600 against 900 tokens/s)" in text
  assert "250.00 times the bytes" in text
  assert "rose by 0.0200 nats with LoRA and rose by 0.4000 nats with full fine-tuning, so LoRA forgot less" in text


def test_verdict_lora_wins():
  text = " ".join(lora_wins()["verdict"])
  assert "LoRA reached the lower held-out domain loss: 1.2000 against 1.8000" in text
  assert "0.50 times the peak host memory of full fine-tuning" in text
  assert "so full fine-tuning forgot less" in text


def test_verdict_changes_with_numbers():
  assert full_wins()["verdict"] != lora_wins()["verdict"]


def test_verdict_tie():
  summary = make_summary([
      make_run("lora", 1e-3, domain=2.0, general=2.6, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("full", 1e-5, domain=2.005, general=2.6, memory=6000.0, speed=600.0, size=500_000_000),
  ])
  text = " ".join(summary["verdict"])
  assert "reached about the same held-out domain loss" in text
  assert "Full fine-tuning used 2.00 times the peak host memory" in text
  assert "so both forgot about as much" in text


def test_verdict_general_loss_fell():
  summary = make_summary([
      make_run("lora", 1e-3, domain=2.0, general=2.4, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("full", 1e-5, domain=1.5, general=2.3, memory=6000.0, speed=600.0, size=500_000_000),
  ])
  text = " ".join(summary["verdict"])
  assert "fell by 0.1000 nats with LoRA and fell by 0.2000 nats with full fine-tuning" in text
  assert "so neither method lost fit to general text" in text


def test_verdict_edge_of_sweep():
  text = " ".join(full_wins()["verdict"])
  assert "The best LoRA learning rate, 0.001, is the largest tried; a larger one may do better." in text
  assert "full fine-tuning learning rate" not in text  # one rate: no edge to report


def test_verdict_reports_failures():
  summary = make_summary([
      make_run("lora", 1e-3, domain=2.0, general=2.6, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("full", 1e-5, domain=0, general=0, memory=0, speed=0, size=0, status="diverged"),
      make_run("full", 1e-4, domain=0, general=0, memory=0, speed=0, size=0, status="failed"),
  ])
  text = " ".join(summary["verdict"])
  assert "Full fine-tuning: 2 of 2 runs did not finish (1e-05 diverged, 0.0001 failed)." in text
  assert "Only LoRA finished a run" in text
  assert "3.0000 to 2.0000" in text


def test_verdict_nothing_finished():
  summary = make_summary([
      make_run("lora", 1e-3, domain=0, general=0, memory=0, speed=0, size=0, status="failed"),
      make_run("full", 1e-5, domain=0, general=0, memory=0, speed=0, size=0, status="diverged"),
  ])
  assert summary["verdict"][-1].startswith("Neither method finished a run")


def test_verdict_no_improvement():
  summary = make_summary([
      make_run("lora", 1e-3, domain=3.2, general=2.5, memory=3000.0, speed=900.0, size=2_000_000),
      make_run("full", 1e-5, domain=1.5, general=2.9, memory=6000.0, speed=600.0, size=500_000_000),
  ])
  assert "The best LoRA run did not lower the held-out loss (3.0000 to 3.2000)" in " ".join(summary["verdict"])


def test_verdict_qa_scores():
  text = " ".join(full_wins()["verdict"])
  assert "Exact match on 4 held-out questions went from 0% (token F1 0.10) before training" in text
  assert "25% with LoRA (token F1 0.60) and 50% with full fine-tuning" in text


def test_verdict_prefers_device_memory():
  summary = full_wins()
  for run in summary["runs"]:
    run["memory"]["peak_device_mib"] = run["memory"]["peak_host_mib"] / 10
  text = " ".join(report.verdict(summary))
  assert "peak device memory of LoRA (600 against 300 MiB)" in text


# ------------------------------------------------------------ files, charts


def test_charts_are_png():
  summary = full_wins()
  for name, draw in report.CHARTS.items():
    assert draw(summary).startswith(PNG_SIGNATURE), name


def test_charts_skip_without_runs():
  summary = make_summary([
      make_run("lora", 1e-3, domain=0, general=0, memory=0, speed=0, size=0, status="failed"),
  ])
  assert all(draw(summary) is None for draw in report.CHARTS.values())


def test_write_report_files(tmp_path):
  summary = full_wins()
  files = report.write_report(summary, tmp_path)
  assert sorted(os.listdir(tmp_path)) == [
      "before_after.png", "costs.png", "loss_curves.png", "report.json", "report.md",
  ]
  assert set(files) == {"markdown", "json", "loss_curves", "costs", "before_after"}
  assert json.loads(files["json"].read_text()) == summary


def test_write_report_without_charts(tmp_path):
  summary = make_summary([
      make_run("full", 1e-5, domain=0, general=0, memory=0, speed=0, size=0, status="diverged"),
  ])
  (tmp_path / "costs.png").write_bytes(b"stale")
  report.write_report(summary, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]
  markdown = (tmp_path / "report.md").read_text()
  assert ".png" not in markdown
  assert "`full-lr1e-05` diverged: Training diverged at step 2" in markdown


def test_markdown_contains_numbers():
  summary = full_wins()
  markdown = report.render_markdown(summary, list(report.CHARTS))
  for sentence in summary["verdict"]:
    assert sentence in markdown
  assert "| domain loss | 3.0000 -> 2.0000 | 3.0000 -> 1.5000 |" in markdown
  assert "| peak host memory | 3,000 MiB | 6,000 MiB |" in markdown
  assert "| trainable parameters | 1,000 | 50,000 |" in markdown
  assert "| `lora-lr0.0001` | ok | 2.6000 | 2.5000 | 25% | 3,000 | 900 | 1.9 MiB | 12 |" in markdown
  assert "- reference: r0" in markdown
  assert "- full fine-tuning: a" in markdown
  assert "128 token slots" in markdown


def test_write_json_replaces_non_finite(tmp_path):
  path = tmp_path / "value.json"
  report.write_json(path, {"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": "x"})
  assert json.loads(path.read_text()) == {"a": [1.0, None], "b": {"c": None}, "d": "x"}
  assert not [name for name in os.listdir(tmp_path) if name != "value.json"]


def test_write_report_keeps_summary(tmp_path):
  summary = full_wins()
  before = copy.deepcopy(summary)
  report.write_report(summary, tmp_path)
  assert summary == before


@pytest.mark.parametrize(
    "size, text", [(512, "512 B"), (4096, "4 KiB"), (3 * 2**20 + 2**19, "3.5 MiB"), (2**31, "2.00 GiB")]
)
def test_format_bytes_units(size, text):
  assert report.format_bytes(size) == text

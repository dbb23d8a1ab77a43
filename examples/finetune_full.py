"""Fine-tune every weight of a pretrained causal language model, on one device or many.

With no flags, it trains SmolLM2-135M-Instruct on question-and-answer pairs
from the docstrings of Python's standard library (the same defaults as
examples/finetune_lora.py, whose helpers it reuses), and then:

  1. prints the parameter line and the held-out loss before training;
  2. prints the model's answers to held-out questions;
  3. trains all weights, with a progress bar and a JSON Lines metrics file;
  4. prints the held-out loss and the answers again;
  5. writes a Hugging Face folder, reloads it with transformers and reports
     the largest logit difference from the JAX model;
  6. prints the peak resident memory of the process.

The same command runs on 8 GPUs, a TPU pod slice or several hosts: `--mesh`
lays the devices out, and the distributed flags (or the JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID variables) join several processes; see
docs/scaling.md. Run `python examples/finetune_full.py --help` for the flags.
"""

import argparse
import json
import logging
import pathlib
import resource
import time

import jax
import numpy as np

import finetune_lora as lora_example

import jaxlora
from jaxlora import models
from jaxlora import train
from jaxlora.train import data, distributed, generate, loop, plot, step
from jaxlora.train.metrics import read_metrics

logger = logging.getLogger("finetune_full")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  lora_example.add_model_and_data_arguments(parser)
  parser.add_argument("--steps", type=int, default=12, help="optimizer steps.")
  parser.add_argument("--batch-size", type=int, default=8, help="sequences per step, over all devices.")
  parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence.")
  parser.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per step.")
  parser.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate.")
  parser.add_argument("--warmup-steps", type=int, default=2, help="steps of linear warmup.")
  parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices.")
  parser.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations; 0: after the last.")
  parser.add_argument(
      "--eval-examples", type=int, default=64,
      help="held-out examples used for the eval loss (the first N).",
  )
  parser.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per answer.")
  parser.add_argument("--seed", type=int, default=0, help="seed of the shuffling.")
  parser.add_argument(
      "--output", default="outputs/finetune_full",
      help="folder for the data, metrics, loss plot and export.",
  )

  scale = lora_example.add_scaling_arguments(parser, frozen_dtype=False)
  scale.add_argument(
      "--checkpoint-dir", default=None,
      help="folder for an orbax checkpoint after the last step (shared by all"
      " hosts); default: none.",
  )

  hosts = parser.add_argument_group("several processes (hosts)")
  hosts.add_argument(
      "--coordinator-address", default=None,
      help="host:port of process 0; default: $JAX_COORDINATOR_ADDRESS, else a"
      " single process.",
  )
  hosts.add_argument("--num-processes", type=int, default=None, help="default: $JAX_NUM_PROCESSES.")
  hosts.add_argument("--process-id", type=int, default=None, help="default: $JAX_PROCESS_ID.")
  hosts.add_argument(
      "--auto-cluster", action="store_true",
      help="let jax.distributed detect the cluster (TPU pod slices, SLURM,"
      " Open MPI, Kubernetes) when none of the three is set.",
  )
  hosts.add_argument(
      "--distributed-timeout", type=int, default=300,
      help="seconds to wait for the coordinator and the other processes.",
  )
  return parser.parse_args(argv)


def sharded_eval_step(model, params, mesh):
  """Return `(eval_step, placed_params)` for evaluating `params` on `mesh`."""
  shardings = train.llama_rules(model.config).shardings(params, mesh)
  placement = step.StepShardings(mesh=mesh, trainable=shardings, frozen={}, opt_state=None)
  return step.make_eval_step(model, shardings=placement), train.place(params, shardings)


def peak_memory_mib() -> float:
  """Return this process's peak resident memory in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  args = parse_args(argv)
  distributed.initialize(
      args.coordinator_address, args.num_processes, args.process_id,
      auto=args.auto_cluster, timeout_s=args.distributed_timeout,
  )
  start = time.perf_counter()
  primary = distributed.is_primary()
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  mesh = train.make_mesh(lora_example.parse_mesh(args.mesh))
  train_config = loop.TrainConfig(
      steps=args.steps,
      learning_rate=args.learning_rate,
      warmup_steps=args.warmup_steps,
      weight_decay=args.weight_decay,
      grad_accum_steps=args.grad_accum_steps,
      eval_every=args.eval_every,
      seed=args.seed,
      metrics_path=output / "metrics.jsonl" if primary else None,
      progress=primary,
      mode="full",
      compute_dtype=args.compute_dtype,
      remat=args.remat,
      remat_policy=args.remat_policy,
      checkpoint_dir=args.checkpoint_dir,
  )

  pretrained = lora_example.load_model(args.model)
  train_file, eval_file, questions = lora_example.build_data(args, output)
  train_examples, eval_examples = data.prepare_data(
      train_file, pretrained.tokenizer,
      seq_len=args.seq_len, batch_size=args.batch_size,
      eval_file=eval_file, eval_fraction=0.0 if eval_file else 0.1,
      seed=args.seed, max_positions=pretrained.config.max_position_embeddings,
  )
  eval_examples = eval_examples.subset(range(min(args.eval_examples, len(eval_examples))))
  eval_batches = distributed.process_eval_batches(eval_examples, mesh, batch_size=args.batch_size)


  def batches(start_batch):
    return distributed.process_train_batches(
        train_examples, mesh, batch_size=args.batch_size, seed=args.seed,
        start_batch=start_batch,
    )

  logger.info("%d training and %d held-out examples.", len(train_examples), len(eval_examples))

  params = pretrained.params
  model = models.Llama(pretrained.config)
  eval_step, placed = sharded_eval_step(model, params, mesh)
  loss_before = step.evaluate(eval_step, placed, eval_batches)
  del placed
  if primary:
    print(f"held-out loss before training: {loss_before:.4f}")
    if questions:
      answers = lora_example.answer(model, params, pretrained, questions, args.max_new_tokens)
      lora_example.print_answers("Answers before training:", questions, answers)

  result = loop.fit(model, params, batches, eval_batches, train_config, mesh=mesh)
  trained = distributed.fetch(result.params)
  if result.history and "eval_loss" in result.history[-1]:
    loss_after = result.history[-1]["eval_loss"]
  else:
    # A run resumed from its final checkpoint trains no step and evaluates nothing.
    eval_step, placed = sharded_eval_step(model, trained, mesh)
    loss_after = step.evaluate(eval_step, placed, eval_batches)
    del placed
  del result
  summary = {"eval_loss_before": loss_before, "eval_loss_after": loss_after}

  if primary:
    print(f"held-out loss: {loss_before:.4f} before, {loss_after:.4f} after training")
    # The metrics file contains every step of the run, resumed or not.
    history = read_metrics(train_config.metrics_path)
    plot.plot_losses(
        history, output / "loss.png", eval_loss_before=loss_before, title="Full fine-tuning"
    )
    if questions:
      answers = lora_example.answer(model, trained, pretrained, questions, args.max_new_tokens)
      lora_example.print_answers("Answers after training:", questions, answers)

    # A tree without adapters merges to itself; the call keeps the export
    # path the same as LoRA's.
    export = output / "export"
    models.save_pretrained(
        export, pretrained.config, jaxlora.merge(trained),
        tokenizer=pretrained.tokenizer,
        generation_config=pretrained.generation_config,
        dtype=pretrained.source_dtype,
        overwrite=True,
    )
    logger.info("Wrote the trained model to %s.", export)
    probe = generate.encode_prompt(
        pretrained.tokenizer, questions[0] if questions else "Hello", chat=True
    )
    difference = lora_example.reload_with_transformers(
        export, model, trained, np.asarray([probe], np.int32)
    )
    print(f"transformers reloaded {export}: max |logit difference| = {difference:.2e}")
    summary.update(
        max_logit_difference=difference,
        export=str(export),
        mesh=dict(mesh.shape),
        processes=jax.process_count(),
        peak_memory_mib=peak_memory_mib(),
        seconds=time.perf_counter() - start,
    )
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"peak memory {summary['peak_memory_mib']:.0f} MiB; done in"
        f" {summary['seconds']:.0f} s; summary in {output / 'summary.json'}"
    )
  distributed.barrier("finetune_full_done")
  if not loss_after < loss_before:
    raise SystemExit("The held-out loss did not fall; check the learning rate and the data.")


if __name__ == "__main__":
  main()

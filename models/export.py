"""Write a merged Hugging Face model folder from a base model and a peft adapter.

    python -m jaxlora.models.export BASE OUT [--adapter ADAPTER] [--dtype bfloat16]
        [--max-shard-size 5GB] [--overwrite]

BASE is a Hugging Face folder or a GGUF file (see `jaxlora.models.load`),
ADAPTER a peft LoRA adapter folder, such as one written by
`jaxlora.models.save_peft_adapter`. The adapter is folded into the base
weights in float32 and each tensor is cast once to the saved dtype. When BASE
is a folder, its tokenizer, generation-config and chat-template files are
copied unchanged.
"""

import argparse
import logging
import os

from jaxlora.models.hf_writer import DEFAULT_MAX_SHARD_SIZE, SAVED_DTYPES, parse_size, save_merged
from jaxlora.models.loading import load
from jaxlora.models.peft_io import load_peft_adapter

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m jaxlora.models.export",
      description="Merge a peft LoRA adapter into a base model and write a Hugging Face folder.",
  )
  parser.add_argument("base", help="base model: a Hugging Face folder or a .gguf file")
  parser.add_argument("out", help="folder to write")
  parser.add_argument("--adapter", help="peft LoRA adapter folder to merge; none writes the base model")
  parser.add_argument(
      "--dtype", choices=SAVED_DTYPES,
      help="dtype of the saved weights; default: the dtype of the base checkpoint",
  )
  parser.add_argument(
      "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, type=_size,
      help=(
          "largest weights file, such as 5GB or 500MiB; a larger model is"
          f" written as shards with an index (default {DEFAULT_MAX_SHARD_SIZE})"
      ),
  )
  parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  return parser.parse_args(argv)


def _size(text):
  try:
    return parse_size(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def export(base, out, *, adapter=None, dtype=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE, overwrite=False) -> None:
  """Merge `adapter` (if any) into `base` and write the folder `out`; see the module docstring.

  Raises:
    ValueError: if `dtype` is None and the base checkpoint's dtype cannot be
      saved (a quantized GGUF file), or for any error of loading or saving.
  """
  pretrained = load(base)
  if dtype is None:
    if pretrained.source_dtype not in SAVED_DTYPES:
      raise ValueError(
          f"The base checkpoint's dtype is {pretrained.source_dtype}, which a"
          f" Hugging Face folder cannot store. Choose --dtype from"
          f" {', '.join(SAVED_DTYPES)}."
      )
    dtype = pretrained.source_dtype

  params = pretrained.params
  if adapter is not None:
    params = load_peft_adapter(adapter, pretrained.config, params).params

  extras = {}
  if os.path.isdir(base):
    extras["source_folder"] = base
  else:
    extras["tokenizer"] = pretrained.tokenizer
    extras["generation_config"] = pretrained.generation_config
  save_merged(
      out, pretrained.config, params, dtype=dtype, max_shard_size=max_shard_size,
      overwrite=overwrite, **extras,
  )


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  args = parse_args(argv)
  export(
      args.base, args.out, adapter=args.adapter, dtype=args.dtype,
      max_shard_size=args.max_shard_size, overwrite=args.overwrite,
  )


if __name__ == "__main__":
  main()

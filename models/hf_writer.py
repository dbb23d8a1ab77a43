"""Writing Hugging Face model folders that transformers loads.

`save_pretrained` writes `config.json` (with the saved `dtype`), the weights
in transformers' layout (see `jaxlora.models.hf_folder`), split into shards
with an index above `max_shard_size`, and optionally the tokenizer, the
generation config and the chat template. `save_merged` first folds adapters
into their kernels in float32. Every folder is written beside its final path
and renamed into place.
"""

import collections
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

import jaxlora
from jaxlora import paths
from jaxlora.lora import LORA
from jaxlora.models.architectures import ModelConfig
from jaxlora.models.hf_folder import (
    CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, TOKENIZER_FILES, WEIGHTS_FILE,
    check_keys, expected_tensors,
)

logger = logging.getLogger(__name__)

SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"
SAVED_DTYPES = ("float32", "bfloat16", "float16")
# Files that `save_pretrained(..., source_folder=...)` copies byte for byte.
COPIED_FILES = (
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    GENERATION_CONFIG_FILE,
    "chat_template.jinja",
    "chat_template.json",
)
# The largest weights file written when no size is given (transformers 5.25's
# save_pretrained defaults to "50GB").
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def save_pretrained(
    folder: str | os.PathLike,
    config: ModelConfig,
    params: Mapping[str, Any],
    *,
    tokenizer=None,
    generation_config=None,
    source_folder: str | os.PathLike | None = None,
    dtype=None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> None:
  """Write a Hugging Face model folder that transformers loads.

  Everything is written to a temporary sibling folder first and then renamed
  to `folder`, so an interrupted save leaves no half-written model behind.

  Args:
    folder: the folder to create.
    config: the architecture of `params`.
    params: a plain tree without adapters; call `jaxlora.merge` first, or use
      `save_merged`.
    tokenizer: a transformers tokenizer to save beside the weights, or None.
    generation_config: a dict (or a transformers `GenerationConfig`) written
      to `generation_config.json`, or None.
    source_folder: a Hugging Face folder whose tokenizer, generation-config
      and chat-template files (`COPIED_FILES`) are copied byte for byte.
      Excludes `tokenizer` and `generation_config`.
    dtype: dtype of the saved weights, "float32", "bfloat16" or "float16";
      None keeps the dtype that most of the tree's floating-point parameters
      have. Each tensor is cast once. config.json records it as `dtype`.
    max_shard_size: the largest weights file, in bytes or as a string such
      as "5GB" or "500MiB". A larger checkpoint is split into
      `model-00001-of-0000N.safetensors` files listed by
      `model.safetensors.index.json`; a single tensor larger than this gets
      a file of its own.
    overwrite: replace an existing `folder`; without it an existing folder
      raises.

  Raises:
    ValueError: if `params` contains adapters or does not match `config`,
      if `folder` exists and `overwrite` is False, or if an argument is
      invalid.
  """
  folder = os.path.abspath(os.fspath(folder))
  if os.path.lexists(folder) and not overwrite:
    raise ValueError(
        f"{folder} already exists. Pass overwrite=True to replace it, or"
        " choose another folder."
    )
  if os.path.lexists(folder) and not os.path.isdir(folder):
    raise ValueError(f"{folder} exists and is not a folder; remove it first.")
  if source_folder is not None and (tokenizer is not None or generation_config is not None):
    raise ValueError(
        "Pass either source_folder (its tokenizer and generation files are"
        " copied unchanged) or tokenizer/generation_config, not both."
    )
  if source_folder is not None and not os.path.isdir(source_folder):
    raise ValueError(f"source_folder {os.fspath(source_folder)!r} is not a folder.")
  shard_bytes = parse_size(max_shard_size)
  dtype_name = _dominant_tree_dtype(params) if dtype is None else _saved_dtype(dtype)
  tensors = to_hf_tensors(config, params, dtype_name)

  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  staging = sibling_path(folder, "tmp")
  os.mkdir(staging)
  try:
    write_json(os.path.join(staging, CONFIG_FILE), config.to_hf(dtype=dtype_name))
    _write_weights(staging, tensors, shard_bytes)
    _write_extras(staging, tokenizer, generation_config, source_folder)
    move_into_place(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  logger.info("Saved %d tensors (%s) to %s", len(tensors), dtype_name, folder)


def save_merged(
    folder: str | os.PathLike,
    config: ModelConfig,
    params: Mapping[str, Any],
    *,
    dtype=None,
    **save_args,
) -> None:
  """Fold the adapters of `params` into their kernels and write the model folder.

  The merge `kernel + scale * a @ b` is computed in float32 from kernels
  widened to float32, and each tensor is cast once, to `dtype`, when written.

  Args:
    folder: the folder to create.
    config: the architecture of `params`.
    params: a tree with or without adapters.
    dtype: dtype of the saved weights; None keeps the dtype that most of the
      base parameters have (adapters, which are float32, do not count).
    **save_args: the other arguments of `save_pretrained`.
  """
  base = paths.filter_tree(params, lambda path: LORA not in path)
  dtype_name = _dominant_tree_dtype(base) if dtype is None else _saved_dtype(dtype)
  widened = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), params)
  save_pretrained(folder, config, jaxlora.merge(widened), dtype=dtype_name, **save_args)


def to_hf_tensors(config: ModelConfig, params: Mapping[str, Any], dtype_name: str) -> dict[str, np.ndarray]:
  """Return `{tensor name: array}`, one tensor per layer in the file's layout, cast to `dtype_name`."""
  adapted = [paths.module_name(path) for path, node in paths.iter_modules(params) if LORA in node]
  if adapted:
    raise ValueError(
        f"The parameters still contain LoRA adapters ({', '.join(adapted)})."
        " Call jaxlora.merge(params) first to fold them into the kernels, or"
        " save with jaxlora.models.save_merged."
    )
  if config.tie_word_embeddings and "lm_head" in params:
    raise ValueError(
        "config ties the output head to the token embedding, but the"
        " parameters have their own head (unexpected keys ['lm_head.kernel'])."
        " If the head was adapted or trained, untie it first with"
        " jaxlora.models.untie_output_head(config, params) and save with the"
        " untied config it returns, so that the embedding is left unchanged."
    )
  expected = expected_tensors(config)
  leaves = dict(paths.iter_leaves(params))
  check_keys(
      {paths.module_name(tensor.path) for tensor in expected.values()},
      {paths.module_name(p) for p in leaves},
      "The parameter tree does not match the config",
      "Pass the config that the parameters were built or loaded with.",
  )

  tensors = {}
  for key, tensor in expected.items():
    array = np.asarray(jax.device_get(leaves[tensor.path]))
    array = array if tensor.layer is None else array[tensor.layer]
    if tensor.transposed:
      array = array.T
    if array.shape != tensor.shape:
      raise ValueError(
          f"{paths.module_name(tensor.path)} has per-layer shape"
          f" {list(array.shape)} as stored, but config implies"
          f" {list(tensor.shape)} for {key}."
      )
    tensors[key] = np.ascontiguousarray(array.astype(dtype_name))
  return tensors


def parse_size(size: int | str) -> int:
  """Return a size in bytes from an int or a string such as "5GB", "200MB" or "1GiB".

  Raises:
    ValueError: if `size` is not a positive int or such a string.
  """
  if isinstance(size, int) and not isinstance(size, bool):
    number = size
  else:
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]I?B)\s*", str(size), flags=re.IGNORECASE)
    if match is None:
      raise ValueError(
          f"max_shard_size {size!r} is not a size. Use a number of bytes or a"
          " string such as '5GB', '500MB' or '2GiB'."
      )
    number = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
  if number <= 0:
    raise ValueError(f"max_shard_size must be positive, got {size!r}.")
  return number


def _dominant_tree_dtype(params):
  """Return the name of the floating dtype that most parameters of the tree have."""
  counts = collections.Counter()
  for _, leaf in paths.iter_leaves(params):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      counts[np.dtype(leaf.dtype).name] += int(np.prod(leaf.shape))
  if not counts:
    return "float32"
  return _saved_dtype(counts.most_common(1)[0][0])


def _saved_dtype(dtype):
  try:
    name = np.dtype(jnp.dtype(dtype)).name
  except TypeError:
    name = repr(dtype)
  if name not in SAVED_DTYPES:
    raise ValueError(
        f"Cannot save weights as {name}; use one of {', '.join(SAVED_DTYPES)}."
    )
  return name


def sibling_path(folder, role):
  """Return an unused hidden path beside `folder` for a temporary folder."""
  parent, base = os.path.split(folder)
  return os.path.join(parent, f".{base}.{role}-{uuid.uuid4().hex[:12]}")


def _write_weights(staging, tensors, shard_bytes):
  """Write one weights file, or shards and their index when over `shard_bytes`."""
  shards = [[]]
  size = 0
  for key in sorted(tensors):
    nbytes = tensors[key].nbytes
    if shards[-1] and size + nbytes > shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes

  if len(shards) == 1:
    safetensors.numpy.save_file(
        tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"}
    )
    return

  weight_map = {}
  for index, keys in enumerate(shards, start=1):
    name = SHARD_FILE.format(index=index, count=len(shards))
    shard = {key: tensors[key] for key in keys}
    safetensors.numpy.save_file(shard, os.path.join(staging, name), metadata={"format": "pt"})
    weight_map.update((key, name) for key in keys)
  total = sum(array.nbytes for array in tensors.values())
  write_json(
      os.path.join(staging, INDEX_FILE),
      {"metadata": {"total_size": total}, "weight_map": weight_map},
  )


def _write_extras(staging, tokenizer, generation_config, source_folder):
  if source_folder is not None:
    for name in COPIED_FILES:
      source = os.path.join(source_folder, name)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(staging, name))
  if generation_config is not None:
    if not isinstance(generation_config, Mapping):
      generation_config = generation_config.to_dict()
    write_json(os.path.join(staging, GENERATION_CONFIG_FILE), dict(generation_config))
  if tokenizer is not None:
    tokenizer.save_pretrained(staging)


def write_json(path, value, *, sort_keys=True):
  """Write `value` as indented JSON; callers write into a staging folder."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=sort_keys)
    f.write("\n")


def move_into_place(staging, folder):
  """Rename `staging` to `folder`, replacing an existing `folder`."""
  # safetensors writes its files readable by the owner only; a model folder is
  # shared like the other files in it.
  for name in os.listdir(staging):
    if name.endswith(".safetensors"):
      os.chmod(os.path.join(staging, name), 0o644)
  if not os.path.lexists(folder):
    os.rename(staging, folder)
    return

  aside = sibling_path(folder, "old")
  os.rename(folder, aside)
  try:
    os.rename(staging, folder)
  except OSError:
    os.rename(aside, folder)
    raise
  shutil.rmtree(aside)

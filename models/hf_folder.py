"""Reading and writing Hugging Face model folders of Llama checkpoints.

A folder contains `config.json` and the weights in `model.safetensors`, or in
shards listed by `model.safetensors.index.json`, optionally with
`generation_config.json` and tokenizer files. The file stores one tensor per
layer under torch's names, kernels as `[out, in]`:

    model.layers.3.self_attn.q_proj.weight [H*hd, D]
      <-> params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][3] [D, H*hd]

Loading is all-or-nothing: the file's keys must be exactly the keys that the
config implies (tied models store no `lm_head.weight`), with the implied
shapes. No torch is needed: tensors are read with safetensors' numpy backend,
which returns bfloat16 tensors as `ml_dtypes.bfloat16` arrays.
"""

import collections
import contextlib
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
import safetensors
import safetensors.numpy

from jaxlora import paths
from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import init_params
from jaxlora.models.loading import Pretrained

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAVED_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

_LAYER = r"model\.layers\.(?P<layer>\d+)\."
_ATTENTION = r"(?P<block>self_attn)\.(?P<module>[qkvo]_proj)"
_MLP = r"(?P<block>mlp)\.(?P<module>gate_proj|up_proj|down_proj)"

# Hugging Face key pattern (matched in full) -> tree path. `{name}` parts take
# the named group of the match, and a `layer` group picks the index on axis L.
KEY_RULES = tuple(
    (re.compile(pattern), path)
    for pattern, path in (
        (r"model\.embed_tokens\.weight", ("model", "embed_tokens", "embedding")),
        (r"model\.norm\.weight", ("model", "norm", "scale")),
        (r"lm_head\.weight", ("lm_head", "kernel")),
        (_LAYER + _ATTENTION + r"\.weight", ("model", "layers", "{block}", "{module}", "kernel")),
        (_LAYER + _ATTENTION + r"\.bias", ("model", "layers", "{block}", "{module}", "bias")),
        (_LAYER + _MLP + r"\.weight", ("model", "layers", "{block}", "{module}", "kernel")),
        (_LAYER + _MLP + r"\.bias", ("model", "layers", "{block}", "{module}", "bias")),
        (
            _LAYER + r"(?P<norm>input_layernorm|post_attention_layernorm)\.weight",
            ("model", "layers", "{norm}", "scale"),
        ),
    )
)

# Buffers that some checkpoints store but that are recomputed from the config.
IGNORED_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def parse_key(key: str) -> tuple[paths.Path, int | None] | None:
  """Return `(tree path, layer index or None)` of a Hugging Face key, or None."""
  for pattern, template in KEY_RULES:
    match = pattern.fullmatch(key)
    if match is None:
      continue
    groups = match.groupdict()
    path = tuple(part.format(**groups) for part in template)
    layer = int(groups["layer"]) if "layer" in groups else None
    return path, layer
  return None


def hf_key(path: paths.Path, layer: int | None) -> str:
  """Return the Hugging Face key of the leaf at `path` (layer `layer` if stacked)."""
  modules = list(path[:-1])
  if layer is not None:
    modules.insert(modules.index("layers") + 1, str(layer))
  return ".".join(modules + [_LEAF_TO_HF[path[-1]]])


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[paths.Path, int | None, tuple[int, ...]]]:
  """Return `{hf key: (tree path, layer, stored shape)}` for a checkpoint of `config`.

  The stored shape is torch's: a kernel `[in, out]` is stored `[out, in]`.
  """
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  out = {}
  for path, leaf in paths.iter_leaves(shapes):
    stacked = "layers" in path
    shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
    if path[-1] == "kernel":
      shape = shape[::-1]
    layers = range(config.num_hidden_layers) if stacked else [None]
    for layer in layers:
      out[hf_key(path, layer)] = (path, layer, shape)
  return out


def load_folder(folder: str, *, dtype=None) -> Pretrained:
  """Load a Hugging Face model folder; see `jaxlora.models.load`."""
  config_path = os.path.join(folder, CONFIG_FILE)
  if not os.path.isdir(folder) or not os.path.isfile(config_path):
    raise ValueError(
        f"{folder!r} is not a Hugging Face model folder: {CONFIG_FILE} not"
        f" found. Expected a folder with {CONFIG_FILE} and {WEIGHTS_FILE} (or"
        f" {INDEX_FILE} and its shards), or a .gguf file."
    )
  config = LlamaConfig.from_hf(_read_json(config_path))

  with contextlib.ExitStack() as stack:
    handles = _open_weights(folder, stack)
    params, source_dtype = _read_params(config, handles, dtype)

  generation_path = os.path.join(folder, GENERATION_CONFIG_FILE)
  generation_config = None
  if os.path.isfile(generation_path):
    generation_config = _read_json(generation_path)

  logger.info(
      "Loaded %s (%d layers, %s weights)", folder, config.num_hidden_layers, source_dtype
  )
  return Pretrained(
      config=config,
      params=params,
      tokenizer=_load_tokenizer(folder),
      generation_config=generation_config,
      source_dtype=source_dtype,
      path=folder,
  )


def _read_json(path):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(
        f"{path} is not valid JSON ({error}). Restore the file from the"
        " model's source."
    ) from None


def _open_weights(folder, stack):
  """Return `{hf key: open safetensors file}` for every tensor in the folder."""
  index_path = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index_path):
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, Mapping):
      raise ValueError(
          f"{index_path} has no 'weight_map' dict. Restore the index file"
          " written with the shards."
      )
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
    weight_map = None
    files = [WEIGHTS_FILE]
  else:
    raise ValueError(
        f"Folder {folder!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE}."
        " Only safetensors weights are read. Convert other formats with"
        " transformers' save_pretrained(..., safe_serialization=True)."
    )

  handles = {}
  for name in files:
    handle = _open_safetensors(os.path.join(folder, name), stack)
    for key in handle.keys():
      handles[key] = handle
  if weight_map is not None:
    _check_index(index_path, weight_map, handles)
  return handles


def _open_safetensors(path, stack):
  if not os.path.isfile(path):
    raise ValueError(
        f"Weights file {path} not found. Download the missing file of the"
        " checkpoint."
    )
  try:
    return stack.enter_context(safetensors.safe_open(path, framework="np"))
  except safetensors.SafetensorError as error:
    raise ValueError(
        f"{path} is truncated or corrupt and cannot be read ({error})."
        " Download the file again."
    ) from None


def _check_index(index_path, weight_map, handles):
  listed_only = sorted(set(weight_map) - set(handles))
  if listed_only:
    raise ValueError(
        f"{index_path} lists tensors that its shards do not contain:"
        f" {listed_only}. Download the checkpoint again."
    )


def _read_params(config, handles, dtype):
  """Return `(params, source dtype)`, checking keys and shapes first."""
  expected = expected_tensors(config)
  keys = _drop_tied_head(config, handles)
  _check_keys(
      set(expected), keys,
      "The checkpoint's tensors do not match config.json",
      "Check that config.json belongs to these weights.",
  )
  _check_shapes(expected, handles)

  groups = collections.defaultdict(dict)
  for key, (path, layer, _) in expected.items():
    groups[path][layer] = key

  target = None if dtype is None else _loaded_dtype(dtype)
  params = {}
  for path, by_layer in groups.items():
    value = _read_leaf(path, by_layer, handles, target)
    _set(params, path, jnp.asarray(value))
  return params, _dominant_dtype(expected, handles)


def _loaded_dtype(dtype):
  try:
    target = jnp.dtype(dtype)
  except TypeError:
    target = None
  if target is None or not jnp.issubdtype(target, jnp.floating):
    raise ValueError(
        f"dtype {dtype!r} is not a floating-point dtype. Pass None to keep"
        " the stored dtype, or a dtype such as jnp.float32 or 'bfloat16'."
    )
  return target


def _drop_tied_head(config, handles):
  """Return the file's keys, without an `lm_head.weight` that repeats the embedding."""
  keys = {key for key in handles if not IGNORED_KEYS.fullmatch(key)}
  if not config.tie_word_embeddings or "lm_head.weight" not in keys:
    return keys

  head = handles["lm_head.weight"].get_tensor("lm_head.weight")
  embedding = handles["model.embed_tokens.weight"].get_tensor("model.embed_tokens.weight")
  if head.shape != embedding.shape or not np.array_equal(head, embedding):
    raise ValueError(
        "config.json sets tie_word_embeddings=true, but lm_head.weight differs"
        " from model.embed_tokens.weight. Set tie_word_embeddings to false to"
        " load the separate output head."
    )
  return keys - {"lm_head.weight"}


def _check_keys(expected, present, problem, fix):
  missing = sorted(expected - present)
  unexpected = sorted(present - expected)
  if missing or unexpected:
    raise ValueError(
        f"{problem}: missing keys {missing or 'none'}; unexpected keys"
        f" {unexpected or 'none'}. {fix}"
    )


def _check_shapes(expected, handles):
  for key, (_, _, shape) in sorted(expected.items()):
    actual = tuple(handles[key].get_slice(key).get_shape())
    if actual != shape:
      raise ValueError(
          f"Tensor {key} has shape {list(actual)}, but config.json implies"
          f" {list(shape)}. Check that config.json belongs to these weights."
      )


def _read_leaf(path, by_layer, handles, target):
  """Return one leaf of the tree, stacked on axis L when it is per layer."""
  arrays = []
  for _, key in sorted(by_layer.items(), key=lambda item: item[0] or 0):
    try:
      array = handles[key].get_tensor(key)
    except safetensors.SafetensorError as error:
      raise ValueError(
          f"Tensor {key} cannot be read ({error}); the file is truncated or"
          " corrupt. Download the checkpoint again."
      ) from None
    if path[-1] == "kernel":
      array = array.T
    if target is not None:
      array = array.astype(target)
    arrays.append(array)

  if None in by_layer:
    return arrays[0]
  return np.stack(arrays)


def _dominant_dtype(expected, handles):
  """Return the name of the dtype that the largest number of stored parameters have."""
  counts = collections.Counter()
  for key, (_, _, shape) in expected.items():
    counts[handles[key].get_slice(key).get_dtype()] += int(np.prod(shape))
  name = counts.most_common(1)[0][0]
  return _SAFETENSORS_DTYPES.get(name, name.lower())


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _load_tokenizer(folder):
  if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
    return None
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.AutoTokenizer.from_pretrained(folder)


def save_pretrained(
    folder: str | os.PathLike,
    config: LlamaConfig,
    params: Mapping[str, Any],
    *,
    tokenizer=None,
    generation_config=None,
    dtype=None,
    overwrite: bool = False,
) -> None:
  """Write a Hugging Face model folder that transformers loads.

  Everything is written to a temporary sibling folder first and then renamed
  to `folder`, so an interrupted save leaves no half-written model behind.

  Args:
    folder: the folder to create.
    config: the architecture of `params`.
    params: a plain tree without adapters; call `jaxlora.merge` first.
    tokenizer: a transformers tokenizer to save beside the weights, or None.
    generation_config: a dict (or a transformers `GenerationConfig`) written
      to `generation_config.json`, or None.
    dtype: dtype of the saved weights, such as "bfloat16"; float32 if None.
      Each tensor is cast once.
    overwrite: replace an existing `folder`; without it an existing folder
      raises.

  Raises:
    ValueError: if `params` contains adapters, does not match `config`, or
      `folder` exists and `overwrite` is False.
  """
  folder = os.path.abspath(os.fspath(folder))
  if os.path.lexists(folder) and not overwrite:
    raise ValueError(
        f"{folder} already exists. Pass overwrite=True to replace it, or"
        " choose another folder."
    )
  if os.path.lexists(folder) and not os.path.isdir(folder):
    raise ValueError(f"{folder} exists and is not a folder; remove it first.")
  dtype_name = _saved_dtype(dtype)
  tensors = to_hf_tensors(config, params, dtype_name)

  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  staging = _sibling(folder, "tmp")
  os.mkdir(staging)
  try:
    _write_folder(staging, config, tensors, dtype_name, tokenizer, generation_config)
    _move_into_place(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  logger.info("Saved %d tensors (%s) to %s", len(tensors), dtype_name, folder)


def to_hf_tensors(config: LlamaConfig, params: Mapping[str, Any], dtype_name: str) -> dict[str, np.ndarray]:
  """Return `{hf key: array}`, one `[out, in]` tensor per layer, cast to `dtype_name`."""
  adapted = [paths.module_name(path) for path, node in paths.iter_modules(params) if "lora" in node]
  if adapted:
    raise ValueError(
        f"The parameters still contain LoRA adapters ({', '.join(adapted)})."
        " Call jaxlora.merge(params) first to fold them into the kernels."
    )
  expected = expected_tensors(config)
  leaves = dict(paths.iter_leaves(params))
  expected_paths = {path for path, _, _ in expected.values()}
  _check_keys(
      {paths.module_name(p) for p in expected_paths},
      {paths.module_name(p) for p in leaves},
      "The parameter tree does not match the config",
      "Pass the config that the parameters were built or loaded with.",
  )

  tensors = {}
  for key, (path, layer, shape) in expected.items():
    array = np.asarray(jax.device_get(leaves[path]))
    array = array if layer is None else array[layer]
    if path[-1] == "kernel":
      array = array.T
    if array.shape != shape:
      raise ValueError(
          f"{paths.module_name(path)} has per-layer shape {list(array.shape)}"
          f" as stored, but config implies {list(shape)} for {key}."
      )
    tensors[key] = np.ascontiguousarray(array.astype(dtype_name))
  return tensors


def _saved_dtype(dtype):
  if dtype is None:
    return "float32"
  try:
    name = np.dtype(jnp.dtype(dtype)).name
  except TypeError:
    name = repr(dtype)
  if name not in SAVED_DTYPES:
    raise ValueError(
        f"Cannot save weights as {name}; use one of {', '.join(SAVED_DTYPES)}."
    )
  return name


def _sibling(folder, role):
  """Return an unused hidden path beside `folder` for a temporary folder."""
  parent, base = os.path.split(folder)
  return os.path.join(parent, f".{base}.{role}-{uuid.uuid4().hex[:12]}")


def _write_folder(staging, config, tensors, dtype_name, tokenizer, generation_config):
  _write_json(os.path.join(staging, CONFIG_FILE), config.to_hf(dtype=dtype_name))
  safetensors.numpy.save_file(
      tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"}
  )
  if generation_config is not None:
    if not isinstance(generation_config, Mapping):
      generation_config = generation_config.to_dict()
    _write_json(os.path.join(staging, GENERATION_CONFIG_FILE), dict(generation_config))
  if tokenizer is not None:
    tokenizer.save_pretrained(staging)


def _write_json(path, value):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def _move_into_place(staging, folder):
  """Rename `staging` to `folder`, replacing an existing `folder`."""
  if not os.path.lexists(folder):
    os.rename(staging, folder)
    return

  aside = _sibling(folder, "old")
  os.rename(folder, aside)
  try:
    os.rename(staging, folder)
  except OSError:
    os.rename(aside, folder)
    raise
  shutil.rmtree(aside)

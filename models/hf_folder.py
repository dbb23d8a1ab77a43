"""Reading Hugging Face model folders (`jaxlora.models.hf_writer` writes them).

A folder contains `config.json` and the weights in `model.safetensors`, or in
shards listed by `model.safetensors.index.json`, optionally with
`generation_config.json`, tokenizer files and a chat template. The file
stores one tensor per layer under transformers' names. The architecture's key
table (`jaxlora.models.architectures`) maps each name to a leaf of our tree,
and records whether the file stores it transposed, as torch's `nn.Linear` does:

    model.layers.3.self_attn.q_proj.weight [H*hd, D]
      <-> params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][3] [D, H*hd]
    transformer.h.3.attn.c_attn.weight [D, 3D]     (GPT-2's Conv1D, not transposed)
      <-> params["transformer"]["h"]["attn"]["c_attn"]["kernel"][3] [D, 3D]

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
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from jaxlora import paths
from jaxlora.config import LAYER_CONTAINERS
from jaxlora.models.architectures import (
    ModelConfig, architecture, config_from_hf, hf_key, init_params,
)
from jaxlora.models.loading import Pretrained

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

class Tensor(NamedTuple):
  """The tree location and the stored shape of one checkpoint tensor."""

  path: paths.Path
  layer: int | None
  shape: tuple[int, ...]
  transposed: bool


def expected_tensors(config: ModelConfig) -> dict[str, Tensor]:
  """Return `{tensor name: Tensor}` for a checkpoint of `config`.

  The stored shape is the file's: a transposed kernel `[in, out]` is stored
  `[out, in]`.
  """
  arch = architecture(config.model_type)
  shapes = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
  out = {}
  for path, leaf in paths.iter_leaves(shapes):
    stacked = any(part in LAYER_CONTAINERS for part in path)
    layers = range(config.num_hidden_layers) if stacked else [None]
    for layer in layers:
      key = hf_key(path, layer)
      parsed = arch.parse_key(key)
      if parsed is None or parsed[:2] != (path, layer):
        raise RuntimeError(
            f"The {arch.model_type} key table maps {key} to {parsed}, not back"
            f" to {paths.module_name(path)} layer {layer}."
        )
      shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
      transposed = parsed[2]
      out[key] = Tensor(path, layer, shape[::-1] if transposed else shape, transposed)
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
  config = config_from_hf(read_json(config_path))

  with contextlib.ExitStack() as stack:
    stored = _open_weights(folder, stack)
    params, source_dtype = _read_params(config, stored, dtype)

  generation_path = os.path.join(folder, GENERATION_CONFIG_FILE)
  generation_config = None
  if os.path.isfile(generation_path):
    generation_config = read_json(generation_path)

  logger.info(
      "Loaded %s (%s, %d layers, %s weights)",
      folder, config.model_type, config.num_hidden_layers, source_dtype,
  )
  return Pretrained(
      config=config,
      params=params,
      tokenizer=_load_tokenizer(folder),
      generation_config=generation_config,
      source_dtype=source_dtype,
      path=folder,
  )


def read_json(path):
  """Return the JSON object in the file at `path`.

  Raises:
    ValueError: if the file is not UTF-8 JSON, or contains something other
      than an object.
  """
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(
        f"{path} is not valid UTF-8 JSON ({error}). Restore the file from the"
        " model's source."
    ) from None
  if not isinstance(value, dict):
    raise ValueError(
        f"{path} contains a JSON {type(value).__name__}, but a JSON object is"
        " expected. Restore the file from the model's source."
    )
  return value


class _StoredTensors:
  """The tensors of a folder's safetensors files, by name, read lazily."""

  def __init__(self, handles: Mapping[str, Any]):
    self._handles = dict(handles)

  def keys(self) -> set[str]:
    return set(self._handles)

  def shape(self, key):
    return tuple(self._handles[key].get_slice(key).get_shape())

  def dtype_name(self, key):
    return self._handles[key].get_slice(key).get_dtype()

  def get(self, key):
    try:
      return self._handles[key].get_tensor(key)
    except safetensors.SafetensorError as error:
      raise ValueError(
          f"Tensor {key} cannot be read ({error}); the file is truncated or"
          " corrupt. Download the checkpoint again."
      ) from None

  def renamed(self, names: Mapping[str, str]) -> "_StoredTensors":
    """Return a view whose tensor `names[key]` reads the stored tensor `key`."""
    view = _StoredTensors({})
    view._handles = {names[key]: _Renamed(handle, key) for key, handle in self._handles.items()}
    return view

  def without(self, drop) -> "_StoredTensors":
    return _StoredTensors({k: h for k, h in self._handles.items() if not drop(k)})


class _Renamed:
  """A safetensors handle that serves one tensor under another name."""

  def __init__(self, handle, key):
    self._handle, self._key = handle, key

  def get_slice(self, _):
    return self._handle.get_slice(self._key)

  def get_tensor(self, _):
    return self._handle.get_tensor(self._key)


def _open_weights(folder, stack) -> _StoredTensors:
  """Return every tensor in the folder's safetensors files."""
  index_path = os.path.join(folder, INDEX_FILE)
  if os.path.isfile(index_path):
    weight_map = read_json(index_path).get("weight_map")
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
  return _StoredTensors(handles)


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


def _read_params(config, stored, dtype):
  """Return `(params, source dtype)`, checking keys and shapes first."""
  arch = architecture(config.model_type)
  expected = expected_tensors(config)
  stored = _canonical_names(arch, stored)
  keys = _drop_tied_head(config, arch, stored)
  check_keys(
      set(expected), keys,
      "The checkpoint's tensors do not match config.json",
      "Check that config.json belongs to these weights.",
  )
  _check_shapes(expected, stored)

  groups = collections.defaultdict(dict)
  for key, tensor in expected.items():
    groups[tensor.path][tensor.layer] = key

  target = None if dtype is None else _loaded_dtype(dtype)
  params = {}
  for path, by_layer in groups.items():
    value = _read_leaf(by_layer, expected, stored, target)
    _set(params, path, jnp.asarray(value))
  return params, _dominant_dtype(expected, stored)


def _canonical_names(arch, stored):
  """Drop ignored buffers, and add the base prefix to names saved without it."""
  if arch.ignored_keys is not None:
    stored = stored.without(arch.ignored_keys.fullmatch)
  prefix = arch.base_prefix
  if prefix is None or any(key.split(".", 1)[0] == prefix for key in stored.keys()):
    return stored
  if arch.ignored_keys is not None:
    stored = stored.without(lambda key: arch.ignored_keys.fullmatch(f"{prefix}.{key}"))
  names = {
      key: key if key == "lm_head.weight" else f"{prefix}.{key}" for key in stored.keys()
  }
  return stored.renamed(names)


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


def _drop_tied_head(config, arch, stored):
  """Return the file's keys, without an `lm_head.weight` that repeats the embedding."""
  keys = stored.keys()
  if not config.tie_word_embeddings or "lm_head.weight" not in keys:
    return keys

  head = stored.get("lm_head.weight")
  embedding = stored.get(arch.embedding_key)
  if head.shape != embedding.shape or not np.array_equal(head, embedding):
    raise ValueError(
        f"config.json sets tie_word_embeddings=true, but lm_head.weight differs"
        f" from {arch.embedding_key}. Set tie_word_embeddings to false to"
        " load the separate output head."
    )
  return keys - {"lm_head.weight"}


def check_keys(expected, present, problem, fix):
  missing = sorted(expected - present)
  unexpected = sorted(present - expected)
  if missing or unexpected:
    raise ValueError(
        f"{problem}: missing keys {missing or 'none'}; unexpected keys"
        f" {unexpected or 'none'}. {fix}"
    )


def _check_shapes(expected, stored):
  for key, tensor in sorted(expected.items()):
    actual = stored.shape(key)
    if actual != tensor.shape:
      raise ValueError(
          f"Tensor {key} has shape {list(actual)}, but config.json implies"
          f" {list(tensor.shape)}. Check that config.json belongs to these weights."
      )


def _read_leaf(by_layer, expected, stored, target):
  """Return one leaf of the tree, stacked on axis L when it is per layer."""
  arrays = []
  for _, key in sorted(by_layer.items(), key=lambda item: item[0] or 0):
    array = stored.get(key)
    if expected[key].transposed:
      array = array.T
    if target is not None:
      array = array.astype(target)
    arrays.append(array)

  if None in by_layer:
    return arrays[0]
  return np.stack(arrays)


def _dominant_dtype(expected, stored):
  """Return the name of the dtype that the largest number of stored parameters have."""
  counts = collections.Counter()
  for key, tensor in expected.items():
    counts[stored.dtype_name(key)] += int(np.prod(tensor.shape))
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

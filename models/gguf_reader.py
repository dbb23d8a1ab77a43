"""Loading a Llama model from a GGUF file into the parameter tree.

A GGUF file contains metadata (the architecture's sizes under `llama.*`, the
tokenizer under `tokenizer.*`) and tensors named the llama.cpp way, possibly
quantized. `load_gguf` reads the metadata into a `LlamaConfig`, dequantizes
every tensor to float32 and files it under its Hugging Face name:

    token_embd.weight       [V, D]     -> model.embed_tokens.embedding  [V, D]
    blk.N.attn_q.weight     [H*hd, D]  -> model.layers.self_attn.q_proj.kernel  [L, D, H*hd]
    blk.N.ffn_down.weight   [D, F]     -> model.layers.mlp.down_proj.kernel     [L, F, D]
    output_norm.weight      [D]        -> model.norm.scale  [D]
    output.weight           [V, D]     -> lm_head.kernel    [D, V]   (absent when tied)

Shapes on the left are in numpy order, outermost first, while the GGUF header
lists the same dimensions innermost first. Projection weights are stored `[out, in]`
like torch's, so each is transposed to `[in, out]`, and the layers are stacked
on a leading axis L.

Rotary layout. Hugging Face's Llama rotates the pairs `(i, i + hd/2)` of each
head, llama.cpp rotates adjacent pairs `(2i, 2i + 1)`, both with frequency i.
The converter that writes GGUF files therefore reorders the rows of each q and
k head so that GGUF row `2i + s` is Hugging Face row `s * hd/2 + i` (s = 0, 1).
`undo_rotary_permutation` maps the rows back.
"""

import logging
import os
import re
import time
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import tqdm
from gguf import quants

from jaxlora import paths
from jaxlora.models.config import LlamaConfig
from jaxlora.models.loading import Pretrained

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"

# Tensors of decoder layer N, `blk.N.<name>`, and where they go in the tree
# below `model.layers`.
LAYER_TENSORS = {
    "attn_q.weight": ("self_attn", "q_proj", "kernel"),
    "attn_k.weight": ("self_attn", "k_proj", "kernel"),
    "attn_v.weight": ("self_attn", "v_proj", "kernel"),
    "attn_output.weight": ("self_attn", "o_proj", "kernel"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
    "attn_norm.weight": ("input_layernorm", "scale"),
    "ffn_norm.weight": ("post_attention_layernorm", "scale"),
}
# Tensors outside the layers and where they go in the tree.
GLOBAL_TENSORS = {
    "token_embd.weight": ("model", "embed_tokens", "embedding"),
    "output_norm.weight": ("model", "norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")
_EMBEDDING = "token_embd.weight"
_OUTPUT = "output.weight"

# A progress bar appears only when dequantizing runs longer than this.
_PROGRESS_DELAY_S = 2.0

_REQUIRED = object()


def load_gguf(path: str | os.PathLike, *, dtype=None) -> Pretrained:
  """Load a Llama model, its tokenizer and its token ids from a GGUF file.

  Args:
    path: the `.gguf` file.
    dtype: dtype of the returned parameters. None keeps float32, the dtype
      that quantized tensors are dequantized to.

  Returns:
    A `Pretrained` whose `source_dtype` is "float32" and whose
    `generation_config` contains only the bos and eos token ids.

  Raises:
    ValueError: if the file is missing, is not a GGUF file or is truncated,
      contains an architecture other than Llama, or its tensors do not match
      its metadata (missing, unexpected or misshapen tensors).
  """
  path = os.fspath(path)
  start = time.perf_counter()
  reader = _open(path)
  config = read_config(reader, path)

  dequantize_start = time.perf_counter()
  params = _read_params(reader, config, path, jnp.dtype(dtype or jnp.float32))
  dequantize_s = time.perf_counter() - dequantize_start
  tokenizer = _load_tokenizer(reader, path)

  # NOTE: a GGUF file has no generation_config.json, so sampling settings
  # (temperature, top_p, ...) are not available. Only the special token ids are.
  generation_config = {
      name: value
      for name, value in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id))
      if value is not None
  }
  count = sum(leaf.size for _, leaf in paths.iter_leaves(params))
  logger.info(
      "Loaded %s: %d parameters (%.1f M) in %.1f s, of which %.1f s dequantizing.",
      path, count, count / 1e6, time.perf_counter() - start, dequantize_s,
  )
  return Pretrained(
      config=config,
      params=params,
      tokenizer=tokenizer,
      generation_config=generation_config or None,
      source_dtype="float32",
      path=path,
  )


def read_config(reader: gguf.GGUFReader, path: str = "") -> LlamaConfig:
  """Build a `LlamaConfig` from the `llama.*` and `tokenizer.ggml.*` metadata.

  `vocab_size` is the row count of `token_embd.weight`, and the embeddings are
  tied when the file has no `output.weight` tensor.

  Raises:
    ValueError: if the architecture is not Llama, a required key is missing,
      or the file requests a rotary scaling that this model does not implement.
  """
  architecture = _field(reader, path, "general.architecture")
  if architecture not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
        f"GGUF file {path} contains a {architecture!r} model, which is not"
        f" supported. Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}."
    )

  def arch(key, default=_REQUIRED):
    return _field(reader, path, f"{architecture}.{key}", default)

  hidden_size = int(arch("embedding_length"))
  num_heads = int(arch("attention.head_count"))
  if num_heads <= 0:
    raise ValueError(
        f"GGUF file {path} has {architecture}.attention.head_count={num_heads},"
        " but it must be a positive integer. The file's metadata is corrupt."
    )
  rotary_dim = arch("rope.dimension_count", hidden_size // num_heads)
  head_dim = int(arch("attention.key_length", rotary_dim))
  _check_head_dim(reader, path, architecture, head_dim)
  tensors = {tensor.name: tensor for tensor in reader.tensors}
  if _EMBEDDING not in tensors:
    raise ValueError(
        f"GGUF file {path} has no {_EMBEDDING} tensor, so its vocabulary size"
        " is unknown. Use a complete GGUF file of a Llama model."
    )

  def token_id(name):
    value = _field(reader, path, f"tokenizer.ggml.{name}", None)
    return None if value is None else int(value)

  return LlamaConfig(
      vocab_size=int(_numpy_shape(tensors[_EMBEDDING])[0]),
      hidden_size=hidden_size,
      intermediate_size=int(arch("feed_forward_length")),
      num_hidden_layers=int(arch("block_count")),
      num_attention_heads=num_heads,
      num_key_value_heads=int(arch("attention.head_count_kv", num_heads)),
      head_dim=head_dim,
      max_position_embeddings=int(arch("context_length")),
      rms_norm_eps=float(arch("attention.layer_norm_rms_epsilon")),
      rope_theta=float(arch("rope.freq_base", 10000.0)),
      rope_scaling=_rope_scaling(reader, path, architecture),
      tie_word_embeddings=_OUTPUT not in tensors,
      bos_token_id=token_id("bos_token_id"),
      eos_token_id=token_id("eos_token_id"),
      pad_token_id=token_id("padding_token_id"),
  )


def undo_rotary_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Reorder q or k projection rows from llama.cpp's rotary layout to Hugging Face's.

  Within each head of width hd, GGUF row `2i + s` becomes row `s * hd/2 + i`
  (s = 0, 1), so that the pairs rotated together move from `(2i, 2i + 1)` to
  `(i, i + hd/2)`.

  Args:
    weight: `[num_heads * hd, ...]`, the rows of a q (H heads) or k (K heads)
      projection, or its bias.
    num_heads: the number of heads that the rows contain.

  Returns:
    An array of the same shape with the rows reordered.

  Raises:
    ValueError: if the rows do not split into `num_heads` heads of even width.
  """
  rows, rest = weight.shape[0], weight.shape[1:]
  if rows % (2 * num_heads):
    raise ValueError(
        f"Cannot split {rows} rows into {num_heads} rotary heads of even"
        " width. Pass the head count of this projection (H for q, K for k)."
    )
  half = rows // num_heads // 2
  by_pair = weight.reshape(num_heads, half, 2, *rest)
  return np.swapaxes(by_pair, 1, 2).reshape(rows, *rest)


def _open(path: str) -> gguf.GGUFReader:
  """Open a GGUF file, turning every way the file can be unusable into ValueError."""
  if not os.path.isfile(path):
    raise ValueError(
        f"GGUF file {path} does not exist or is not a file. Pass the path of a"
        " .gguf file (jaxlora.models.smollm2.fetch_smollm2() downloads one)."
    )
  with open(path, "rb") as file:
    magic = file.read(len(GGUF_MAGIC))
  if magic != GGUF_MAGIC:
    raise ValueError(
        f"{path} is not a GGUF file: it starts with {magic!r} instead of"
        f" {GGUF_MAGIC!r}. Pass a .gguf file written by llama.cpp's converter."
    )
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, TypeError, OverflowError) as error:
    raise ValueError(
        f"GGUF file {path} is truncated or corrupt and could not be parsed"
        f" ({type(error).__name__}: {error}). Download or copy it again."
    ) from error


def _field(reader, path, key, default=_REQUIRED):
  """Return the value of metadata key `key`, or `default` when it is absent."""
  field = reader.get_field(key)
  if field is None:
    if default is _REQUIRED:
      raise ValueError(
          f"GGUF file {path} lacks the metadata key {key!r}, which a Llama"
          " model needs. The file is incomplete or was written for another"
          " architecture."
      )
    return default
  return field.contents()


def _check_head_dim(reader, path, architecture, head_dim):
  value_dim = _field(reader, path, f"{architecture}.attention.value_length", head_dim)
  rotary_dim = _field(reader, path, f"{architecture}.rope.dimension_count", head_dim)
  if value_dim != head_dim or rotary_dim != head_dim:
    raise ValueError(
        f"GGUF file {path} has key width {head_dim}, value width {value_dim}"
        f" and rotary width {rotary_dim}, but this Llama model needs all three"
        " equal (full-width rotary embeddings)."
    )


def _rope_scaling(reader, path, architecture):
  """Return the `rope_scaling` dict for the file's rotary scaling, or None."""
  kind = _field(reader, path, f"{architecture}.rope.scaling.type", "none")
  if kind == "none":
    return None
  if kind == "linear":
    return {"rope_type": "linear", "factor": float(_field(reader, path, f"{architecture}.rope.scaling.factor"))}
  raise ValueError(
      f"GGUF file {path} uses rotary scaling {kind!r}, which is not supported."
      " Supported rotary scalings from GGUF: none, linear."
  )


def _numpy_shape(tensor) -> tuple[int, ...]:
  """Return a tensor's shape outermost first (the GGUF header lists it innermost first)."""
  return tuple(int(size) for size in reversed(tensor.shape))


def _expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Return each tensor's expected shape in numpy order, by GGUF name (layer 0 for layers)."""
  d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  q = config.num_attention_heads * config.head_dim
  kv = config.num_key_value_heads * config.head_dim
  layer = {
      "attn_q.weight": (q, d),
      "attn_k.weight": (kv, d),
      "attn_v.weight": (kv, d),
      "attn_output.weight": (d, q),
      "ffn_gate.weight": (f, d),
      "ffn_up.weight": (f, d),
      "ffn_down.weight": (d, f),
      "attn_norm.weight": (d,),
      "ffn_norm.weight": (d,),
  }
  shapes = {f"blk.{n}.{name}": shape for n in range(config.num_hidden_layers) for name, shape in layer.items()}
  shapes[_EMBEDDING] = (v, d)
  shapes["output_norm.weight"] = (d,)
  if not config.tie_word_embeddings:
    shapes[_OUTPUT] = (v, d)
  return shapes


def _check_names(reader, config, path):
  """Raise unless the file's tensor names are exactly the expected ones."""
  expected = _expected_shapes(config)
  found = {tensor.name for tensor in reader.tensors}
  missing = sorted(expected.keys() - found)
  unexpected = sorted(found - expected.keys())
  if missing or unexpected:
    raise ValueError(
        f"GGUF file {path} does not match its {config.num_hidden_layers}-layer"
        f" Llama metadata. Missing tensors: {', '.join(missing) or 'none'}."
        f" Unexpected tensors: {', '.join(unexpected) or 'none'}."
        # NOTE: bias tensors (blk.N.attn_q.bias, ...) and llama3's rope_freqs
        # are not read, so a file that has them is rejected here.
        " Only Llama models without biases and with default or linear rotary"
        " scaling load from GGUF."
    )

  for tensor in reader.tensors:
    shape = _numpy_shape(tensor)
    if shape != expected[tensor.name]:
      raise ValueError(
          f"GGUF tensor {tensor.name} in {path} has shape {shape}, expected"
          f" {expected[tensor.name]} from the file's metadata. The file is"
          " corrupt or was written for another architecture."
      )


def _target(name: str) -> tuple[tuple[str, ...], int | None]:
  """Return the tree path and layer index (None outside the layers) of GGUF tensor `name`."""
  if name in GLOBAL_TENSORS:
    return GLOBAL_TENSORS[name], None
  match = _LAYER_NAME.fullmatch(name)
  return ("model", "layers", *LAYER_TENSORS[match.group(2)]), int(match.group(1))


def _read_params(reader, config, path, dtype) -> dict[str, Any]:
  """Dequantize every tensor into the stacked parameter tree."""
  _check_names(reader, config, path)
  heads = {"attn_q.weight": config.num_attention_heads, "attn_k.weight": config.num_key_value_heads}
  num_layers = config.num_hidden_layers

  leaves = {}
  progress = tqdm.tqdm(
      reader.tensors, desc="Dequantizing GGUF tensors", unit="tensor",
      delay=_PROGRESS_DELAY_S, leave=False,
  )
  for tensor in progress:
    array = _dequantize(tensor, path)
    tree_path, layer = _target(tensor.name)
    short_name = tensor.name.split(".", 2)[-1] if layer is not None else tensor.name
    if short_name in heads:
      array = undo_rotary_permutation(array, heads[short_name])
    if tree_path[-1] == "kernel":
      array = array.T

    if layer is None:
      leaves[tree_path] = array.astype(dtype)
      continue
    if tree_path not in leaves:
      leaves[tree_path] = np.empty((num_layers, *array.shape), dtype)
    leaves[tree_path][layer] = array

  params = {}
  for tree_path in sorted(leaves):
    node = params
    for key in tree_path[:-1]:
      node = node.setdefault(key, {})
    node[tree_path[-1]] = jnp.asarray(leaves.pop(tree_path))
  return params


def _dequantize(tensor, path) -> np.ndarray:
  """Return a tensor as float32 in numpy order, `[out, in]` for a projection."""
  try:
    array = quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError as error:
    raise ValueError(
        f"GGUF tensor {tensor.name} in {path} is stored as"
        f" {tensor.tensor_type.name}, which the installed gguf package cannot"
        f" dequantize ({error}). Use a file quantized with another type."
    ) from error
  return np.asarray(array, np.float32).reshape(_numpy_shape(tensor))


def _load_tokenizer(reader, path):
  """Return the transformers tokenizer stored in the file, or None if it has none."""
  if reader.get_field("tokenizer.ggml.tokens") is None:
    logger.info("GGUF file %s has no tokenizer.", path)
    return None
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  folder, name = os.path.split(os.path.abspath(path))
  return AutoTokenizer.from_pretrained(folder, gguf_file=name)


"""One entry point that loads a pretrained model from a folder or a GGUF file.

    load("path/to/hf_folder")   -> config.json + model.safetensors (or shards)
    load("path/to/model.gguf")  -> a GGUF file, dequantized
"""

import dataclasses
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"


@dataclasses.dataclass
class Pretrained:
  """A loaded model and what came with it.

  Attributes:
    config: the architecture, a `LlamaConfig` (Llama family) or `Gpt2Config`.
    params: the parameter tree (see `jaxlora.models.llama` and
      `jaxlora.models.gpt2` for the layouts).
    tokenizer: a transformers tokenizer, or None when the source has none.
    generation_config: the `generation_config.json` dict, or None.
    source_dtype: dtype of the stored weights, such as "float32" or
      "bfloat16"; for a GGUF file, its quantization type name.
    path: the folder or file the model was loaded from.
  """

  config: Any
  params: dict[str, Any]
  tokenizer: Any = None
  generation_config: dict[str, Any] | None = None
  source_dtype: str = "float32"
  path: str = ""


def load(path: str | os.PathLike, *, dtype=None) -> Pretrained:
  """Load a Hugging Face folder or a GGUF file.

  Args:
    path: a folder holding `config.json` and `model.safetensors` (or
      shards listed in `model.safetensors.index.json`), a `.gguf` file, or a
      folder holding exactly one `.gguf` file and no `config.json`.
    dtype: dtype of the returned parameters; None keeps the stored dtype
      (GGUF tensors are dequantized to float32).

  Returns:
    A `Pretrained`.

  Raises:
    ValueError: if the path does not exist or contains neither layout, or if
      the files are corrupt or do not match the config.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ValueError(
        f"Model path {path!r} does not exist. Pass a Hugging Face model"
        " folder (config.json and model.safetensors) or a .gguf file."
    )

  gguf_file = _gguf_file(path)
  if gguf_file is not None:
    from jaxlora.models.gguf_reader import load_gguf  # pylint: disable=g-import-not-at-top

    logger.info("Loading GGUF file %s", gguf_file)
    return load_gguf(gguf_file, dtype=dtype)

  from jaxlora.models.hf_folder import load_folder  # pylint: disable=g-import-not-at-top

  return load_folder(path, dtype=dtype)


def _gguf_file(path):
  """Return the GGUF file that `path` names, or None for any other layout."""
  if os.path.isfile(path):
    return path if path.endswith(GGUF_SUFFIX) else None
  if os.path.exists(os.path.join(path, "config.json")):
    return None
  found = sorted(name for name in os.listdir(path) if name.endswith(GGUF_SUFFIX))
  if len(found) == 1:
    return os.path.join(path, found[0])
  if len(found) > 1:
    raise ValueError(
        f"Folder {path!r} contains {len(found)} .gguf files ({', '.join(found)})"
        " and no config.json. Pass the path of the one .gguf file to load."
    )
  return None

"""peft LoRA adapter folders: writing our adapters, reading peft's.

A peft adapter folder contains `adapter_config.json` (rank, alpha, targets,
patterns) and `adapter_model.safetensors`, one pair of tensors per adapted
module and layer, under the module's name in the transformers model with
peft's prefix:

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight [out, r]
      <-> params["model"]["layers"]["self_attn"]["q_proj"]["lora"]
          {"a": [L, in, r] (layer 3 = lora_A.T), "b": [L, r, out] (layer 3 = lora_B.T),
           "scale": [L]}

`peft_layout` is the one place where the two layouts meet. Module names go
through the architecture's key table (`jaxlora.models.architectures`), so an
adapter is matched on whole name components, never on substrings. Fused
projections (Phi-3's `qkv_proj` and `gate_up_proj`, GPT-2's `c_attn`) keep one
adapter each, as peft does.

Per-layer ranks from `rank_pattern` are stored padded to the module's largest
rank (see `jaxlora.apply`); writing cuts each layer back to its rank.
"""

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxlora import paths
from jaxlora.config import LAYER_CONTAINERS, LoraConfig
from jaxlora.lora import LORA, slice_names
from jaxlora.models import hf_folder, hf_writer
from jaxlora.models.architectures import ARCHITECTURES, ModelConfig, architecture
from jaxlora.partition import adapter_mask

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# The names of peft's wrappers above the transformers model's own modules.
PEFT_PREFIX = ("base_model", "model")
_PAIR = ("lora_A", "lora_B")

# adapter_config.json fields that change what the adapter computes, and the
# values under which this module computes exactly what peft does.
_NEUTRAL_VALUES = {
    "use_dora": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "layer_replication": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
}


def peft_layout(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Convert one adapter pair between our layout and peft's, in either direction.

  Ours is `a` `[in, r]` and `b` `[r, out]`; peft's is `lora_A.weight` `[r, in]`
  and `lora_B.weight` `[out, r]`. Each matrix is transposed and the order
  (input side first) is kept, so the conversion is its own inverse:

      lora_A, lora_B = peft_layout(a, b)
      a, b = peft_layout(lora_A, lora_B)
  """
  return np.asarray(first).T, np.asarray(second).T


@dataclasses.dataclass
class PeftAdapter:
  """A peft adapter loaded onto a parameter tree.

  Attributes:
    params: the base tree with the adapters beside their kernels.
    lora_config: the LoRA settings read from `adapter_config.json`, with
      `targets` naming the adapted modules.
    trainable_mask: booleans with the structure of `params` for
      `jaxlora.partition(params, trainable_mask=...)`: True at the adapter
      matrices when loaded trainable, False everywhere when loaded frozen.
  """

  params: dict[str, Any]
  lora_config: LoraConfig
  trainable_mask: dict[str, Any]


def save_peft_adapter(
    folder: str | os.PathLike,
    config: ModelConfig,
    params: Mapping[str, Any],
    lora_config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> None:
  """Write the adapters of `params` as a peft adapter folder.

  `peft.PeftModel.from_pretrained(model, folder)` on the transformers model of
  the base weights then computes the same logits as our adapted model. The
  folder is written beside its final path and renamed into place.

  Args:
    folder: the folder to create.
    config: the architecture of `params`.
    params: a tree with adapters, from `jaxlora.apply` or `load_peft_adapter`.
    lora_config: the settings the adapters were made with. Its rank, alpha,
      rsLoRA flag and patterns are written to `adapter_config.json` and
      checked against every adapter's width and scale.
    base_model_name_or_path: recorded in `adapter_config.json` for peft to
      find the base model; None leaves it unset.
    overwrite: replace an existing `folder`.

  Raises:
    ValueError: if the tree has no adapters, if the adapters disagree with
      `lora_config` (targets, a rank, nonzero padding, a scale), if a module
      has no name in the architecture's checkpoint layout, or if `folder`
      exists and `overwrite` is False.
  """
  folder = os.path.abspath(os.fspath(folder))
  if os.path.lexists(folder) and not overwrite:
    raise ValueError(
        f"{folder} already exists. Pass overwrite=True to replace it, or"
        " choose another folder."
    )
  arch = architecture(config.model_type)
  adapted = _adapted_modules(params)
  _check_targets(params, adapted, lora_config)

  tensors = {}
  for path, node in adapted:
    tensors.update(_module_tensors(arch, path, node, lora_config))
  adapter_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": lora_config.rank,
      "lora_alpha": lora_config.alpha,
      "target_modules": target_names(params, [path for path, _ in adapted]),
      "use_rslora": lora_config.use_rslora,
      "rank_pattern": dict(lora_config.rank_pattern),
      "alpha_pattern": dict(lora_config.alpha_pattern),
      "lora_dropout": lora_config.dropout,
      "bias": "none",
      "fan_in_fan_out": arch.fan_in_fan_out,
      "inference_mode": True,
      "init_lora_weights": True,
      "modules_to_save": None,
      "use_dora": False,
  }

  os.makedirs(os.path.dirname(folder), exist_ok=True)
  staging = hf_writer.sibling_path(folder, "tmp")
  os.mkdir(staging)
  try:
    # Unsorted, unlike the files peft 0.21.2 writes: the first pattern key
    # that selects a module gives its value, so the config's order is kept.
    hf_writer.write_json(
        os.path.join(staging, ADAPTER_CONFIG_FILE), adapter_config, sort_keys=False
    )
    safetensors.numpy.save_file(
        tensors, os.path.join(staging, ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"}
    )
    hf_writer.move_into_place(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  logger.info("Saved %d adapter tensors of %d modules to %s", len(tensors), len(adapted), folder)


def load_peft_adapter(
    folder: str | os.PathLike,
    config: ModelConfig,
    params: Mapping[str, Any],
    *,
    trainable: bool = False,
) -> PeftAdapter:
  """Load a peft LoRA adapter folder onto the base tree `params`.

  Rank, alpha, rsLoRA and the rank and alpha patterns come from
  `adapter_config.json`. A module that the adapter covers in some layers only
  gets zero adapters in the other layers, which add nothing and stay zero in
  training.

  Args:
    folder: a folder with `adapter_config.json` and `adapter_model.safetensors`.
    config: the architecture of `params`.
    params: the base tree, without adapters on the adapted modules.
    trainable: False to load the adapter frozen, for inference; True to
      continue training it.

  Returns:
    A `PeftAdapter`.

  Raises:
    ValueError: if the folder is not a peft LoRA adapter: missing files, a
      `peft_type` other than LORA, a missing `r`, or a feature such as DoRA
      that this loader does not implement. Also if the adapter was made for
      another architecture, if it has keys that the architecture's layout
      does not contain (listed, sorted), or if a tensor's shape does not fit
      the base model (the first such key, with both shapes).
  """
  folder = os.fspath(folder)
  arch = architecture(config.model_type)
  fields = _read_adapter_config(folder, arch)
  tensors = _read_adapter_tensors(folder)
  modules, base_weights = _group_by_module(arch, tensors)
  _check_base_weights(arch, params, base_weights)
  lora_config = LoraConfig(
      rank=fields["r"],
      alpha=fields.get("lora_alpha", 8),
      targets=target_names(params, list(modules)),
      dropout=fields.get("lora_dropout") or 0.0,
      use_rslora=bool(fields.get("use_rslora", False)),
      rank_pattern=fields.get("rank_pattern") or {},
      alpha_pattern=fields.get("alpha_pattern") or {},
  )

  adapters = {}
  for path in sorted(modules):
    node = _module_node(params, path)
    adapters[path] = _module_adapter(path, node, modules[path], lora_config)
  adapted = _insert(params, adapters)

  mask = adapter_mask(adapted)
  if not trainable:
    mask = jax.tree.map(lambda _: False, mask)
  logger.info(
      "Loaded a peft adapter of %d modules from %s (%s).",
      len(adapters), folder, "trainable" if trainable else "frozen",
  )
  return PeftAdapter(params=adapted, lora_config=lora_config, trainable_mask=mask)


def target_names(params: Mapping[str, Any], adapted: list[paths.Path]) -> list[str]:
  """Return the shortest module names that select exactly the `adapted` modules.

  A name is the module's own name (`q_proj`) when every module of that name
  is adapted. Otherwise it is the module's path below the layer container
  (`attn.c_proj`, not `mlp.c_proj`). Both peft and `jaxlora.LoraConfig`
  select a module by a name in a list when its dotted path ends with that name.
  """
  adapted = set(adapted)
  kernels = [path for path, _ in paths.iter_modules(params)]
  names = set()
  for path in adapted:
    name = path[-1]
    if any(other[-1] == name and other not in adapted for other in kernels):
      containers = [i for i, part in enumerate(path) if part in LAYER_CONTAINERS]
      start = containers[0] + 1 if containers else 0
      name = ".".join(path[start:])
    names.add(name)
  return sorted(names)


def _adapted_modules(params):
  adapted = [(path, node) for path, node in paths.iter_modules(params) if LORA in node]
  if not adapted:
    raise ValueError(
        "The parameter tree has no LoRA adapters to save. Call"
        " jaxlora.apply(params, ...) and train first."
    )
  return adapted


def _check_targets(params, adapted, lora_config):
  adapted_names = {paths.module_name(path) for path, _ in adapted}
  targeted = {
      paths.module_name(path) for path, _ in paths.iter_modules(params)
      if lora_config.matches(paths.module_name(path))
  }
  if adapted_names != targeted:
    raise ValueError(
        f"lora_config targets {sorted(targeted)}, but the tree has adapters on"
        f" {sorted(adapted_names)}. Pass the LoraConfig that the adapters were"
        " made with."
    )


def _module_tensors(arch, path, node, lora_config):
  """Return peft's tensors of one adapted module, one pair per layer."""
  a = np.asarray(jax.device_get(node[LORA]["a"]), np.float32)
  b = np.asarray(jax.device_get(node[LORA]["b"]), np.float32)
  scale = np.asarray(jax.device_get(node[LORA]["scale"]), np.float32)
  lead = a.shape[:-2]
  names = slice_names(path, lead)
  if lead and len(names) != lead[0]:
    raise ValueError(
        f"Module {paths.module_name(path)} has stacked adapters {list(a.shape)}"
        " outside a layer container, which peft cannot name."
    )

  out = {}
  for layer, name in enumerate(names):
    _check_module_name(arch, name, path)
    index = (layer,) if lead else ()
    rank = lora_config.rank_for(name)
    width = a.shape[-1]
    if rank > width:
      raise ValueError(
          f"lora_config gives {name} rank {rank}, but its adapter is only"
          f" {width} wide. Pass the LoraConfig that the adapters were made with."
      )
    if np.any(a[index][:, rank:]) or np.any(b[index][rank:, :]):
      raise ValueError(
          f"The adapter of {name} has nonzero columns beyond its rank {rank}"
          " (from lora_config). Pass the LoraConfig that the adapters were"
          " made with."
      )
    expected = lora_config.scale_for(name)
    if not np.isclose(scale[index], expected, rtol=1e-6, atol=0):
      raise ValueError(
          f"The adapter of {name} has scale {float(scale[index])!r}, but"
          f" lora_config gives {expected!r} (alpha {lora_config.alpha_for(name)},"
          f" rank {rank}, use_rslora={lora_config.use_rslora}). Pass the"
          " LoraConfig that the adapters were made with."
      )
    lora_a, lora_b = peft_layout(a[index][:, :rank], b[index][:rank, :])
    prefix = ".".join(PEFT_PREFIX) + "." + name
    out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(lora_a)
    out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(lora_b)
  return out


def _check_module_name(arch, name, path):
  parsed = arch.parse_key(name + ".weight")
  if parsed is None or parsed[0][:-1] != tuple(path):
    raise ValueError(
        f"Module {paths.module_name(path)} (named {name}) is not a linear"
        f" module of the {arch.model_type} checkpoint layout, so peft could"
        " not place its adapter."
    )


def _read_adapter_config(folder, arch):
  path = os.path.join(folder, ADAPTER_CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(
        f"{folder!r} is not a peft adapter folder: {ADAPTER_CONFIG_FILE} not"
        " found. Pass the folder that PeftModel.save_pretrained wrote."
    )
  fields = hf_folder.read_json(path)
  if fields.get("peft_type") != "LORA":
    raise ValueError(
        f"{path} has peft_type {fields.get('peft_type')!r}; only LoRA adapters"
        " (peft_type 'LORA') can be loaded. Pass a LoRA adapter folder."
    )
  if fields.get("r") is None:
    raise ValueError(
        f"{path} is missing 'r', the LoRA rank. Add the rank the adapter was"
        " trained with, for example \"r\": 8."
    )
  unsupported = [
      f"{name}={fields[name]!r}" for name, neutral in _NEUTRAL_VALUES.items()
      if name in fields and fields[name] not in neutral
  ]
  if unsupported:
    raise ValueError(
        f"{path} uses peft features that this loader does not implement:"
        f" {', '.join(unsupported)}. Only plain LoRA on linear layers (with"
        " rsLoRA and rank and alpha patterns) can be loaded."
    )
  base_class = (fields.get("auto_mapping") or {}).get("base_model_class")
  if base_class is not None and base_class != arch.hf_class:
    raise ValueError(
        f"{path} is an adapter for {base_class}, but the base model is"
        f" {arch.model_type} ({arch.hf_class}). Load it onto a {base_class}"
        " checkpoint."
    )
  return fields


def _read_adapter_tensors(folder):
  path = os.path.join(folder, ADAPTER_WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise ValueError(
        f"{ADAPTER_WEIGHTS_FILE} not found in {folder!r}. Only safetensors"
        " adapters are read; save the adapter with"
        " PeftModel.save_pretrained(..., safe_serialization=True)."
    )
  try:
    return safetensors.numpy.load_file(path)
  except safetensors.SafetensorError as error:
    raise ValueError(
        f"{path} is truncated or corrupt and cannot be read ({error})."
    ) from None


def _parse_adapter_key(arch, key):
  """Return `(module path, layer, "lora_A" or "lora_B")` of a peft key, or None."""
  parts = key.split(".")
  if len(parts) < 5 or tuple(parts[:2]) != PEFT_PREFIX or parts[-1] != "weight":
    return None
  if parts[-2] not in _PAIR:
    return None
  parsed = arch.parse_key(".".join(parts[2:-2]) + ".weight")
  if parsed is None or parsed[0][-1] != "kernel":
    return None
  return parsed[0][:-1], parsed[1], parts[-2]


def _parse_base_weight_key(arch, key):
  """Return `(tree path, layer, transposed)` of a base weight that peft saved, or None.

  peft stores the output head and the embedding beside the adapters when
  they are targeted (`lm_head.base_layer.weight`) or were resized
  (`lm_head.weight`).
  """
  parts = key.split(".")
  if len(parts) < 4 or tuple(parts[:2]) != PEFT_PREFIX or parts[-1] != "weight":
    return None
  module = parts[2:-2] if parts[-2] == "base_layer" else parts[2:-1]
  return arch.parse_key(".".join(module) + ".weight")


def _group_by_module(arch, tensors):
  """Return `({module path: {layer: {side: (key, array)}}}, {key: (base weight, array)})`."""
  modules = {}
  base_weights = {}
  unknown = []
  for key, array in tensors.items():
    parsed = _parse_adapter_key(arch, key)
    if parsed is None:
      base = _parse_base_weight_key(arch, key)
      if base is None:
        unknown.append(key)
      else:
        base_weights[key] = (base, array)
      continue
    path, layer, side = parsed
    modules.setdefault(path, {}).setdefault(layer, {})[side] = (key, array)

  if unknown:
    _raise_unknown_keys(arch, sorted(unknown))
  if not modules:
    raise ValueError("The adapter has no lora_A/lora_B tensors.")
  for path, layers in modules.items():
    for layer, pair in layers.items():
      missing = [side for side in _PAIR if side not in pair]
      if missing:
        present = next(iter(pair.values()))[0]
        raise ValueError(
            f"The adapter has {present} but no {missing[0]} for the same"
            " module. Save the adapter again with peft."
        )
  return modules, base_weights


def _check_base_weights(arch, params, base_weights):
  """Check that base weights stored with the adapter equal the base model's."""
  for key, ((path, layer, transposed), array) in sorted(base_weights.items()):
    leaf = params
    for part in path:
      leaf = leaf.get(part) if isinstance(leaf, Mapping) else None
      if leaf is None:
        raise ValueError(
            f"The adapter stores {key}, a base weight of"
            f" {paths.module_name(path[:-1])}, which the {arch.model_type} base"
            " model does not have. Load the adapter onto the model it was"
            " trained on."
        )
    ours = np.asarray(jax.device_get(leaf if layer is None else leaf[layer]), np.float32)
    ours = ours.T if transposed else ours
    if ours.shape != array.shape or not np.array_equal(ours, array.astype(np.float32)):
      raise ValueError(
          f"The adapter stores {key} (shape {list(array.shape)}), which differs"
          f" from the base model's {paths.module_name(path)} (shape"
          f" {list(ours.shape)}): it was trained on other base weights, for"
          " example with a resized vocabulary. Load it onto that base model."
      )


def _raise_unknown_keys(arch, unknown):
  for other in ARCHITECTURES.values():
    if other.model_type == arch.model_type or other.hf_class == arch.hf_class:
      continue
    if all(_parse_adapter_key(other, key) is not None for key in unknown):
      if other.key_rules != arch.key_rules:
        raise ValueError(
            f"The adapter was made for another architecture: its modules"
            f" (such as {unknown[0]}) are {other.model_type} modules, but the"
            f" base model is {arch.model_type}. Load it onto a"
            f" {other.model_type} checkpoint."
        )
  raise ValueError(
      f"The adapter has keys that the {arch.model_type} layout does not contain:"
      f" {unknown}. Only lora_A/lora_B weights of the model's linear layers,"
      f" named {'.'.join(PEFT_PREFIX)}.<module>.lora_A.weight, can be loaded."
  )


def _module_node(params, path):
  node = params
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      node = None
      break
    node = node[key]
  if node is None or "kernel" not in node:
    hint = ""
    if path == ("lm_head",):
      hint = (
          " The base model ties its output head to the embedding; call"
          " jaxlora.models.untie_output_head(config, params) first."
      )
    raise ValueError(
        f"The adapter targets {paths.module_name(path)}, which the base model"
        f" does not have.{hint}"
    )
  if LORA in node:
    raise ValueError(
        f"{paths.module_name(path)} already has an adapter. Load the adapter"
        " onto the base parameters, or call jaxlora.merge first."
    )
  return node


def _module_adapter(path, node, layers, lora_config):
  """Return `{a, b, scale}` of one module from peft's per-layer tensors."""
  kernel = node["kernel"]
  *lead, fan_in, fan_out = kernel.shape
  lead = tuple(lead)
  names = slice_names(path, lead)
  stacked = bool(lead)
  if stacked and len(names) != lead[0]:
    raise ValueError(
        f"Kernel of {paths.module_name(path)} has shape {list(kernel.shape)};"
        " only one stacking axis, the layers, is supported."
    )
  if not stacked and set(layers) != {None}:
    raise ValueError(
        f"The adapter has per-layer tensors for {paths.module_name(path)}, whose"
        " kernel is not stacked by layer."
    )

  for layer in sorted(layers, key=lambda item: -1 if item is None else item):
    if stacked and not 0 <= layer < lead[0]:
      key = layers[layer]["lora_A"][0]
      raise ValueError(
          f"The adapter has {key} for layer {layer}, but the base model has"
          f" {lead[0]} layers. Load the adapter onto the model it was trained on."
      )
    name = names[layer] if stacked else names[0]
    rank = lora_config.rank_for(name)
    for side, shape in (("lora_A", (rank, fan_in)), ("lora_B", (fan_out, rank))):
      key, array = layers[layer][side]
      if tuple(array.shape) != shape:
        raise ValueError(
            f"Adapter tensor {key} has shape {list(array.shape)}, but the base"
            f" model's {name} (kernel [in={fan_in}, out={fan_out}]) with rank"
            f" {rank} from adapter_config.json needs {list(shape)}. Load the"
            " adapter onto the model it was trained on."
        )

  width = max(lora_config.rank_for(name) for name in names)
  a = np.zeros((*lead, fan_in, width), np.float32)
  b = np.zeros((*lead, width, fan_out), np.float32)
  for layer, pair in layers.items():
    index = (layer,) if stacked else ()
    rank = pair["lora_A"][1].shape[0]
    a_layer, b_layer = peft_layout(pair["lora_A"][1], pair["lora_B"][1])
    a[index][:, :rank] = a_layer.astype(np.float32)
    b[index][:rank, :] = b_layer.astype(np.float32)
  missing = sorted(set(range(lead[0])) - set(layers)) if stacked else []
  if missing:
    logger.info(
        "The adapter does not cover layers %s of %s; they get zero adapters.",
        missing, paths.module_name(path),
    )

  scales = np.asarray([lora_config.scale_for(name) for name in names], np.float32)
  scale = scales.reshape(lead) if stacked else scales.reshape(())
  return {"a": jnp.asarray(a), "b": jnp.asarray(b), "scale": jnp.asarray(scale)}


def _insert(params, adapters):
  def rebuild(tree, prefix):
    out = {}
    for key, value in tree.items():
      path = prefix + (key,)
      out[key] = rebuild(value, path) if isinstance(value, Mapping) else value
    if prefix in adapters:
      out[LORA] = adapters[prefix]
    return out

  return rebuild(params, ())

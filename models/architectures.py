"""The supported architectures: configs, modules and checkpoint key tables.

Each `model_type` has one `Architecture`: its transformers class, peft's
default LoRA targets, and an ordered table of anchored patterns from the
checkpoint's tensor names to leaves of our tree. The table is the only place
that contains Hugging Face names. Readers, the writer and the peft adapter
converter all go through `Architecture.parse_key` and `hf_key`.

    config.json --config_from_hf--> LlamaConfig | Gpt2Config
    config --build_model--> Llama | Gpt2 (Flax modules)
    "model.layers.3.mlp.up_proj.weight" --parse_key--> (("model", "layers",
        "mlp", "up_proj", "kernel"), 3, transposed=True)
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxlora import paths
from jaxlora.config import layer_module_name
from jaxlora.models import gpt2, llama
from jaxlora.models.config import FAMILY, LlamaConfig

ModelConfig = LlamaConfig | gpt2.Gpt2Config

# Tree leaf name -> the last component of the checkpoint's tensor name.
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class KeyRule:
  """One row of a key table.

  Attributes:
    pattern: a regular expression that must match a whole tensor name.
    path: the tree path of the leaf. A `{name}` part takes the named group
      of the match. A `layer` group gives the index on the stacking axis L.
    transposed: whether the file stores the leaf transposed (torch's
      `nn.Linear` weight `[out, in]` for our kernel `[in, out]`).
  """

  pattern: re.Pattern
  path: tuple[str, ...]
  transposed: bool


def _rules(*rows) -> tuple[KeyRule, ...]:
  return tuple(KeyRule(re.compile(pattern), path, transposed) for pattern, path, transposed in rows)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The names, defaults and checkpoint layout of one `model_type`.

  Attributes:
    model_type: the `model_type` of config.json.
    hf_class: the transformers causal language model class.
    default_targets: peft's default LoRA target modules for this type (peft
      0.21 has none for phi3; `qkv_proj`, the fused attention input, is ours).
    key_rules: the anchored key table, tried in order.
    embedding_key: the tensor name of the token embedding, which a tied
      output head repeats.
    ignored_keys: tensor names that some checkpoints store but that are
      recomputed from the config (buffers), or None.
    base_prefix: a leading name component that old checkpoints omit from
      every key but the output head (GPT-2's `transformer`), or None.
    fan_in_fan_out: whether the file stores the layers' linear weights
      `[in, out]` (transformers' Conv1D), which peft's adapter config records
      under this name.
  """

  model_type: str
  hf_class: str
  default_targets: tuple[str, ...]
  key_rules: tuple[KeyRule, ...]
  embedding_key: str
  ignored_keys: re.Pattern | None = None
  base_prefix: str | None = None
  fan_in_fan_out: bool = False

  def parse_key(self, key: str) -> tuple[paths.Path, int | None, bool] | None:
    """Return `(tree path, layer index or None, transposed)` of a tensor name, or None."""
    for rule in self.key_rules:
      match = rule.pattern.fullmatch(key)
      if match is None:
        continue
      groups = match.groupdict()
      path = tuple(part.format(**groups) for part in rule.path)
      layer = int(groups["layer"]) if "layer" in groups else None
      return path, layer, rule.transposed
    return None


def hf_key(path: paths.Path, layer: int | None) -> str:
  """Return the checkpoint's tensor name of the leaf at `path` (layer `layer` if stacked)."""
  return layer_module_name(path[:-1], layer) + "." + _LEAF_TO_HF[path[-1]]


def _llama_family_rules(attention: str, mlp: str) -> tuple[KeyRule, ...]:
  layer = r"model\.layers\.(?P<layer>\d+)\."
  attention = rf"(?P<block>self_attn)\.(?P<module>{attention})"
  mlp = rf"(?P<block>mlp)\.(?P<module>{mlp})"
  module = ("model", "layers", "{block}", "{module}")
  return _rules(
      (r"model\.embed_tokens\.weight", ("model", "embed_tokens", "embedding"), False),
      (r"model\.norm\.weight", ("model", "norm", "scale"), False),
      (r"lm_head\.weight", ("lm_head", "kernel"), True),
      (layer + attention + r"\.weight", (*module, "kernel"), True),
      (layer + attention + r"\.bias", (*module, "bias"), False),
      (layer + mlp + r"\.weight", (*module, "kernel"), True),
      (layer + mlp + r"\.bias", (*module, "bias"), False),
      (
          layer + r"(?P<norm>input_layernorm|post_attention_layernorm)\.weight",
          ("model", "layers", "{norm}", "scale"), False,
      ),
  )


_LLAMA_RULES = _llama_family_rules("q_proj|k_proj|v_proj|o_proj", "gate_proj|up_proj|down_proj")
_PHI3_RULES = _llama_family_rules("qkv_proj|o_proj", "gate_up_proj|down_proj")

_GPT2_BLOCK = r"transformer\.h\.(?P<layer>\d+)\."
_GPT2_RULES = _rules(
    (r"transformer\.wte\.weight", ("transformer", "wte", "embedding"), False),
    (r"transformer\.wpe\.weight", ("transformer", "wpe", "embedding"), False),
    (r"transformer\.ln_f\.weight", ("transformer", "ln_f", "scale"), False),
    (r"transformer\.ln_f\.bias", ("transformer", "ln_f", "bias"), False),
    (_GPT2_BLOCK + r"(?P<norm>ln_1|ln_2)\.weight", ("transformer", "h", "{norm}", "scale"), False),
    (_GPT2_BLOCK + r"(?P<norm>ln_1|ln_2)\.bias", ("transformer", "h", "{norm}", "bias"), False),
    # Conv1D stores its weight [in, out], as our kernels are.
    (
        _GPT2_BLOCK + r"(?P<block>attn)\.(?P<module>c_attn|c_proj)\.weight",
        ("transformer", "h", "{block}", "{module}", "kernel"), False,
    ),
    (
        _GPT2_BLOCK + r"(?P<block>attn)\.(?P<module>c_attn|c_proj)\.bias",
        ("transformer", "h", "{block}", "{module}", "bias"), False,
    ),
    (
        _GPT2_BLOCK + r"(?P<block>mlp)\.(?P<module>c_fc|c_proj)\.weight",
        ("transformer", "h", "{block}", "{module}", "kernel"), False,
    ),
    (
        _GPT2_BLOCK + r"(?P<block>mlp)\.(?P<module>c_fc|c_proj)\.bias",
        ("transformer", "h", "{block}", "{module}", "bias"), False,
    ),
    (r"lm_head\.weight", ("lm_head", "kernel"), True),
)

_ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _llama_family(model_type, rules, default_targets=("q_proj", "v_proj")):
  return Architecture(
      model_type=model_type,
      hf_class=FAMILY[model_type].hf_class,
      default_targets=default_targets,
      key_rules=rules,
      embedding_key="model.embed_tokens.weight",
      ignored_keys=_ROTARY_BUFFER,
  )


ARCHITECTURES = {
    "llama": _llama_family("llama", _LLAMA_RULES),
    "mistral": _llama_family("mistral", _LLAMA_RULES),
    "qwen2": _llama_family("qwen2", _LLAMA_RULES),
    "gemma": _llama_family("gemma", _LLAMA_RULES),
    "phi3": _llama_family("phi3", _PHI3_RULES, default_targets=("qkv_proj",)),
    "gpt2": Architecture(
        model_type="gpt2",
        hf_class="GPT2LMHeadModel",
        default_targets=("c_attn",),
        key_rules=_GPT2_RULES,
        embedding_key="transformer.wte.weight",
        # The causal-mask buffers that checkpoints before transformers 4.47 stored.
        ignored_keys=re.compile(r"transformer\.h\.\d+\.attn\.(?:masked_)?bias"),
        base_prefix="transformer",
        fan_in_fan_out=True,
    ),
}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)


def architecture(model_type: str) -> Architecture:
  """Return the `Architecture` of `model_type`.

  Raises:
    ValueError: for an unsupported `model_type`; the message lists the
      supported ones.
  """
  if model_type not in ARCHITECTURES:
    raise ValueError(
        f"Unsupported model_type {model_type!r}. Supported model types:"
        f" {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
  return ARCHITECTURES[model_type]


def config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
  """Build the config of any supported architecture from a `config.json` dict.

  Raises:
    ValueError: for an unsupported `model_type` (the message lists the
      supported ones) or a config the architecture's reader rejects.
  """
  model_type = config.get("model_type")
  architecture(model_type)
  if model_type == "gpt2":
    return gpt2.Gpt2Config.from_hf(config)
  return LlamaConfig.from_hf(config)


def build_model(config: ModelConfig, **module_fields) -> nn.Module:
  """Return the Flax module of `config`, such as `Llama(config, **module_fields)`.

  `module_fields` are the module's other attributes: dtype, lora_dropout,
  remat, remat_policy, activation_sharding.
  """
  if isinstance(config, gpt2.Gpt2Config):
    return gpt2.Gpt2(config, **module_fields)
  return llama.Llama(config, **module_fields)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Return a random float32 parameter tree for `config`.

  Under `jax.eval_shape` it returns the tree's shapes without allocating it:

      shapes = jax.eval_shape(functools.partial(init_params, config), rng)
  """
  if isinstance(config, gpt2.Gpt2Config):
    return gpt2.init_params(config, rng)
  return llama.init_params(config, rng)


def default_targets(config: ModelConfig) -> tuple[str, ...]:
  """Return peft's default LoRA target modules for `config`'s architecture."""
  return architecture(config.model_type).default_targets


def untie_output_head(config: ModelConfig, params: Mapping[str, Any]) -> tuple[ModelConfig, dict]:
  """Give a tied model its own output head, a copy of the token embedding.

  The logits are unchanged, but the head `lm_head.kernel` `[D, V]` is now a
  kernel that LoRA can target and training can change without touching the
  embedding. A model folder saved with the returned config stores both
  tensors and sets `tie_word_embeddings: false`.

  Returns:
    `(untied config, params with "lm_head": {"kernel": embedding.T})`.

  Raises:
    ValueError: if `config` is not tied or `params` already has a head.
  """
  if not config.tie_word_embeddings:
    raise ValueError(
        "config.tie_word_embeddings is already false: the model has its own"
        " output head lm_head, which LoRA can target directly."
    )
  if "lm_head" in params:
    raise ValueError(
        "params already contain lm_head although config ties the head to the"
        " embedding. Load the parameters with the config they were saved with."
    )
  embedding_path, _, _ = architecture(config.model_type).parse_key(
      architecture(config.model_type).embedding_key
  )
  embedding = params
  for key in embedding_path:
    embedding = embedding[key]
  untied = dataclasses.replace(config, tie_word_embeddings=False)
  return untied, {**params, "lm_head": {"kernel": jax.numpy.asarray(embedding).T}}

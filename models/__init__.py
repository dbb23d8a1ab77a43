"""Model definitions and checkpoint readers and writers."""

from jaxlora.models.architectures import (
    SUPPORTED_MODEL_TYPES, build_model, config_from_hf, default_targets, init_params, untie_output_head,
)
from jaxlora.models.config import LlamaConfig
from jaxlora.models.gpt2 import Gpt2, Gpt2Config
from jaxlora.models.hf_writer import save_merged, save_pretrained
from jaxlora.models.llama import KVCache, Llama, init_cache
from jaxlora.models.loading import Pretrained, load
from jaxlora.models.peft_io import PeftAdapter, load_peft_adapter, save_peft_adapter

__all__ = [
    "Gpt2",
    "Gpt2Config",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "PeftAdapter",
    "Pretrained",
    "SUPPORTED_MODEL_TYPES",
    "build_model",
    "config_from_hf",
    "default_targets",
    "init_cache",
    "init_params",
    "load",
    "load_peft_adapter",
    "save_merged",
    "save_peft_adapter",
    "save_pretrained",
    "untie_output_head",
]

"""Model definitions and checkpoint readers and writers."""

from jaxlora.models.config import LlamaConfig
from jaxlora.models.hf_folder import save_pretrained
from jaxlora.models.llama import Llama, init_params
from jaxlora.models.loading import Pretrained, load

__all__ = [
    "Llama",
    "LlamaConfig",
    "Pretrained",
    "init_params",
    "load",
    "save_pretrained",
]

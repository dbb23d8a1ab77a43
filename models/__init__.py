"""Model definitions and checkpoint readers and writers."""

from jaxlora.models.config import LlamaConfig
from jaxlora.models.loading import Pretrained, load

__all__ = [
    "LlamaConfig",
    "Pretrained",
    "load",
]

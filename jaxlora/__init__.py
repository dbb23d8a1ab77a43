"""LoRA and full fine-tuning of causal language models in JAX.

A parameter tree is a plain nested dict of arrays keyed by Hugging Face module
names. `apply` adds adapters beside the targeted kernels, `partition` splits
the tree into trainable and frozen halves, `optimizer` masks an optax
transformation to the trainable leaves, and `merge` folds the adapters back
into the kernels.
"""

from jaxlora.config import ALL_LINEAR, DEFAULT_TARGETS, LoraConfig
from jaxlora.counting import ParameterCount, count_parameters, format_trainable_parameters, print_trainable_parameters
from jaxlora.functional import wrap_merged
from jaxlora.linen import linen_kernel_axes, wrap
from jaxlora.lora import adapted_matmul, apply, merge, merged_kernel
from jaxlora.nnx import nnx_kernel_axes, nnx_model
from jaxlora.optim import optimizer
from jaxlora.partition import adapter_mask, combine, full_mask, is_adapter_weight, partition

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "LoraConfig",
    "ParameterCount",
    "adapted_matmul",
    "adapter_mask",
    "apply",
    "combine",
    "count_parameters",
    "format_trainable_parameters",
    "full_mask",
    "is_adapter_weight",
    "linen_kernel_axes",
    "merge",
    "merged_kernel",
    "nnx_kernel_axes",
    "nnx_model",
    "optimizer",
    "partition",
    "print_trainable_parameters",
    "wrap",
    "wrap_merged",
]

__version__ = "0.1.0"

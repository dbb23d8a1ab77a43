"""Shared test setup: offline Hugging Face, exact float32 products, tiny models.

The Hugging Face hub is unreachable from the test machines, so every
reference model is built here from a small random config.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# XLA's default precision multiplies float32 matrices in reduced precision on
# TPU and on GPUs with TF32, which would need far looser tolerances against torch.
jax.config.update("jax_default_matmul_precision", "highest")

# A Llama config whose sizes all differ, so that a transposed or swapped axis
# cannot pass a test by coincidence: V=97, D=48, F=80, H=6, K=2, hd=12
# (H * hd = 72 != D), L=3.
# The smallest Llama the training tests use. Every width differs: D=24, F=40,
# H*hd=32, K*hd=16, V=61, L=2 (and r=4 where the tests add adapters).
SMALL_LLAMA = {
    "vocab_size": 61,
    "hidden_size": 24,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
}

TINY_LLAMA = {
    "vocab_size": 97,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 3,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 12,
    "max_position_embeddings": 64,
    "rope_theta": 500.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}

# Llama 3 frequency scaling that sends the six rotary frequencies of a
# head_dim=12, theta=500 model into all three bands: kept, blended, divided.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def build_hf_llama(seed: int = 0, dtype=None, **overrides):
  """Return a random `transformers.LlamaForCausalLM` in eval mode.

  Weights are drawn with a wider spread than transformers' default and the
  norm scales are randomized too, so that every weight affects the logits.

  Args:
    seed: torch seed for the weights.
    dtype: torch dtype to cast the model to; float32 if None.
    **overrides: `transformers.LlamaConfig` fields that replace `TINY_LLAMA`'s.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if name.endswith("norm.weight"):
        parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
      else:
        parameter.normal_(0.0, 0.1)
  model.eval()
  return model.to(dtype or torch.float32)


@pytest.fixture
def hf_llama_folder(tmp_path):
  """Return a factory `make(name="hf", **build_hf_llama args) -> (folder, model)`.

  The model is saved with `save_pretrained` (extra keyword `max_shard_size`
  shards it) into `tmp_path / name`.
  """

  def make(name="hf", *, max_shard_size=None, **build_args):
    model = build_hf_llama(**build_args)
    folder = tmp_path / name
    save_args = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **save_args)
    return folder, model

  return make

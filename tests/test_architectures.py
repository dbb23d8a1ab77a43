"""Mistral, Qwen2, Gemma, Phi-3 and GPT-2 against transformers and peft.

Each architecture is built in transformers from a small random config whose
sizes all differ (V=97, D=48, F=80, H=6, K=2, hd=12 so H * hd = 72 != D, L=3;
GPT-2 has no separate head width, so there H * hd = D), saved, and loaded
here. Every comparison is in float32 with `LOGITS_ATOL`.
"""

import dataclasses
import json
import zlib

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jaxlora
from jaxlora import paths
from jaxlora.models import hf_folder
from jaxlora.models.architectures import architecture
from jaxlora.models import (
    LlamaConfig, build_model, config_from_hf, default_targets, init_params, load,
    load_peft_adapter, save_merged, save_peft_adapter,
)

from conftest import TINY_LLAMA

LOGITS_ATOL = 1e-4
PAD = 4  # left padding of the second row in `padded_batch`

_LLAMA_SIZES = {**TINY_LLAMA, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}

# name -> (transformers config class, its fields, our LoRA targets by the
# architecture's own module names, peft's rank_pattern for the import test,
# config fields the loader must have read).
CASES = {
    "mistral": (
        transformers.MistralConfig, {**_LLAMA_SIZES, "sliding_window": 5},
        ["q_proj", "k_proj", "down_proj"], {"k_proj": 2},
        {"model_type": "mistral", "sliding_window": 5},
    ),
    "qwen2": (
        transformers.Qwen2Config, _LLAMA_SIZES,
        ["q_proj", "v_proj", "o_proj", "up_proj"], {"layers.0.self_attn.o_proj": 2},
        {"model_type": "qwen2", "sliding_window": None, "attention_bias": False},
    ),
    "qwen2-sliding": (
        transformers.Qwen2Config,
        {**_LLAMA_SIZES, "use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0},
        ["v_proj"], {},
        {"model_type": "qwen2", "sliding_window": 6},
    ),
    "gemma": (
        transformers.GemmaConfig, {**_LLAMA_SIZES, "tie_word_embeddings": True},
        ["q_proj", "v_proj", "gate_proj"], {"gate_proj": 6},
        {"model_type": "gemma", "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": True},
    ),
    "phi3": (
        transformers.Phi3Config,
        {**_LLAMA_SIZES, "sliding_window": 7, "partial_rotary_factor": 0.5},
        ["qkv_proj", "gate_up_proj", "o_proj"], {"gate_up_proj": 6},
        {"model_type": "phi3", "sliding_window": 7, "partial_rotary_factor": 0.5},
    ),
    "gpt2": (
        transformers.GPT2Config,
        {"vocab_size": 97, "n_embd": 48, "n_head": 4, "n_inner": 80, "n_layer": 3,
         "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2},
        ["c_attn", "attn.c_proj", "c_fc"], {"c_fc": 2},
        {"model_type": "gpt2", "n_inner": 80, "tie_word_embeddings": True},
    ),
}


def build_hf_model(case, seed=0):
  """Return a random transformers causal LM of `case`, in eval mode, float32."""
  config_class, fields, *_ = CASES[case]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_class(**fields))
  norm_center = 0.0 if case == "gemma" else 1.0
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      is_norm = "norm" in name or ".ln_" in name
      if is_norm and name.endswith("weight"):
        parameter.copy_(norm_center + 0.2 * torch.randn_like(parameter))
      else:
        parameter.normal_(0.0, 0.1)
  return model.eval().float()


@pytest.fixture(scope="module", params=sorted(CASES))
def arch(request, tmp_path_factory):
  """Return `(case, folder, transformers model, loaded Pretrained)`."""
  case = request.param
  folder = tmp_path_factory.mktemp(case) / "base"
  model = build_hf_model(case)
  model.save_pretrained(folder)
  return case, folder, model, load(folder)


def padded_batch(length=20, seed=0):
  """Return `(input_ids, attention_mask)` `[2, length]`; row 1 is left-padded."""
  ids = np.random.RandomState(seed).randint(0, 97, (2, length)).astype(np.int32)
  mask = np.ones((2, length), np.int32)
  mask[1, :PAD] = 0
  return ids, mask


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()


def our_logits(config, params, ids, mask):
  return np.asarray(build_model(config).apply({"params": params}, ids, attention_mask=mask))


def assert_real_tokens_close(ours, theirs):
  """Compare logits at the unpadded positions; fully masked rows are undefined."""
  np.testing.assert_allclose(ours[0], theirs[0], atol=LOGITS_ATOL, rtol=0)
  np.testing.assert_allclose(ours[1, PAD:], theirs[1, PAD:], atol=LOGITS_ATOL, rtol=0)


def trained_adapter(case, pretrained, seed=1):
  """Return `(LoraConfig, params)` with adapters on the case's targets and random B."""
  targets = CASES[case][2]
  config = jaxlora.LoraConfig(rank=4, alpha=8, targets=targets, use_rslora=True)
  params = jaxlora.apply(pretrained.params, config, rng=jax.random.PRNGKey(seed))

  def randomize_b(path, leaf):
    if path[-1] != "b":
      return leaf
    key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(paths.module_name(path).encode()))
    return 0.3 * jax.random.normal(key, leaf.shape)

  return config, paths.map_with_path(randomize_b, params)


def hf_base(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


# ------------------------------------------------------------------ base model


def test_config_read(arch):
  case, _, _, pretrained = arch
  for field, value in CASES[case][4].items():
    assert getattr(pretrained.config, field) == value, field


def test_logits_match_transformers(arch):
  _, _, model, pretrained = arch
  ids, mask = padded_batch()

  ours = our_logits(pretrained.config, pretrained.params, ids, mask)

  assert_real_tokens_close(ours, torch_logits(model, ids, mask))


@pytest.mark.parametrize("case", ["mistral", "qwen2-sliding", "phi3"])
def test_sliding_window_matters(case):
  config_class, fields, *_ = CASES[case]
  config = config_from_hf(config_class(**fields).to_dict())
  full = dataclasses.replace(config, sliding_window=None)
  params = init_params(config, jax.random.PRNGKey(0))
  ids, mask = padded_batch()
  window = config.sliding_window

  windowed = our_logits(config, params, ids, mask)
  unwindowed = our_logits(full, params, ids, mask)

  np.testing.assert_array_equal(windowed[0, :window], unwindowed[0, :window])
  assert np.abs(windowed[0, window:] - unwindowed[0, window:]).max() > 1e-3


def test_lora_targets_own_modules(arch):
  case, _, _, pretrained = arch
  _, params = trained_adapter(case, pretrained)

  adapted = sorted(paths.module_name(p)[len("model."):] if p[0] == "model" else paths.module_name(p)
                   for p, node in paths.iter_modules(params) if "lora" in node)
  names = {name.rsplit(".", 1)[-1] for name in adapted}
  assert names == {target.rsplit(".", 1)[-1] for target in CASES[case][2]}
  if case == "gpt2":
    assert "transformer.h.mlp.c_proj" not in adapted
  assert set(default_targets(pretrained.config)) <= {
      paths.module_name(p).rsplit(".", 1)[-1] for p, _ in paths.iter_modules(pretrained.params)
  }


# ------------------------------------------------------------------ exports


def test_merged_export_loads_in_transformers(arch, tmp_path):
  case, _, _, pretrained = arch
  _, params = trained_adapter(case, pretrained)
  ids, mask = padded_batch(seed=1)
  expected = our_logits(pretrained.config, params, ids, mask)

  save_merged(tmp_path / "merged", pretrained.config, params)
  reloaded = hf_base(tmp_path / "merged")

  plain = our_logits(pretrained.config, pretrained.params, ids, mask)
  assert np.abs(expected - plain).max() > 1e-2, "the adapters should change the logits"
  assert type(reloaded).__name__ == json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"][0]
  assert_real_tokens_close(torch_logits(reloaded, ids, mask), expected)


def test_peft_export_loads_and_round_trips(arch, tmp_path):
  case, folder, _, pretrained = arch
  config, params = trained_adapter(case, pretrained)
  ids, mask = padded_batch(seed=2)

  save_peft_adapter(tmp_path / "adapter", pretrained.config, params, config)
  model = peft.PeftModel.from_pretrained(hf_base(folder), tmp_path / "adapter").eval()

  assert_real_tokens_close(torch_logits(model, ids, mask), our_logits(pretrained.config, params, ids, mask))
  wrapped = {name for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
  assert len(wrapped) == len(CASES[case][2]) * 3
  restored = load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)
  restored_leaves = dict(paths.iter_leaves(restored.params))
  assert sorted(restored_leaves) == sorted(dict(paths.iter_leaves(params)))
  for path, leaf in paths.iter_leaves(params):
    np.testing.assert_array_equal(np.asarray(restored_leaves[path]), np.asarray(leaf), err_msg=paths.module_name(path))


def test_peft_import_and_round_trip(arch, tmp_path):
  case, folder, _, pretrained = arch
  _, _, targets, rank_pattern, _ = CASES[case]
  model = peft.get_peft_model(
      hf_base(folder),
      peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, rank_pattern=rank_pattern),
  )
  torch.manual_seed(3)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "lora_B" in name:
        parameter.normal_(0.0, 0.3)
  model.save_pretrained(tmp_path / "theirs")
  ids, mask = padded_batch(seed=3)

  adapter = load_peft_adapter(tmp_path / "theirs", pretrained.config, pretrained.params)
  save_peft_adapter(tmp_path / "ours", pretrained.config, adapter.params, adapter.lora_config)

  assert_real_tokens_close(
      our_logits(pretrained.config, adapter.params, ids, mask), torch_logits(model.eval(), ids, mask)
  )
  theirs = safetensors.numpy.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
  ours = safetensors.numpy.load_file(tmp_path / "ours" / "adapter_model.safetensors")
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


# ------------------------------------------------------------------ configs and keys


def test_unknown_model_type_lists_supported():
  with pytest.raises(
      ValueError,
      match="Unsupported model_type 'falcon'. Supported model types: llama, mistral, qwen2, gemma, phi3, gpt2",
  ):
    config_from_hf({"model_type": "falcon", **_LLAMA_SIZES})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model_type": "mistral", "mlp_bias": True}, "mlp_bias=True is not part of the mistral architecture"),
        ({"model_type": "llama", "sliding_window": 8}, "sliding_window=8 is not part of the llama architecture"),
        ({"model_type": "phi3", "partial_rotary_factor": 0.3}, "gives 3 rotary channels"),
        ({"model_type": "gemma", "hidden_act": "relu"}, "hidden_act 'relu' is not supported"),
        ({"model_type": "bloom"}, "'bloom' is not a Llama-family type"),
    ],
)
def test_family_rejects_foreign_options(fields, message):
  with pytest.raises(ValueError, match=message):
    LlamaConfig(**{k: v for k, v in _LLAMA_SIZES.items() if k != "rope_theta"}, **fields)


def test_qwen2_mixed_windows_rejected():
  config = {**_LLAMA_SIZES, "model_type": "qwen2", "use_sliding_window": True,
            "sliding_window": 6, "max_window_layers": 1}
  with pytest.raises(ValueError, match="mix full and sliding-window attention layers"):
    config_from_hf(config)


def test_gpt2_layer_scaling_rejected():
  config = transformers.GPT2Config(n_layer=2, scale_attn_by_inverse_layer_idx=True).to_dict()
  with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=true is not supported"):
    config_from_hf(config)


def test_gpt2_legacy_key_names(tmp_path):
  model = build_hf_model("gpt2", seed=4)
  model.save_pretrained(tmp_path / "gpt2")
  tensors = safetensors.numpy.load_file(tmp_path / "gpt2" / "model.safetensors")
  legacy = {key.split(".", 1)[1]: value for key, value in tensors.items()}
  for layer in range(3):
    legacy[f"h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  safetensors.numpy.save_file(legacy, tmp_path / "gpt2" / "model.safetensors", metadata={"format": "pt"})
  ids, mask = padded_batch(seed=4)

  loaded = load(tmp_path / "gpt2")

  assert "h.0.attn.c_attn.weight" in legacy
  assert_real_tokens_close(our_logits(loaded.config, loaded.params, ids, mask), torch_logits(model, ids, mask))


def test_config_round_trips_through_transformers(arch, tmp_path):
  _, _, model, pretrained = arch
  hf_config = transformers.AutoConfig.for_model(**pretrained.config.to_hf())

  assert type(hf_config) is type(model.config)
  assert config_from_hf(hf_config.to_dict()) == pretrained.config


@pytest.mark.parametrize(
    "model_type, key",
    [
        ("phi3", "model.layers.0.self_attn.q_proj.weight"),
        ("phi3", "model.layers.0.mlp.gate_up_proj.weight_scale"),
        ("gpt2", "transformer.h.0.attn.c_fc.weight"),
        ("gpt2", "base_model.model.transformer.wte.weight"),
        ("gpt2", "transformer.h.1.mlp.c_attn.bias"),
        ("qwen2", "model.layers.0.self_attn.qkv_proj.weight"),
    ],
)
def test_key_tables_are_anchored(model_type, key):
  assert architecture(model_type).parse_key(key) is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_key_tables_invert_hf_key(case):
  config_class, fields, *_ = CASES[case]
  config = config_from_hf(config_class(**fields).to_dict())

  expected = hf_folder.expected_tensors(config)

  with torch.device("meta"):
    state = transformers.AutoModelForCausalLM.from_config(config_class(**fields)).state_dict()
  stored = set(state) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
  assert set(expected) == stored
  for key, tensor in expected.items():
    assert tensor.shape == tuple(state[key].shape), key

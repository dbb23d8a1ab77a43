"""rsLoRA and per-module rank and alpha patterns, against peft's own choices."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxlora
from jaxlora import models
from jaxlora.config import layer_module_name

# V=101, D=40, F=72, H=5, K=1, hd=12 (H * hd = 60 != D), L=3.
HF_CONFIG = {
    "vocab_size": 101,
    "hidden_size": 40,
    "intermediate_size": 72,
    "num_hidden_layers": 3,
    "num_attention_heads": 5,
    "num_key_value_heads": 1,
    "head_dim": 12,
}

PATTERN_CASES = {
    "rslora-module-and-layer": {
        "r": 8, "lora_alpha": 16, "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"q_proj": 4, "layers.1.self_attn.v_proj": 2},
        "alpha_pattern": {"v_proj": 3, r"model\.layers\.2\.mlp\.down_proj": 5.5},
    },
    "first-key-wins": {
        "r": 6, "lora_alpha": 12,
        "target_modules": "all-linear",
        "rank_pattern": {r"layers\.0\..*_proj": 2, "up_proj": 3, "gate_proj": 5},
        "alpha_pattern": {"o_proj": 1, r".*": 4},
    },
}


def our_config(fields):
  return jaxlora.LoraConfig(
      rank=fields["r"], alpha=fields["lora_alpha"], targets=fields["target_modules"],
      use_rslora=fields.get("use_rslora", False),
      rank_pattern=fields.get("rank_pattern", {}), alpha_pattern=fields.get("alpha_pattern", {}),
  )


def peft_ranks_and_scales(fields):
  """Return `{per-layer module name: (rank, scale)}` as peft builds them."""
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
  model = peft.get_peft_model(model, peft.LoraConfig(**fields))
  out = {}
  for name, module in model.base_model.model.named_modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      out[name] = (module.r["default"], module.scaling["default"])
  return out


def our_ranks_and_scales(config):
  """Return `{per-layer module name: (rank, scale)}` from the adapted tree."""
  base = models.init_params(models.LlamaConfig(**HF_CONFIG), jax.random.PRNGKey(0))
  adapted = jaxlora.apply(base, config)
  out = {}
  for path, node in jaxlora.paths.iter_modules(adapted):
    if "lora" not in node:
      continue
    a, scale = np.asarray(node["lora"]["a"]), np.asarray(node["lora"]["scale"])
    for layer in range(a.shape[0]):
      rank = int(np.sum(np.any(a[layer] != 0, axis=0)))
      out[layer_module_name(path, layer)] = (rank, float(scale[layer]))
  return out


@pytest.mark.parametrize("case", sorted(PATTERN_CASES))
def test_patterns_match_peft(case):
  fields = PATTERN_CASES[case]
  expected = peft_ranks_and_scales(fields)
  config = our_config(fields)

  actual = our_ranks_and_scales(config)

  assert sorted(actual) == sorted(expected)
  for name, (rank, scale) in expected.items():
    assert actual[name][0] == rank, name
    assert config.rank_for(name) == rank, name
    assert actual[name][1] == pytest.approx(scale, rel=1e-6), name


def test_rslora_scale():
  config = jaxlora.LoraConfig(rank=16, alpha=8, use_rslora=True, alpha_pattern={"v_proj": 32})
  assert config.scale == 2.0
  assert config.scale_for("model.layers.0.self_attn.q_proj") == 2.0
  assert config.scale_for("model.layers.0.self_attn.v_proj") == 8.0


def test_pattern_key_anchoring():
  config = jaxlora.LoraConfig(rank_pattern={"proj": 2, "layers.1.mlp.up_proj": 4})
  # A key must match whole dotted components at the end of the name.
  assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
  assert config.rank_for("model.layers.1.mlp.up_proj") == 4
  assert config.rank_for("model.layers.11.mlp.up_proj") == 8
  assert config.rank_for("model.layers.0.proj") == 2


def test_padded_ranks_stay_zero_in_training():
  config = our_config(PATTERN_CASES["rslora-module-and-layer"])
  base = models.init_params(models.LlamaConfig(**HF_CONFIG), jax.random.PRNGKey(0))
  adapted = jaxlora.apply(base, config)
  v_proj = adapted["model"]["layers"]["self_attn"]["v_proj"]["lora"]
  trainable, frozen = jaxlora.partition(adapted)
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  model = models.Llama(models.LlamaConfig(**HF_CONFIG))

  def loss(trainable):
    logits = model.apply({"params": jaxlora.combine(trainable, frozen)}, ids)
    return jnp.mean(logits ** 2)

  # B starts at zero, so one step moves only B; a second gradient then reaches A.
  grad = jax.jit(jax.grad(loss))
  grads = grad(trainable)
  moved = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
  grads = grad(moved)
  v_grads = grads["model"]["layers"]["self_attn"]["v_proj"]["lora"]

  assert v_proj["a"].shape == (3, 40, 8)
  assert np.all(np.asarray(v_proj["a"][1, :, 2:]) == 0)
  assert np.all(np.asarray(v_grads["a"][1, :, 2:]) == 0)
  assert np.all(np.asarray(v_grads["b"][1, 2:, :]) == 0)
  assert np.any(np.asarray(v_grads["a"][1, :, :2]) != 0)
  assert np.any(np.asarray(v_grads["a"][0, :, 2:]) != 0)


def test_unmatched_pattern_key_raises():
  base = models.init_params(models.LlamaConfig(**HF_CONFIG), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"select no targeted module: rank_pattern\['down_proj'\]"):
    jaxlora.apply(base, rank_pattern={"down_proj": 2})


def test_pattern_rank_above_kernel_side():
  base = models.init_params(models.LlamaConfig(**HF_CONFIG), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="LoRA rank 13 exceeds .* model.layers.0.self_attn.v_proj"):
    jaxlora.apply(base, rank_pattern={"layers.0.self_attn.v_proj": 13})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer, got 0"),
        ({"rank_pattern": {"q_proj": 2.0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"alpha_pattern": {"q_proj": -1}}, r"alpha_pattern\['q_proj'\] must be a positive number"),
        ({"rank_pattern": {"q_proj(": 2}}, "rank_pattern key 'q_proj\\(' is not a valid regular expression"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a dict"),
        ({"use_rslora": "yes"}, "use_rslora must be True or False"),
    ],
)
def test_config_invalid_patterns(fields, message):
  with pytest.raises(ValueError, match=message):
    jaxlora.LoraConfig(**fields)


def test_config_dict_round_trip():
  config = our_config(PATTERN_CASES["rslora-module-and-layer"])

  restored = jaxlora.LoraConfig.from_dict(config.to_dict())

  assert restored == config
  assert hash(restored) == hash(config)
  with pytest.raises(ValueError, match=r"Unknown LoraConfig fields \['r'\]"):
    jaxlora.LoraConfig.from_dict({"r": 4})

"""Parameter counts and peft's summary line, against peft on torch's meta device."""

import jax
import peft
import pytest
import torch
import transformers

import jaxlora
from jaxlora import models


def hf_config(tied):
  return transformers.LlamaConfig(
      vocab_size=101,
      hidden_size=40,
      intermediate_size=72,
      num_hidden_layers=3,
      num_attention_heads=5,
      num_key_value_heads=1,
      head_dim=12,
      tie_word_embeddings=tied,
  )


def peft_line(config, capsys, **lora_fields):
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
  model = peft.get_peft_model(model, peft.LoraConfig(**lora_fields))
  capsys.readouterr()
  model.print_trainable_parameters()
  return capsys.readouterr().out


def jaxlora_line(config, capsys, **lora_fields):
  ours = models.LlamaConfig.from_hf(config.to_dict())
  shapes = jax.eval_shape(lambda: jaxlora.apply(models.init_params(ours, jax.random.PRNGKey(0)), **lora_fields))
  capsys.readouterr()
  jaxlora.print_trainable_parameters(shapes)
  return capsys.readouterr().out


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    "peft_fields, our_fields",
    [
        ({}, {}),
        ({"r": 4, "target_modules": ["k_proj", "down_proj"]}, {"rank": 4, "targets": ["k_proj", "down_proj"]}),
        ({"r": 8, "target_modules": "all-linear"}, {"rank": 8, "targets": "all-linear"}),
        ({"r": 2, "target_modules": r".*mlp\.(gate|up)_proj"}, {"rank": 2, "targets": r".*mlp\.(gate|up)_proj"}),
    ],
    ids=["defaults", "names", "all-linear", "regex"],
)
def test_counts_match_peft(tied, peft_fields, our_fields, capsys):
  config = hf_config(tied)
  expected = peft_line(config, capsys, **peft_fields)
  assert expected.startswith("trainable params: ")
  assert jaxlora_line(config, capsys, **our_fields) == expected

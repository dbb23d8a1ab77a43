"""peft adapter folders both ways on Llama: ours -> peft, peft -> ours, ours -> peft -> ours."""

import json
import os
import zlib

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch

import jaxlora
from jaxlora import paths
from jaxlora.models import Llama, load, untie_output_head
from jaxlora.models.peft_io import load_peft_adapter, peft_layout, save_peft_adapter

from conftest import TINY_LLAMA, build_hf_llama

# Largest absolute logit difference allowed between our model and peft's, float32.
LOGITS_ATOL = 1e-4

LORA_CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora-patterns": {
        "r": 8, "lora_alpha": 16, "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"],
        "rank_pattern": {"q_proj": 4, "layers.1.self_attn.v_proj": 2, "lm_head": 3},
        "alpha_pattern": {"v_proj": 3, r"model\.layers\.2\.mlp\.down_proj": 5.5},
    },
}


def our_config(fields):
  return jaxlora.LoraConfig(
      rank=fields["r"], alpha=fields["lora_alpha"], targets=fields["target_modules"],
      use_rslora=fields.get("use_rslora", False),
      rank_pattern=fields.get("rank_pattern", {}), alpha_pattern=fields.get("alpha_pattern", {}),
  )


def randomize_b(params, seed=5):
  """Return a copy whose adapter B matrices are random within each layer's rank.

  Rows of B beyond a layer's rank (zero columns of A) stay zero, as training keeps them.
  """
  def fill(node, prefix):
    out = {}
    for key, value in node.items():
      out[key] = fill(value, prefix + (key,)) if isinstance(value, dict) else value
    if "a" in node and "b" in node:
      key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(".".join(prefix).encode()))
      used = np.any(np.asarray(node["a"]) != 0, axis=-2)[..., :, None]
      noise = 0.3 * np.asarray(jax.random.normal(key, node["b"].shape))
      out["b"] = jax.numpy.asarray(np.where(used, noise, 0.0).astype(np.float32))
    return out

  return fill(params, ())


def token_ids(length=20, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(0, TINY_LLAMA["vocab_size"], (2, length)).astype(np.int32)


def torch_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def our_logits(config, params, ids):
  return np.asarray(Llama(config).apply({"params": params}, ids))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """Return `(folder, loaded Pretrained)` of a random untied tiny Llama."""
  folder = tmp_path_factory.mktemp("peft_io") / "base"
  build_hf_llama(seed=3).save_pretrained(folder)
  return folder, load(folder)


def hf_base(folder):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def trained_adapter(pretrained, fields):
  config = our_config(fields)
  params = jaxlora.apply(pretrained.params, config, rng=jax.random.PRNGKey(7))
  return config, randomize_b(params)


def peft_adapter_folder(base_folder, fields, out):
  """Write a peft adapter with random A and B for `fields`; return the peft model."""
  model = peft.get_peft_model(hf_base(base_folder), peft.LoraConfig(**fields))
  torch.manual_seed(11)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "lora_B" in name:
        parameter.normal_(0.0, 0.3)
  model.save_pretrained(out)
  return model.eval()


# ------------------------------------------------------------------ layout


def test_peft_layout_round_trip():
  a = np.random.RandomState(0).randn(48, 4).astype(np.float32)
  b = np.random.RandomState(1).randn(4, 72).astype(np.float32)

  lora_a, lora_b = peft_layout(a, b)
  back_a, back_b = peft_layout(lora_a, lora_b)

  assert lora_a.shape == (4, 48)
  assert lora_b.shape == (72, 4)
  np.testing.assert_array_equal(back_a, a)
  np.testing.assert_array_equal(back_b, b)
  np.testing.assert_allclose(lora_b @ lora_a, (a @ b).T, rtol=1e-6)


def test_peft_layout_matches_peft_module(base):
  folder, _ = base
  model = peft.get_peft_model(hf_base(folder), peft.LoraConfig(r=4, target_modules=["q_proj"]))
  q_proj = model.base_model.model.model.layers[0].self_attn.q_proj

  assert tuple(q_proj.lora_A["default"].weight.shape) == (4, 48)
  assert tuple(q_proj.lora_B["default"].weight.shape) == (72, 4)


# ------------------------------------------------------------------ ours -> peft


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_export_logits_match_peft(base, tmp_path, case):
  folder, pretrained = base
  config, params = trained_adapter(pretrained, LORA_CASES[case])
  ids = token_ids()

  save_peft_adapter(tmp_path / "adapter", pretrained.config, params, config, base_model_name_or_path=str(folder))
  model = peft.PeftModel.from_pretrained(hf_base(folder), tmp_path / "adapter").eval()

  expected = our_logits(pretrained.config, params, ids)
  plain = our_logits(pretrained.config, pretrained.params, ids)
  assert np.abs(expected - plain).max() > 1e-2, "the adapters should change the logits"
  np.testing.assert_allclose(torch_logits(model, ids), expected, atol=LOGITS_ATOL, rtol=0)


def test_export_files(base, tmp_path):
  folder, pretrained = base
  config, params = trained_adapter(pretrained, LORA_CASES["rslora-patterns"])

  save_peft_adapter(tmp_path / "adapter", pretrained.config, params, config, base_model_name_or_path=str(folder))

  fields = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  tensors = safetensors.numpy.load_file(tmp_path / "adapter" / "adapter_model.safetensors")
  assert fields["peft_type"] == "LORA"
  assert fields["task_type"] == "CAUSAL_LM"
  assert fields["r"] == 8
  assert fields["lora_alpha"] == 16
  assert fields["use_rslora"] is True
  assert fields["target_modules"] == ["down_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
  assert fields["rank_pattern"] == LORA_CASES["rslora-patterns"]["rank_pattern"]
  assert list(fields["rank_pattern"]) == list(LORA_CASES["rslora-patterns"]["rank_pattern"]), "order decides"
  assert fields["alpha_pattern"] == LORA_CASES["rslora-patterns"]["alpha_pattern"]
  assert fields["base_model_name_or_path"] == str(folder)
  assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (2, 48)
  assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (24, 8)
  assert tensors["base_model.model.lm_head.lora_A.weight"].shape == (3, 48)
  assert len(tensors) == 2 * (4 * 3 + 1)
  a = params["model"]["layers"]["mlp"]["down_proj"]["lora"]["a"]
  np.testing.assert_array_equal(
      tensors["base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"], np.asarray(a[2]).T
  )


# ------------------------------------------------------------------ peft -> ours


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_import_logits_match_peft(base, tmp_path, case):
  folder, pretrained = base
  model = peft_adapter_folder(folder, LORA_CASES[case], tmp_path / "adapter")
  ids = token_ids(seed=1)

  adapter = load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)

  ours = our_logits(pretrained.config, adapter.params, ids)
  np.testing.assert_allclose(ours, torch_logits(model, ids), atol=LOGITS_ATOL, rtol=0)
  fields = LORA_CASES[case]
  assert adapter.lora_config.rank == fields["r"]
  assert adapter.lora_config.alpha == fields["lora_alpha"]
  assert adapter.lora_config.use_rslora == fields.get("use_rslora", False)
  assert adapter.lora_config.rank_pattern == fields.get("rank_pattern", {})
  assert adapter.lora_config.alpha_pattern == fields.get("alpha_pattern", {})


def test_import_frozen_or_trainable(base, tmp_path):
  folder, pretrained = base
  peft_adapter_folder(folder, LORA_CASES["plain"], tmp_path / "adapter")

  frozen = load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)
  trainable = load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params, trainable=True)

  frozen_half, _ = jaxlora.partition(frozen.params, trainable_mask=frozen.trainable_mask)
  trainable_half, _ = jaxlora.partition(trainable.params, trainable_mask=trainable.trainable_mask)
  assert frozen_half == {}
  assert sorted(paths.module_name(p) for p, _ in paths.iter_leaves(trainable_half)) == [
      f"model.layers.self_attn.{module}.lora.{side}"
      for module in ("q_proj", "v_proj") for side in ("a", "b")
  ]


def test_import_partial_layers(base, tmp_path):
  folder, pretrained = base
  fields = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": [0, 2]}
  model = peft_adapter_folder(folder, fields, tmp_path / "adapter")
  ids = token_ids(seed=2)

  adapter = load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)

  q_proj = adapter.params["model"]["layers"]["self_attn"]["q_proj"]["lora"]
  assert not np.any(np.asarray(q_proj["a"][1]))
  assert not np.any(np.asarray(q_proj["b"][1]))
  ours = our_logits(pretrained.config, adapter.params, ids)
  np.testing.assert_allclose(ours, torch_logits(model, ids), atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------ ours -> peft -> ours


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_round_trip_is_exact(base, tmp_path, case):
  _, pretrained = base
  config, params = trained_adapter(pretrained, LORA_CASES[case])

  save_peft_adapter(tmp_path / "adapter", pretrained.config, params, config)
  adapter = load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)

  restored = dict(paths.iter_leaves(adapter.params))
  for path, leaf in paths.iter_leaves(params):
    np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(leaf), err_msg=paths.module_name(path))
  assert sorted(restored) == sorted(dict(paths.iter_leaves(params)))
  for field in ("rank", "alpha", "use_rslora", "rank_pattern", "alpha_pattern", "dropout"):
    assert getattr(adapter.lora_config, field) == getattr(config, field), field


# ------------------------------------------------------------------ bad input


def write_adapter(folder, fields, tensors):
  os.makedirs(folder, exist_ok=True)
  (folder / "adapter_config.json").write_text(json.dumps(fields))
  safetensors.numpy.save_file(tensors, folder / "adapter_model.safetensors")


def q_proj_pair(layer=0, rank=4, in_features=48, out_features=72):
  prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
  return {
      f"{prefix}.lora_A.weight": np.zeros((rank, in_features), np.float32),
      f"{prefix}.lora_B.weight": np.zeros((out_features, rank), np.float32),
  }


PLAIN_FIELDS = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def test_import_wrong_shape(base, tmp_path):
  _, pretrained = base
  tensors = {**q_proj_pair(0), **q_proj_pair(1, out_features=24)}
  write_adapter(tmp_path / "adapter", PLAIN_FIELDS, tensors)

  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
  with pytest.raises(ValueError, match=rf"{key} has shape \[24, 4\], .* needs \[72, 4\]"):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)


def test_import_rank_differs_from_config(base, tmp_path):
  _, pretrained = base
  write_adapter(tmp_path / "adapter", {**PLAIN_FIELDS, "r": 8}, q_proj_pair(0, rank=4))

  with pytest.raises(ValueError, match=r"lora_A.weight has shape \[4, 48\], .*rank 8 .* needs \[8, 48\]"):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)


def test_import_other_architecture(base, tmp_path):
  _, pretrained = base
  tensors = {
      "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((4, 48), np.float32),
      "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": np.zeros((144, 4), np.float32),
  }
  write_adapter(tmp_path / "adapter", {**PLAIN_FIELDS, "target_modules": ["c_attn"]}, tensors)

  with pytest.raises(ValueError, match="made for another architecture.*gpt2 modules, but the base model is llama"):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)


def test_import_other_architecture_class(base, tmp_path):
  _, pretrained = base
  fields = {**PLAIN_FIELDS, "auto_mapping": {"base_model_class": "Qwen2ForCausalLM"}}
  write_adapter(tmp_path / "adapter", fields, q_proj_pair(0))

  with pytest.raises(ValueError, match="adapter for Qwen2ForCausalLM, but the base model is llama"):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)


def test_import_unknown_keys_sorted(base, tmp_path):
  _, pretrained = base
  tensors = {
      **q_proj_pair(0),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.zeros((72,), np.float32),
      "base_model.model.model.embed_tokens.lora_embedding_A": np.zeros((4, 97), np.float32),
  }
  write_adapter(tmp_path / "adapter", PLAIN_FIELDS, tensors)

  expected = (
      "['base_model.model.model.embed_tokens.lora_embedding_A',"
      " 'base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector']"
  )
  with pytest.raises(ValueError) as error:
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)
  assert f"keys that the llama layout does not contain: {expected}" in str(error.value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({**PLAIN_FIELDS, "peft_type": "IA3"}, "peft_type 'IA3'; only LoRA adapters"),
        ({k: v for k, v in PLAIN_FIELDS.items() if k != "r"}, "missing 'r', the LoRA rank"),
        ({**PLAIN_FIELDS, "use_dora": True}, "does not implement: use_dora=True"),
        ({**PLAIN_FIELDS, "bias": "all"}, "does not implement: bias='all'"),
    ],
    ids=["ia3", "missing-r", "dora", "bias"],
)
def test_import_bad_config(base, tmp_path, fields, message):
  _, pretrained = base
  write_adapter(tmp_path / "adapter", fields, q_proj_pair(0))

  with pytest.raises(ValueError, match=message):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)


def test_import_missing_files(base, tmp_path):
  _, pretrained = base
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="adapter_config.json not found"):
    load_peft_adapter(tmp_path / "empty", pretrained.config, pretrained.params)
  (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(PLAIN_FIELDS))
  with pytest.raises(ValueError, match="adapter_model.safetensors not found"):
    load_peft_adapter(tmp_path / "empty", pretrained.config, pretrained.params)


def test_import_onto_adapted_tree(base, tmp_path):
  _, pretrained = base
  write_adapter(tmp_path / "adapter", PLAIN_FIELDS, q_proj_pair(0))
  adapted = jaxlora.apply(pretrained.params, rank=2)

  with pytest.raises(ValueError, match="q_proj already has an adapter"):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, adapted)


def test_export_wrong_lora_config(base, tmp_path):
  _, pretrained = base
  config, params = trained_adapter(pretrained, LORA_CASES["plain"])

  with pytest.raises(ValueError, match="has scale 2.0, but lora_config gives 1.0"):
    save_peft_adapter(tmp_path / "a", pretrained.config, params, jaxlora.LoraConfig(rank=4, alpha=4))
  with pytest.raises(ValueError, match=r"lora_config targets \['model.layers.self_attn.q_proj'\], but"):
    save_peft_adapter(tmp_path / "b", pretrained.config, params, jaxlora.LoraConfig(rank=4, alpha=8, targets=["q_proj"]))
  with pytest.raises(ValueError, match="has no LoRA adapters"):
    save_peft_adapter(tmp_path / "c", pretrained.config, pretrained.params, config)
  assert not os.path.exists(tmp_path / "a")


def test_import_base_weight_differs(base, tmp_path):
  _, pretrained = base
  head = np.asarray(pretrained.params["lm_head"]["kernel"]).T + 1.0
  tensors = {**q_proj_pair(0), "base_model.model.lm_head.base_layer.weight": head}
  write_adapter(tmp_path / "adapter", PLAIN_FIELDS, tensors)

  with pytest.raises(ValueError, match=r"stores base_model.model.lm_head.base_layer.weight .* differs from the base model's lm_head.kernel"):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)


def test_tied_head_adapter_both_ways(tmp_path):
  model = build_hf_llama(seed=4, tie_word_embeddings=True)
  model.save_pretrained(tmp_path / "tied")
  pretrained = load(tmp_path / "tied")
  config, untied = untie_output_head(pretrained.config, pretrained.params)
  lora_config = jaxlora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "lm_head"])
  params = randomize_b(jaxlora.apply(untied, lora_config))
  ids = token_ids(seed=4)

  save_peft_adapter(tmp_path / "adapter", config, params, lora_config)
  peft_model = peft.PeftModel.from_pretrained(hf_base(tmp_path / "tied"), tmp_path / "adapter").eval()

  expected = our_logits(config, params, ids)
  np.testing.assert_allclose(torch_logits(peft_model, ids), expected, atol=LOGITS_ATOL, rtol=0)
  with pytest.raises(ValueError, match="targets lm_head, which the base model does not have.*untie_output_head"):
    load_peft_adapter(tmp_path / "adapter", pretrained.config, pretrained.params)
  adapter = load_peft_adapter(tmp_path / "adapter", config, untied)
  np.testing.assert_array_equal(our_logits(config, adapter.params, ids), expected)

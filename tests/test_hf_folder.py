"""Hugging Face folders: config.json, safetensors reading and writing, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

import jaxlora
from jaxlora import paths
from jaxlora.models import Llama, LlamaConfig, load, save_pretrained
from jaxlora.models import hf_folder
from jaxlora.models.architectures import architecture

from conftest import LLAMA3_SCALING, TINY_LLAMA

LOGITS_ATOL = 1e-4


def torch_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.float().numpy()


def token_ids(length=24, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(0, TINY_LLAMA["vocab_size"], (2, length)).astype(np.int32)


def assert_same_state(actual, expected):
  """Assert that two torch modules have the same tensors, bit for bit."""
  actual_state, expected_state = actual.state_dict(), expected.state_dict()
  assert sorted(actual_state) == sorted(expected_state)
  for key, value in expected_state.items():
    assert actual_state[key].dtype == value.dtype, key
    assert torch.equal(actual_state[key], value), key


def word_tokenizer():
  """Return a word-level fast tokenizer over TINY_LLAMA's 97 ids."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"w{i}": i for i in range(3, TINY_LLAMA["vocab_size"])})
  model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
  )


def rewrite_weights(folder, edit):
  """Replace `folder/model.safetensors` with `edit(tensors)`."""
  path = os.path.join(folder, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  safetensors.numpy.save_file(edit(tensors), path, metadata={"format": "pt"})


# ------------------------------------------------------------------ config


def test_config_reads_both_layouts():
  v4 = {
      "model_type": "llama", **TINY_LLAMA, "rope_theta": 321.0,
      "rope_scaling": {"type": "linear", "factor": 2.0},
  }
  v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
  v5["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 321.0}

  old, new = LlamaConfig.from_hf(v4), LlamaConfig.from_hf(v5)

  assert old == new
  assert new.rope_theta == 321.0
  assert new.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_config_to_hf_round_trip(scaling):
  config = LlamaConfig(**TINY_LLAMA, rope_scaling=scaling, eos_token_id=[2, 5])
  hf = transformers.LlamaConfig.from_dict(config.to_hf())
  expected_rope = {"rope_type": "default"} if scaling is None else dict(scaling)

  assert hf.rope_parameters == {**expected_rope, "rope_theta": TINY_LLAMA["rope_theta"]}
  assert hf.head_dim == 12
  assert hf.num_key_value_heads == 2
  assert hf.eos_token_id == [2, 5]
  assert LlamaConfig.from_hf(hf.to_dict()) == config
  assert hash(LlamaConfig.from_hf(hf.to_dict())) == hash(config)


def test_config_unknown_model_type():
  with pytest.raises(ValueError, match="'gpt2'.*Supported model types: llama"):
    LlamaConfig.from_hf({"model_type": "gpt2", **TINY_LLAMA})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_key_value_heads", 4, "not a multiple of num_key_value_heads=4"),
        ("hidden_size", 0, "hidden_size must be a positive integer"),
        ("head_dim", 12.0, "head_dim must be a positive integer"),
        ("rms_norm_eps", 0.0, "rms_norm_eps must be positive"),
    ],
)
def test_config_rejects_bad_sizes(field, value, message):
  with pytest.raises(ValueError, match=message):
    LlamaConfig(**{**TINY_LLAMA, field: value})


def test_config_rejects_incomplete_llama3():
  scaling = {k: v for k, v in LLAMA3_SCALING.items() if k != "low_freq_factor"}
  with pytest.raises(ValueError, match="is missing low_freq_factor"):
    LlamaConfig(**TINY_LLAMA, rope_scaling=scaling)


def test_config_rejects_other_activation():
  with pytest.raises(ValueError, match="hidden_act 'gelu'"):
    LlamaConfig.from_hf({"model_type": "llama", **TINY_LLAMA, "hidden_act": "gelu"})


# ------------------------------------------------------------------ keys


def test_key_rules_invert_hf_key():
  config = LlamaConfig(**TINY_LLAMA, attention_bias=True, mlp_bias=True)
  expected = hf_folder.expected_tensors(config)

  assert len(expected) == 3 + 3 * (2 + 7 * 2)
  for key, tensor in expected.items():
    assert architecture("llama").parse_key(key)[:2] == (tensor.path, tensor.layer), key


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.self_attn.q_proj.weight_scale",
        "base_model.model.norm.weight",
        "model.layers.x.mlp.up_proj.weight",
        "model.layers.0.self_attn.gate_proj.weight",
    ],
)
def test_key_rules_are_anchored(key):
  assert architecture("llama").parse_key(key) is None


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("tied", [False, True])
def test_load_logits_match(hf_llama_folder, tied):
  folder, model = hf_llama_folder(tie_word_embeddings=tied, rope_scaling=LLAMA3_SCALING)
  ids = token_ids()

  loaded = load(folder)
  ours = Llama(loaded.config).apply({"params": loaded.params}, ids)

  assert loaded.source_dtype == "float32"
  assert loaded.tokenizer is None
  assert loaded.generation_config["bos_token_id"] == 1
  assert ("lm_head" in loaded.params) == (not tied)
  np.testing.assert_allclose(np.asarray(ours), torch_logits(model, ids), atol=LOGITS_ATOL, rtol=0)


def test_load_sharded(hf_llama_folder):
  single, _ = hf_llama_folder("single")
  sharded, _ = hf_llama_folder("sharded", max_shard_size="20KB")
  assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 2

  expected = load(single).params
  actual = load(sharded).params

  for (path, a), (_, b) in zip(paths.iter_leaves(actual), paths.iter_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=paths.module_name(path))


def test_load_bfloat16(hf_llama_folder):
  folder, model = hf_llama_folder(dtype=torch.bfloat16)

  kept = load(folder)
  widened = load(folder, dtype=jnp.float32)

  assert kept.source_dtype == "bfloat16"
  assert kept.params["model"]["embed_tokens"]["embedding"].dtype == jnp.bfloat16
  assert widened.params["model"]["embed_tokens"]["embedding"].dtype == jnp.float32
  q_proj = model.model.layers[2].self_attn.q_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(
      np.asarray(widened.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][2]), q_proj.T
  )


def test_load_tokenizer(hf_llama_folder):
  folder, _ = hf_llama_folder()
  word_tokenizer().save_pretrained(folder)

  tokenizer = load(folder).tokenizer

  assert tokenizer("w5 w9 w96 zz")["input_ids"] == [5, 9, 96, 0]


# ------------------------------------------------------------------ saving


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_through_transformers(hf_llama_folder, tmp_path, tied):
  folder, model = hf_llama_folder(tie_word_embeddings=tied, attention_bias=True)
  loaded = load(folder)
  out = tmp_path / "saved"

  save_pretrained(
      out, loaded.config, loaded.params, generation_config=loaded.generation_config
  )
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
  ids = token_ids()

  assert_same_state(reloaded, model)
  np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(model, ids))
  assert json.loads((out / "generation_config.json").read_text()) == loaded.generation_config
  assert reloaded.config.tie_word_embeddings == tied
  tied_in_torch = reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
  assert tied_in_torch == tied
  with safetensors.safe_open(out / "model.safetensors", "np") as f:
    assert ("lm_head.weight" in f.keys()) == (not tied)


def test_round_trip_bfloat16(hf_llama_folder, tmp_path):
  folder, model = hf_llama_folder(dtype=torch.bfloat16)
  loaded = load(folder)
  out = tmp_path / "saved"

  save_pretrained(out, loaded.config, loaded.params, dtype=loaded.source_dtype)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)

  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  assert reloaded.dtype == torch.bfloat16
  assert_same_state(reloaded, model)
  assert load(out).source_dtype == "bfloat16"


def test_save_casts_to_bfloat16(hf_llama_folder, tmp_path):
  folder, model = hf_llama_folder()
  loaded = load(folder)

  save_pretrained(tmp_path / "half", loaded.config, loaded.params, dtype=jnp.bfloat16)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "half")

  assert_same_state(reloaded, model.to(torch.bfloat16))


def test_save_merged_adapters(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  adapted = jaxlora.apply(loaded.params, rank=4, targets="all-linear")
  adapted = paths.map_with_path(
      lambda path, leaf: leaf + 0.05 if path[-1] == "b" else leaf, adapted
  )
  ids = token_ids()
  expected = Llama(loaded.config).apply({"params": adapted}, ids)

  save_pretrained(tmp_path / "merged", loaded.config, jaxlora.merge(adapted))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")

  np.testing.assert_allclose(torch_logits(reloaded, ids), np.asarray(expected), atol=LOGITS_ATOL, rtol=0)


def test_save_tokenizer(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)

  save_pretrained(tmp_path / "out", loaded.config, loaded.params, tokenizer=word_tokenizer())

  assert load(tmp_path / "out").tokenizer("w7 w8")["input_ids"] == [7, 8]


def test_save_rejects_adapters(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  adapted = jaxlora.apply(loaded.params, rank=4)

  with pytest.raises(ValueError, match="call jaxlora.merge|Call jaxlora.merge"):
    save_pretrained(tmp_path / "out", loaded.config, adapted)
  assert not os.path.exists(tmp_path / "out")


def test_save_rejects_mismatched_tree(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  tied_config = LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True})

  with pytest.raises(ValueError, match=r"unexpected keys \['lm_head.kernel'\].*untie_output_head"):
    save_pretrained(tmp_path / "out", tied_config, loaded.params)


def test_save_existing_folder(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.txt").write_text("old")

  with pytest.raises(ValueError, match="already exists.*overwrite=True"):
    save_pretrained(out, loaded.config, loaded.params)
  save_pretrained(out, loaded.config, loaded.params, overwrite=True)

  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["hf", "out"]


def test_save_rejects_bad_dtype(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  with pytest.raises(ValueError, match="Cannot save weights as int8"):
    save_pretrained(tmp_path / "out", loaded.config, loaded.params, dtype="int8")
  with pytest.raises(ValueError, match="Cannot save weights as 'float33'"):
    save_pretrained(tmp_path / "out", loaded.config, loaded.params, dtype="float33")


@pytest.mark.parametrize("dtype", ["int8", "float33"])
def test_load_rejects_bad_dtype(hf_llama_folder, dtype):
  folder, _ = hf_llama_folder()
  with pytest.raises(ValueError, match=f"dtype '{dtype}' is not a floating-point dtype"):
    load(folder, dtype=dtype)


# ------------------------------------------------------------------ bad input


def test_load_missing_path(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    load(tmp_path / "nowhere")


def test_load_folder_without_config(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ValueError, match="config.json not found"):
    load(tmp_path)


def test_load_two_gguf_files(tmp_path):
  (tmp_path / "a.gguf").write_bytes(b"")
  (tmp_path / "b.gguf").write_bytes(b"")
  with pytest.raises(ValueError, match="2 .gguf files"):
    load(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe not utf-8", "config.json is not valid UTF-8 JSON"),
        (b"[1, 2]", "config.json contains a JSON list, but a JSON object is expected"),
    ],
)
def test_load_bad_config_json(hf_llama_folder, content, message):
  folder, _ = hf_llama_folder()
  (folder / "config.json").write_bytes(content)

  with pytest.raises(ValueError, match=message):
    load(folder)


def test_saved_weights_readable_by_all(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  out = tmp_path / "saved"

  save_pretrained(out, loaded.config, loaded.params)

  assert os.stat(out / "model.safetensors").st_mode & 0o777 == 0o644


def test_load_truncated_weights(hf_llama_folder):
  folder, _ = hf_llama_folder()
  path = folder / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-1000])

  with pytest.raises(ValueError, match="model.safetensors is truncated or corrupt.*Download"):
    load(folder)


def test_load_missing_key(hf_llama_folder):
  folder, _ = hf_llama_folder()
  rewrite_weights(
      folder, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
  )
  with pytest.raises(
      ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]; unexpected keys none"
  ):
    load(folder)


def test_load_unexpected_keys(hf_llama_folder):
  folder, _ = hf_llama_folder()

  def add(tensors):
    tensors["model.layers.3.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 48), np.float32)
    return tensors

  rewrite_weights(folder, add)
  with pytest.raises(ValueError) as error:
    load(folder)
  assert (
      "missing keys none; unexpected keys ['model.layers.0.self_attn.q_proj.lora_A.weight',"
      " 'model.layers.3.mlp.up_proj.weight']"
  ) in str(error.value)


def test_load_wrong_shape(hf_llama_folder):
  folder, _ = hf_llama_folder()
  key = "model.layers.2.self_attn.o_proj.weight"
  rewrite_weights(folder, lambda t: {**t, key: np.ascontiguousarray(t[key].T)})

  with pytest.raises(ValueError, match=rf"{key} has shape \[72, 48\].*implies \[48, 72\]"):
    load(folder)


def test_load_unknown_model_type(hf_llama_folder):
  folder, _ = hf_llama_folder()
  config = json.loads((folder / "config.json").read_text())
  config["model_type"] = "falcon"
  (folder / "config.json").write_text(json.dumps(config))

  with pytest.raises(
      ValueError,
      match="Unsupported model_type 'falcon'. Supported model types: llama, mistral, qwen2, gemma, phi3, gpt2",
  ):
    load(folder)


def test_load_tied_with_different_head(hf_llama_folder):
  folder, _ = hf_llama_folder(tie_word_embeddings=True)
  rewrite_weights(
      folder, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1.0}
  )
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    load(folder)


def test_load_tied_with_equal_head(hf_llama_folder):
  folder, _ = hf_llama_folder(tie_word_embeddings=True)
  rewrite_weights(
      folder, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()}
  )
  assert "lm_head" not in load(folder).params


def test_load_missing_shard(hf_llama_folder):
  folder, _ = hf_llama_folder(max_shard_size="20KB")
  shard = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[1]
  os.remove(folder / shard)

  with pytest.raises(ValueError, match=f"{shard} not found"):
    load(folder)

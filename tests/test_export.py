"""Merged export: shards and index, saved dtype, copied side files, untied heads, the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers

import jaxlora
from jaxlora import paths
from jaxlora.models import Llama, load, save_merged, save_peft_adapter, save_pretrained, untie_output_head
from jaxlora.models import export, hf_writer

from conftest import TINY_LLAMA
from test_hf_folder import token_ids, torch_logits, word_tokenizer

LOGITS_ATOL = 1e-4
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def adapted(params, targets="all-linear", seed=1):
  """Return `params` with rank-4 adapters whose B is random, so they change the logits."""
  tree = jaxlora.apply(params, rank=4, alpha=8, targets=targets, rng=jax.random.PRNGKey(seed))
  key = jax.random.PRNGKey(seed + 1)
  return paths.map_with_path(
      lambda path, leaf: 0.3 * jax.random.normal(jax.random.fold_in(key, len(path)), leaf.shape)
      if path[-1] == "b" else leaf,
      tree,
  )


def weight_files(folder):
  return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))


def test_sharded_above_threshold(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  params = adapted(loaded.params)
  ids = token_ids()
  expected = np.asarray(Llama(loaded.config).apply({"params": params}, ids))

  save_merged(tmp_path / "sharded", loaded.config, params, max_shard_size="30KB")
  save_merged(tmp_path / "single", loaded.config, params)

  shards = weight_files(tmp_path / "sharded")
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert len(shards) > 2
  assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert sorted(set(index["weight_map"].values())) == shards
  assert index["metadata"]["total_size"] == sum(
      array.nbytes for array in hf_writer.to_hf_tensors(loaded.config, jaxlora.merge(params), "float32").values()
  )
  assert weight_files(tmp_path / "single") == ["model.safetensors"]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
  np.testing.assert_allclose(torch_logits(reloaded, ids), expected, atol=LOGITS_ATOL, rtol=0)
  ours = load(tmp_path / "sharded")
  np.testing.assert_allclose(
      np.asarray(Llama(ours.config).apply({"params": ours.params}, ids)), expected, atol=LOGITS_ATOL, rtol=0
  )


def test_dtype_defaults_to_source(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder(dtype=torch.bfloat16)
  loaded = load(folder)

  save_merged(tmp_path / "kept", loaded.config, adapted(loaded.params))
  save_merged(tmp_path / "wide", loaded.config, adapted(loaded.params), dtype="float32")

  assert json.loads((tmp_path / "kept" / "config.json").read_text())["dtype"] == "bfloat16"
  assert json.loads((tmp_path / "wide" / "config.json").read_text())["dtype"] == "float32"
  assert load(tmp_path / "kept").source_dtype == "bfloat16"
  assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "wide").dtype == torch.float32


def test_merge_in_float32_cast_once(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder(dtype=torch.bfloat16)
  loaded = load(folder)
  params = adapted(loaded.params, targets=["q_proj"])
  lora = params["model"]["layers"]["self_attn"]["q_proj"]["lora"]

  save_merged(tmp_path / "wide", loaded.config, params, dtype="float32")
  save_merged(tmp_path / "half", loaded.config, params, dtype="bfloat16")

  kernel = np.asarray(loaded.params["model"]["layers"]["self_attn"]["q_proj"]["kernel"][1], np.float32)
  delta = 2.0 * np.asarray(lora["a"][1], np.float64) @ np.asarray(lora["b"][1], np.float64)
  exact = (kernel + delta).T
  key = "model.layers.1.self_attn.q_proj.weight"
  with safetensors.safe_open(tmp_path / "wide" / "model.safetensors", "np") as f:
    wide = f.get_tensor(key)
  with safetensors.safe_open(tmp_path / "half" / "model.safetensors", "np") as f:
    half = f.get_tensor(key)
  np.testing.assert_allclose(wide, exact, rtol=0, atol=1e-6)
  # One rounding of the float32 sum: bfloat16 of the float32 result, not of a bfloat16 sum.
  np.testing.assert_array_equal(half, wide.astype(jnp.bfloat16))


def test_side_files_copied_unchanged(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  word_tokenizer().save_pretrained(folder)
  (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
  (folder / "generation_config.json").write_text('{"bos_token_id": 1, "do_sample": true,   "top_k": 7}\n')
  loaded = load(folder)

  save_merged(tmp_path / "out", loaded.config, adapted(loaded.params), source_folder=folder)

  copied = [name for name in hf_writer.COPIED_FILES if (folder / name).exists()]
  assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(copied)
  for name in copied:
    assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes(), name
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert tokenizer.chat_template == CHAT_TEMPLATE


def test_source_folder_excludes_tokenizer(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder()
  loaded = load(folder)
  with pytest.raises(ValueError, match="Pass either source_folder"):
    save_pretrained(tmp_path / "out", loaded.config, loaded.params, source_folder=folder, tokenizer=word_tokenizer())


def test_adapted_tied_head_unties_export(hf_llama_folder, tmp_path):
  folder, model = hf_llama_folder(tie_word_embeddings=True)
  loaded = load(folder)
  untied_config, untied = untie_output_head(loaded.config, loaded.params)
  params = adapted(untied, targets=["q_proj", "lm_head"])
  ids = token_ids()
  expected = np.asarray(Llama(untied_config).apply({"params": params}, ids))

  save_merged(tmp_path / "out", untied_config, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")

  assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
  with safetensors.safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    embedding = f.get_tensor("model.embed_tokens.weight")
  np.testing.assert_array_equal(embedding, model.model.embed_tokens.weight.detach().numpy())
  assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
  np.testing.assert_allclose(torch_logits(reloaded, ids), expected, atol=LOGITS_ATOL, rtol=0)


def test_untie_keeps_logits(hf_llama_folder):
  folder, _ = hf_llama_folder(tie_word_embeddings=True)
  loaded = load(folder)
  ids = token_ids()

  untied_config, untied = untie_output_head(loaded.config, loaded.params)

  assert untied_config.tie_word_embeddings is False
  np.testing.assert_array_equal(
      np.asarray(Llama(untied_config).apply({"params": untied}, ids)),
      np.asarray(Llama(loaded.config).apply({"params": loaded.params}, ids)),
  )
  with pytest.raises(ValueError, match="already false"):
    untie_output_head(untied_config, untied)


def test_tied_config_with_head_raises(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder(tie_word_embeddings=True)
  loaded = load(folder)
  _, untied = untie_output_head(loaded.config, loaded.params)

  with pytest.raises(ValueError, match="untie_output_head"):
    save_merged(tmp_path / "out", loaded.config, adapted(untied, targets=["lm_head"]))
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "size, expected",
    [(1000, 1000), ("5GB", 5 * 10**9), ("20KB", 20_000), ("2MiB", 2 * 2**20), (" 3 gb ", 3 * 10**9)],
)
def test_parse_size(size, expected):
  assert hf_writer.parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "GB", 0, -3, "1.5GB"])
def test_parse_size_invalid(size):
  with pytest.raises(ValueError, match="max_shard_size"):
    hf_writer.parse_size(size)


def test_cli_merges_adapter(hf_llama_folder, tmp_path):
  folder, _ = hf_llama_folder(dtype=torch.bfloat16)
  word_tokenizer().save_pretrained(folder)
  loaded = load(folder, dtype=jnp.float32)
  lora_config = jaxlora.LoraConfig(rank=4, alpha=8, targets=["v_proj", "up_proj"])
  params = adapted(loaded.params, targets=["v_proj", "up_proj"])
  save_peft_adapter(tmp_path / "adapter", loaded.config, params, lora_config)
  ids = token_ids()
  expected = np.asarray(Llama(loaded.config).apply({"params": params}, ids))

  export.main([
      str(folder), str(tmp_path / "out"), "--adapter", str(tmp_path / "adapter"),
      "--dtype", "float32", "--max-shard-size", "40KB",
  ])

  assert len(weight_files(tmp_path / "out")) > 1
  assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  np.testing.assert_allclose(torch_logits(reloaded, ids), expected, atol=LOGITS_ATOL, rtol=0)


def test_cli_rejects_bad_flags(capsys):
  with pytest.raises(SystemExit):
    export.parse_args(["base", "out", "--dtype", "int8"])
  with pytest.raises(SystemExit):
    export.parse_args(["base", "out", "--max-shard-size", "lots"])
  assert "max_shard_size 'lots' is not a size" in capsys.readouterr().err

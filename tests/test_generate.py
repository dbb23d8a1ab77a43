"""Tests for greedy generation with a tiny random Llama."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import jaxlora
from jaxlora.models import Llama, LlamaConfig, init_params
from jaxlora.train import generate

# Vocabulary 61, width 40, MLP 56, 4 heads of 12 (48 != 40), 2 kv heads.
WORDS = ["<pad>", "<unk>", "<eos>", "<user>", "<bot>"] + [f"w{i}" for i in range(56)]
CONFIG = LlamaConfig(
    vocab_size=len(WORDS), hidden_size=40, intermediate_size=56, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=12,
    max_position_embeddings=128, eos_token_id=2, pad_token_id=0,
)
TEMPLATE = (
    "{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<bot> ' }}"
    "{{ m['content'] }} {% if m['role'] != 'user' %}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<bot> {% endif %}"
)
PROMPTS = ["w1 w2", "w3 w4 w5 w6 w7 w8 w9", "w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 w21"]
NO_EOS = {"eos_token_id": []}
# Every test generates this many tokens, so the tests share compiled loops.
STEPS = 10
REFERENCE_WIDTH = 48


@pytest.fixture(scope="module")
def tokenizer():
  """A word-level tokenizer: one id per space-separated word."""
  vocab = {word: index for index, word in enumerate(WORDS)}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
  )
  tokenizer.chat_template = TEMPLATE
  return tokenizer


@pytest.fixture(scope="module")
def model_and_params():
  params = init_params(CONFIG, jax.random.PRNGKey(0))
  # The default 0.02 scale gives nearly flat logits whose argmax barely
  # moves; larger weights make the greedy path vary from token to token.
  params = jax.tree.map(lambda x: x * 25.0, params)
  return Llama(CONFIG), params


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids):
  return model.apply({"params": params}, ids)


def _reference(model, params, prompt_ids, steps, eos_ids=()):
  """Greedy decoding one token at a time, each step a full forward pass.

  The ids sit at the start of a fixed buffer of REFERENCE_WIDTH columns, so
  one compiled forward pass serves every step. Causal attention keeps the
  columns after the last id from changing its logits.
  """
  ids = list(prompt_ids)
  new = []
  for _ in range(steps):
    buffer = np.zeros((1, REFERENCE_WIDTH), dtype=np.int32)
    buffer[0, :len(ids)] = ids
    logits = _forward(model, params, jnp.asarray(buffer))
    token = int(jnp.argmax(logits[0, len(ids) - 1]))
    if token in eos_ids:
      break
    new.append(token)
    ids.append(token)
  return new


def _chat_ids(tokenizer, prompt):
  text = tokenizer.apply_chat_template(
      [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
  )
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_single_prompt_matches_reference(model_and_params, tokenizer):
  model, params = model_and_params
  expected = _reference(model, params, _chat_ids(tokenizer, PROMPTS[1]), STEPS)
  got = generate.greedy_generate_ids(
      model, params, tokenizer, [PROMPTS[1]], max_new_tokens=STEPS, generation_config=NO_EOS
  )
  assert got == [expected]
  assert len(set(expected)) > 3, "the greedy path is too uniform to test anything"


def test_stops_at_eos(model_and_params, tokenizer):
  model, params = model_and_params
  prompt_ids = _chat_ids(tokenizer, PROMPTS[1])
  path = _reference(model, params, prompt_ids, STEPS)
  # Call the first token that did not occur earlier, past position 2, EOS.
  stop = next(i for i in range(2, len(path)) if path[i] not in path[:i])
  eos = path[stop]

  got = generate.greedy_generate_ids(
      model, params, tokenizer, [PROMPTS[1]], max_new_tokens=STEPS,
      generation_config={"eos_token_id": [eos]},
  )
  assert got == [path[:stop]]
  assert got == [_reference(model, params, prompt_ids, STEPS, eos_ids=(eos,))]


def test_batch_equals_each_prompt_alone(model_and_params, tokenizer):
  model, params = model_and_params
  batched = generate.greedy_generate_ids(
      model, params, tokenizer, PROMPTS, max_new_tokens=STEPS, generation_config=NO_EOS
  )
  alone = [
      generate.greedy_generate_ids(
          model, params, tokenizer, [prompt], max_new_tokens=STEPS, generation_config=NO_EOS
      )[0]
      for prompt in PROMPTS
  ]
  assert batched == alone
  for prompt, ids in zip(PROMPTS, batched):
    assert ids == _reference(model, params, _chat_ids(tokenizer, prompt), STEPS)


def test_batch_rows_stop_independently(model_and_params, tokenizer):
  model, params = model_and_params
  paths = [_reference(model, params, _chat_ids(tokenizer, p), STEPS) for p in PROMPTS]
  eos = paths[0][3]
  got = generate.greedy_generate_ids(
      model, params, tokenizer, PROMPTS, max_new_tokens=STEPS,
      generation_config={"eos_token_id": eos},
  )
  for path, ids in zip(paths, got):
    assert ids == (path[:path.index(eos)] if eos in path else path)


def test_strings_decode_replies(model_and_params, tokenizer):
  model, params = model_and_params
  ids = generate.greedy_generate_ids(
      model, params, tokenizer, PROMPTS, max_new_tokens=STEPS, generation_config=NO_EOS
  )
  texts = generate.greedy_generate(
      model, params, tokenizer, PROMPTS, max_new_tokens=STEPS, generation_config=NO_EOS
  )
  assert texts == [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
  assert all(isinstance(text, str) for text in texts)


def test_plain_text_prompt(model_and_params, tokenizer):
  model, params = model_and_params
  prompt_ids = tokenizer(PROMPTS[2])["input_ids"]
  got = generate.greedy_generate_ids(
      model, params, tokenizer, [PROMPTS[2]], max_new_tokens=STEPS, chat=False,
      generation_config=NO_EOS,
  )
  assert got == [_reference(model, params, prompt_ids, STEPS)]


def test_adapted_params_match_merged(model_and_params, tokenizer):
  model, params = model_and_params
  adapted = jaxlora.apply(params, rank=3, targets="all-linear", rng=jax.random.PRNGKey(1))

  def randomize_b(path, leaf):
    if path[-2:] == ("lora", "b"):
      return 0.5 * jax.random.normal(jax.random.PRNGKey(len(path)), leaf.shape)
    return leaf

  adapted = jaxlora.paths.map_with_path(randomize_b, adapted)
  merged = jaxlora.merge(adapted)
  base = generate.greedy_generate_ids(
      model, params, tokenizer, PROMPTS, max_new_tokens=STEPS, generation_config=NO_EOS
  )
  with_adapters = generate.greedy_generate_ids(
      model, adapted, tokenizer, PROMPTS, max_new_tokens=STEPS, generation_config=NO_EOS
  )
  with_merged = generate.greedy_generate_ids(
      model, merged, tokenizer, PROMPTS, max_new_tokens=STEPS, generation_config=NO_EOS
  )
  assert with_adapters == with_merged
  assert with_adapters != base


def test_left_padding_positions():
  tokens, attention_mask, positions = generate._left_padded([[7, 8], [5, 6, 7, 8]], 4, 7, 0)
  np.testing.assert_array_equal(tokens, [[0, 0, 7, 8, 0, 0, 0], [5, 6, 7, 8, 0, 0, 0]])
  np.testing.assert_array_equal(attention_mask, [[0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])


def test_eos_ids_sources(tokenizer):
  assert generate.eos_token_ids(tokenizer) == (2,)
  assert generate.eos_token_ids(tokenizer, {"eos_token_id": [7, 9]}) == (7, 9)
  assert generate.eos_token_ids(tokenizer, {"eos_token_id": 5}) == (5,)
  assert generate.eos_token_ids(tokenizer, {"bos_token_id": 1}) == (2,)


def test_error_too_long(model_and_params, tokenizer):
  model, params = model_and_params
  with pytest.raises(ValueError, match="max_new_tokens=120 .* maximum of 128"):
    generate.greedy_generate_ids(model, params, tokenizer, PROMPTS, max_new_tokens=120)


def test_error_bad_arguments(model_and_params, tokenizer):
  model, params = model_and_params
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    generate.greedy_generate_ids(model, params, tokenizer, PROMPTS, max_new_tokens=0)
  with pytest.raises(ValueError, match="prompts is empty"):
    generate.greedy_generate_ids(model, params, tokenizer, [], max_new_tokens=4)
  with pytest.raises(ValueError, match="is not a string"):
    generate.greedy_generate_ids(
        model, params, tokenizer, [[{"role": "user", "content": "w1"}]],
        max_new_tokens=4, chat=False,
    )


@pytest.mark.slow
def test_smollm2_answers_capital():
  from jaxlora.models import load
  from jaxlora.models.smollm2 import fetch_smollm2

  pretrained = load(fetch_smollm2())
  replies = generate.greedy_generate(
      Llama(pretrained.config), pretrained.params, pretrained.tokenizer,
      ["What is the capital of France?"], max_new_tokens=20,
      generation_config=pretrained.generation_config,
  )
  # transformers 5.25 answers the same prompt greedily with this sentence.
  assert replies == ["The capital of France is Paris."]

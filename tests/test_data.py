"""Tests for reading, tokenizing, splitting and batching training data."""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxlora.models.smollm2 import fetch_smollm2
from jaxlora.train import chat, data, pydoc_qa

END_OF_TURN = "<|im_end|>"


@pytest.fixture(scope="module")
def smol():
  """The real SmolLM2-135M-Instruct tokenizer, read from its GGUF file."""
  path = fetch_smollm2()
  return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _with_template(tokenizer, template):
  tokenizer = copy.deepcopy(tokenizer)
  tokenizer.chat_template = template
  return tokenizer


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return str(path)


def _chat(*turns):
  roles = ["user", "assistant"] * len(turns)
  return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def _scored_runs(tokenizer, batch, row=0):
  """Decode each run of consecutive scored targets in one batch row."""
  mask = batch["loss_mask"][row] > 0
  targets = batch["targets"][row]
  runs, current = [], []
  for flag, token in zip(mask, targets):
    if flag:
      current.append(int(token))
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return [tokenizer.decode(run) for run in runs]


# Chat masking.

def test_chat_scores_assistant_content_only(smol, tmp_path):
  example = _chat("What is 2 + 2?", "It is 4.", "And 3 + 3?", "That makes 6, of course.")
  path = _write_jsonl(tmp_path / "chat.jsonl", [example])
  examples = data.load_examples(path, smol, seq_len=128)
  batch = data.collate(examples, [0], 1)

  runs = _scored_runs(smol, batch)
  assert runs == ["It is 4." + END_OF_TURN, "That makes 6, of course." + END_OF_TURN]
  scored_text = "".join(runs)
  assert "2 + 2" not in scored_text
  assert "3 + 3" not in scored_text
  assert "user" not in scored_text
  assert "assistant" not in scored_text


def test_chat_scored_ids_match_separate_encoding(smol):
  messages = _chat("Name a colour.", "Blue, like the sky.")["messages"]
  ids, scored = chat.tokenize_chat(smol, messages)
  expected = smol("Blue, like the sky." + END_OF_TURN, add_special_tokens=False)["input_ids"]
  assert ids[scored].tolist() == expected
  assert ids.dtype == np.int32


def test_chat_prompt_equals_generation_prompt(smol):
  messages = _chat("Name a colour.", "Blue.")["messages"]
  ids, scored = chat.tokenize_chat(smol, messages)
  prompt = smol.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
  prompt_ids = smol(prompt, add_special_tokens=False)["input_ids"]
  first_scored = int(np.argmax(scored))
  assert ids[:first_scored].tolist() == prompt_ids


def test_chat_trimming_template(smol):
  # This template strips the content, so the reply's text in the rendering
  # differs from the message; the span must still be the rendered reply.
  template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
  )
  tokenizer = _with_template(smol, template)
  messages = _chat("  Hi  ", "   Hello there.   ")["messages"]
  ids, scored = chat.tokenize_chat(tokenizer, messages)
  assert tokenizer.decode(ids[scored].tolist()) == "Hello there." + END_OF_TURN


def test_chat_merged_boundary_raises(smol):
  # The generation prompt ends with "\n"; a reply starting with "\n\n"
  # merges with it into one token, so no token boundary exists there.
  messages = _chat("Hi", "\n\nHello")["messages"]
  full = smol.apply_chat_template(messages, tokenize=False)
  prompt = smol.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
  full_ids = smol(full, add_special_tokens=False)["input_ids"]
  prompt_ids = smol(prompt, add_special_tokens=False)["input_ids"]
  assert full_ids[:len(prompt_ids)] != prompt_ids

  with pytest.raises(chat.UnalignedTurnError, match="spans the boundary"):
    chat.tokenize_chat(smol, messages)


def test_chat_merged_boundary_dropped(smol, tmp_path):
  rows = [_chat("Hi", "\n\nHello"), _chat("Hi", "Hello")]
  path = _write_jsonl(tmp_path / "chat.jsonl", rows)
  examples = data.load_examples(path, smol, seq_len=64)
  assert len(examples) == 1
  assert examples.stats.dropped_unaligned == 1
  assert examples.stats.read == 2


def test_chat_trailing_space_prompt_all_dropped(smol, tmp_path):
  # "Assistant: " + "Hello" tokenizes as "Assistant", ":", " Hello", but the
  # prompt alone ends in a lone " " token.
  template = (
      "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<|im_end|>\n"
      "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
  )
  tokenizer = _with_template(smol, template)
  path = _write_jsonl(tmp_path / "chat.jsonl", [_chat("Hi", "Hello")])
  with pytest.raises(ValueError, match="1 with unaligned assistant turns"):
    data.load_examples(path, tokenizer, seq_len=64)


def test_chat_unstable_template_raises(smol):
  template = (
      "{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
      "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
  )
  tokenizer = _with_template(smol, template)
  with pytest.raises(chat.UnalignedTurnError, match="not how the whole conversation starts"):
    chat.tokenize_chat(tokenizer, _chat("Hi", "Hello")["messages"])


def test_chat_without_reply_dropped(smol, tmp_path):
  rows = [{"messages": [{"role": "user", "content": "Hi"}]}, _chat("Hi", "Hello")]
  path = _write_jsonl(tmp_path / "chat.jsonl", rows)
  examples = data.load_examples(path, smol, seq_len=64)
  assert len(examples) == 1
  assert examples.stats.dropped_unscored == 1


# Text examples.

def test_text_scores_every_token(smol, tmp_path):
  text = "The quick brown fox jumps over the lazy dog."
  path = _write_jsonl(tmp_path / "text.jsonl", [{"text": text}])
  examples = data.load_examples(path, smol, seq_len=64)
  batch = data.collate(examples, [0], 2)

  ids = smol(text)["input_ids"] + [smol.eos_token_id]
  count = len(ids) - 1
  assert batch["loss_mask"][0].sum() == count
  assert batch["loss_mask"][0, :count].all()
  assert batch["targets"][0, :count].tolist() == ids[1:]
  assert batch["input_ids"][0, :count].tolist() == ids[:-1]
  assert batch["attention_mask"][0].sum() == count


def test_text_truncated_counted(smol, tmp_path):
  rows = [{"text": "word " * 100}, {"text": "short"}]
  path = _write_jsonl(tmp_path / "text.jsonl", rows)
  examples = data.load_examples(path, smol, seq_len=16)
  assert examples.stats.truncated == 1
  assert [len(ids) for ids in examples.tokens] == [17, len(smol("short")["input_ids"]) + 1]


def test_text_file_chunks_cover_tokens(smol, tmp_path):
  text = "\n".join(f"Line {i} of a plain text file." for i in range(40)) + "\n"
  path = tmp_path / "doc.txt"
  path.write_text(text, encoding="utf-8")
  examples = data.load_examples(path, smol, seq_len=32)

  ids = smol(text)["input_ids"] + [smol.eos_token_id]
  assert len(examples) == -(-(len(ids) - 1) // 32)
  assert all(len(piece) == 33 for piece in examples.tokens[:-1])
  batches = data.eval_batches(examples, batch_size=3)
  targets = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
  assert targets.tolist() == ids[1:]


# Prompt and completion pairs.

QUESTION = "Question: what is two plus two?\nAnswer:"
ANSWER = " Four, because two and two make four."


def _write_table(path, rows):
  """Write `rows` as JSON Lines, CSV or Parquet, by the suffix of `path`."""
  path = str(path)
  if path.endswith(".jsonl"):
    return _write_jsonl(path, rows)
  if path.endswith(".csv"):
    pd.DataFrame(rows).to_csv(path, index=False)
  else:
    pd.DataFrame(rows).to_parquet(path)
  return path


def _pair_ids(tokenizer, prompt, completion):
  prompt_ids = tokenizer(prompt)["input_ids"]
  completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  return prompt_ids, completion_ids


def test_pair_scores_completion_and_eos(smol, tmp_path):
  path = _write_table(tmp_path / "pairs.csv", [{"question": QUESTION, "answer": ANSWER}])
  examples = data.load_examples(path, smol, seq_len=64, columns={"prompt": "question", "completion": "answer"})
  prompt_ids, completion_ids = _pair_ids(smol, QUESTION, ANSWER)

  assert examples.tokens[0].tolist() == prompt_ids + completion_ids
  assert examples.scored[0].tolist() == [False] * len(prompt_ids) + [True] * len(completion_ids)
  batch = data.collate(examples, [0], 1)
  assert _scored_runs(smol, batch) == [ANSWER + smol.eos_token]


def test_pair_train_on_prompt(smol, tmp_path):
  path = _write_table(tmp_path / "pairs.jsonl", [{"prompt": QUESTION, "completion": ANSWER}])
  examples = data.load_examples(path, smol, seq_len=64, train_on_prompt=True)
  prompt_ids, completion_ids = _pair_ids(smol, QUESTION, ANSWER)
  assert examples.tokens[0].tolist() == prompt_ids + completion_ids
  assert examples.scored[0].all()
  batch = data.collate(examples, [0], 1)
  assert batch["loss_mask"].sum() == len(prompt_ids) + len(completion_ids) - 1


def test_pair_truncation_counted(smol, tmp_path):
  prompt_ids, completion_ids = _pair_ids(smol, QUESTION, ANSWER)
  seq_len = len(prompt_ids) + 2
  rows = [
      {"prompt": QUESTION, "completion": ANSWER},
      {"prompt": QUESTION + " Think it through, step by step, before you answer.", "completion": ANSWER},
      {"prompt": "Say yes.", "completion": " Yes."},
  ]
  path = _write_table(tmp_path / "pairs.parquet", rows)
  examples = data.load_examples(path, smol, seq_len=seq_len)

  stats = examples.stats
  # Row 0 keeps 3 completion tokens; row 1 loses its whole completion and is dropped.
  assert (stats.read, stats.truncated, stats.dropped_unscored) == (3, 2, 1)
  assert len(examples) == 2
  assert examples.scored[0].sum() == 3
  long_prompt = len(smol(rows[1]["prompt"])["input_ids"])
  cut_tokens = (len(prompt_ids) + len(completion_ids) - seq_len - 1) + (long_prompt + len(completion_ids) - seq_len - 1)
  assert stats.truncated_tokens == cut_tokens
  assert stats.truncated_scored == len(completion_ids) - 3 + len(completion_ids)


def test_pair_missing_value_raises(smol, tmp_path):
  path = _write_table(tmp_path / "pairs.parquet", [
      {"prompt": "A?", "completion": " a."}, {"prompt": "B?", "completion": None},
  ])
  with pytest.raises(ValueError, match=r"example 2: column 'completion' must contain a string, got None"):
    data.load_examples(path, smol, seq_len=32)


def test_chat_train_on_prompt(smol, tmp_path):
  rows = [_chat("Hi", "\n\nHello"), _chat("Name a colour.", "Blue.")]
  path = _write_jsonl(tmp_path / "chat.jsonl", rows)
  examples = data.load_examples(path, smol, seq_len=64, train_on_prompt=True)
  # Scoring everything needs no reply boundary, so no example is unaligned.
  assert len(examples) == 2
  assert examples.stats.dropped_unaligned == 0
  full = smol.apply_chat_template(rows[1]["messages"], tokenize=False)
  assert examples.tokens[1].tolist() == smol(full, add_special_tokens=False)["input_ids"]
  assert all(mask.all() for mask in examples.scored)


# Every format from every table file.

FORMAT_ROWS = {
    "text": [{"text": f"Document {i} says something about the number {i}."} for i in range(4)],
    "prompt_completion": [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}."} for i in range(4)],
    "chat": [_chat(f"What is {i} + 1?", f"{i + 1}.") for i in range(4)],
}


# A CSV cell cannot hold a list of messages, so chat comes as JSON Lines and Parquet only.
@pytest.mark.parametrize("data_format,suffix", [
    ("text", ".jsonl"), ("text", ".csv"), ("text", ".parquet"),
    ("prompt_completion", ".jsonl"), ("prompt_completion", ".csv"), ("prompt_completion", ".parquet"),
    ("chat", ".jsonl"), ("chat", ".parquet"),
])
def test_prepare_data_formats(smol, tmp_path, data_format, suffix):
  path = _write_table(tmp_path / f"data{suffix}", FORMAT_ROWS[data_format])
  train, held_out = data.prepare_data(path, smol, seq_len=48, batch_size=2, eval_fraction=0.25, seed=1)

  reference = data.load_examples(
      _write_jsonl(tmp_path / "reference.jsonl", FORMAT_ROWS[data_format]), smol, seq_len=48,
      data_format=data_format,
  )
  assert (len(train), len(held_out)) == (3, 1)
  together = {tuple(ids.tolist()) for ids in train.tokens + held_out.tokens}
  assert together == {tuple(ids.tolist()) for ids in reference.tokens}
  scored = train.scored_token_count() + held_out.scored_token_count()
  assert scored == reference.scored_token_count()
  if data_format != "text":
    assert scored < sum(len(ids) - 1 for ids in reference.tokens)


def test_prepare_data_text_file_rejects_chat(smol, tmp_path):
  path = tmp_path / "doc.md"
  path.write_text("Some text.", encoding="utf-8")
  with pytest.raises(ValueError, match=r"data_format='chat' does not apply"):
    data.prepare_data(path, smol, seq_len=16, batch_size=1, data_format="chat")


def test_prepare_data_hub_offline(smol):
  with pytest.raises(ValueError, match=r"'someone/no-such-data'.*hub.*local file"):
    data.prepare_data("someone/no-such-data", smol, seq_len=16, batch_size=1)


# Batches.

@pytest.fixture(scope="module")
def qa_examples(smol, tmp_path_factory):
  rows = [_chat(f"Question number {i}?", f"Answer {i}." * (1 + i % 3)) for i in range(23)]
  path = _write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", rows)
  return data.load_examples(path, smol, seq_len=48)


def test_batch_shapes_and_dtypes(qa_examples):
  batch = next(data.train_batches(qa_examples, batch_size=5, seed=0))
  dtypes = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "attention_mask": np.int32}
  assert set(batch) == set(dtypes)
  for key, dtype in dtypes.items():
    assert batch[key].shape == (5, 48), key
    assert batch[key].dtype == dtype, key


def test_batch_targets_shifted(qa_examples):
  batch = data.collate(qa_examples, [3], 1)
  ids = qa_examples.tokens[3]
  length = len(ids) - 1
  assert np.array_equal(batch["input_ids"][0, 1:length], batch["targets"][0, :length - 1])
  assert batch["attention_mask"][0, length:].sum() == 0
  assert np.all(batch["input_ids"][0, length:] == qa_examples.pad_id)


def _first_ids(iterator, count):
  return [next(iterator)["input_ids"].copy() for _ in range(count)]


def test_train_batches_same_seed_same_order(qa_examples):
  first = _first_ids(data.train_batches(qa_examples, batch_size=4, seed=7), 12)
  second = _first_ids(data.train_batches(qa_examples, batch_size=4, seed=7), 12)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_train_batches_other_seed_other_order(qa_examples):
  first = _first_ids(data.train_batches(qa_examples, batch_size=4, seed=7), 3)
  other = _first_ids(data.train_batches(qa_examples, batch_size=4, seed=8), 3)
  assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_train_batches_epochs_cover_all(qa_examples):
  # 23 examples in batches of 1: each run of 23 batches is one epoch.
  row_index = {
      data.collate(qa_examples, [i], 1)["input_ids"].tobytes(): i
      for i in range(len(qa_examples))
  }
  assert len(row_index) == 23
  batches = _first_ids(data.train_batches(qa_examples, batch_size=1, seed=3), 46)
  orders = [[row_index[b.tobytes()] for b in batches[:23]],
            [row_index[b.tobytes()] for b in batches[23:]]]
  assert sorted(orders[0]) == list(range(23))
  assert sorted(orders[1]) == list(range(23))
  assert orders[0] != orders[1]


def test_train_batches_resume(qa_examples):
  full = _first_ids(data.train_batches(qa_examples, batch_size=4, seed=1), 10)
  resumed = _first_ids(data.train_batches(qa_examples, batch_size=4, seed=1, start_batch=6), 4)
  for a, b in zip(full[6:], resumed):
    np.testing.assert_array_equal(a, b)


def test_eval_batches_padded(qa_examples):
  batches = data.eval_batches(qa_examples, batch_size=5)
  assert len(batches) == 5
  assert all(b["input_ids"].shape == (5, 48) for b in batches)
  last = batches[-1]
  assert last["loss_mask"][3:].sum() == 0
  assert last["attention_mask"][3:].sum() == 0
  assert last["loss_mask"][:3].sum(axis=1).min() > 0
  total = sum(b["loss_mask"].sum() for b in batches)
  assert total == qa_examples.scored_token_count()


# Held-out split.

def test_split_disjoint_and_complete(qa_examples):
  train, held_out = data.split_examples(qa_examples, eval_fraction=0.2, seed=0)
  assert len(held_out) == 5
  assert len(train) == 18
  train_rows = {tuple(ids) for ids in train.tokens}
  eval_rows = {tuple(ids) for ids in held_out.tokens}
  assert not train_rows & eval_rows
  assert train_rows | eval_rows == {tuple(ids) for ids in qa_examples.tokens}


def test_split_depends_on_seed(qa_examples):
  _, first = data.split_examples(qa_examples, eval_fraction=0.2, seed=0)
  _, again = data.split_examples(qa_examples, eval_fraction=0.2, seed=0)
  _, other = data.split_examples(qa_examples, eval_fraction=0.2, seed=1)
  rows = lambda examples: [tuple(ids) for ids in examples.tokens]
  assert rows(first) == rows(again)
  assert rows(first) != rows(other)


def test_prepare_data_eval_file(smol, tmp_path):
  train_path = _write_jsonl(tmp_path / "train.jsonl", [_chat("A?", "a.")] * 3)
  eval_path = _write_jsonl(tmp_path / "eval.jsonl", [_chat("B?", "b.")] * 2)
  train, held_out = data.prepare_data(
      train_path, smol, seq_len=32, batch_size=2, eval_file=eval_path, max_positions=64
  )
  assert (len(train), len(held_out)) == (3, 2)


def test_prepare_data_no_eval(smol, tmp_path):
  train_path = _write_jsonl(tmp_path / "train.jsonl", [_chat("A?", "a.")] * 3)
  train, held_out = data.prepare_data(train_path, smol, seq_len=32, batch_size=2)
  assert len(train) == 3
  assert held_out is None


# Invalid input.

def _raises_naming(value, call):
  with pytest.raises(ValueError, match=re.escape(str(value))):
    call()


def test_error_missing_file(smol, tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  _raises_naming(missing, lambda: data.load_examples(missing, smol, seq_len=8))
  _raises_naming(missing, lambda: data.prepare_data(missing, smol, seq_len=8, batch_size=1))


def test_error_empty_file(smol, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  _raises_naming(str(empty), lambda: data.load_examples(empty, smol, seq_len=8))


def test_error_bad_json(smol, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "unterminated\n')
  _raises_naming(str(bad), lambda: data.load_examples(bad, smol, seq_len=8))


def test_error_unknown_suffix(smol, tmp_path):
  path = tmp_path / "data.xlsx"
  path.write_text("x")
  _raises_naming(".xlsx", lambda: data.load_examples(path, smol, seq_len=8))


def test_error_no_example_columns(smol, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "reply": "b"}])
  with pytest.raises(ValueError, match=re.escape("['question', 'reply']")):
    data.load_examples(path, smol, seq_len=8)


def test_error_row_without_example(smol, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "fine"}, {"other": "b"}])
  with pytest.raises(ValueError, match=r"example 2: column 'text' .*\['other'\]"):
    data.load_examples(path, smol, seq_len=8)


def test_error_text_and_messages_ambiguous(smol, tmp_path):
  row = {**_chat("Hi", "Hello"), "text": "also"}
  path = _write_jsonl(tmp_path / "x.jsonl", [row])
  with pytest.raises(ValueError, match="fit several data formats"):
    data.load_examples(path, smol, seq_len=8)
  # Naming the format resolves it.
  assert len(data.load_examples(path, smol, seq_len=32, data_format="chat")) == 1


def test_error_bad_message(smol, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": 3}]}])
  with pytest.raises(ValueError, match="`content` must be a string, got 3"):
    data.load_examples(path, smol, seq_len=8)


def _word_tokenizer():
  """Return a GPT-2-style tokenizer without a chat template: words, and EOS as its only special token."""
  words = ["<|endoftext|>", "Hi", "Hello", "there", "user", "assistant"]
  model = tokenizers.models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<|endoftext|>")
  backend = tokenizers.Tokenizer(model)
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def test_error_chat_without_template(smol, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [_chat("Hi", "Hello")])
  word_tokenizer = _word_tokenizer()
  assert word_tokenizer.chat_template is None
  for tokenizer in (_with_template(smol, None), word_tokenizer):
    with pytest.raises(ValueError, match="has no chat template.*Set tokenizer.chat_template"):
      data.prepare_data(path, tokenizer, seq_len=8, batch_size=1)


def test_word_tokenizer_reads_text(tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "Hello there"}])
  examples, _ = data.prepare_data(path, _word_tokenizer(), seq_len=8, batch_size=1)
  assert examples.tokens[0].tolist() == [2, 3, 0]


def test_error_empty_dataset(smol, tmp_path):
  header_only = tmp_path / "header.csv"
  header_only.write_text("prompt,completion\n", encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{str(header_only)!r} contains no examples")):
    data.prepare_data(header_only, smol, seq_len=16, batch_size=1)

  # Every row is dropped: a user turn with no reply scores nothing.
  path = _write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}] * 2)
  with pytest.raises(ValueError, match=r"x.jsonl: no example is left after tokenizing \(2 read, 2 without"):
    data.prepare_data(path, smol, seq_len=16, batch_size=1)


def test_error_missing_column(smol, tmp_path):
  path = _write_table(tmp_path / "pairs.parquet", [{"question": "A?", "answer": " a."}])
  with pytest.raises(ValueError) as info:
    data.prepare_data(
        path, smol, seq_len=16, batch_size=1, columns={"prompt": "query", "completion": "answer"}
    )
  message = str(info.value)
  assert "the 'prompt' column 'query'" in message
  assert "['answer', 'question']" in message
  assert "columns={'prompt': '<column>'}" in message


def test_text_without_template_ok(smol, tmp_path):
  tokenizer = _with_template(smol, None)
  path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "Hello there"}])
  assert len(data.load_examples(path, tokenizer, seq_len=8)) == 1


def test_error_seq_len_over_max_positions(smol, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "Hello"}])
  with pytest.raises(ValueError, match="seq_len=4096 exceeds .* 2048"):
    data.prepare_data(path, smol, seq_len=4096, batch_size=1, max_positions=2048)


def test_error_batch_size(smol, qa_examples, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "Hello"}])
  for size in (0, -2):
    _raises_naming(f"batch_size={size}", lambda: data.prepare_data(path, smol, seq_len=8, batch_size=size))
    _raises_naming(f"batch_size={size}", lambda: data.train_batches(qa_examples, batch_size=size, seed=0))
    _raises_naming(f"batch_size={size}", lambda: data.eval_batches(qa_examples, batch_size=size))


def test_error_eval_file_and_fraction(smol, tmp_path):
  path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "Hello"}])
  with pytest.raises(ValueError, match="eval_fraction=0.1"):
    data.prepare_data(path, smol, seq_len=8, batch_size=1, eval_file=path, eval_fraction=0.1)


def test_error_eval_fraction_too_large(qa_examples):
  _raises_naming("eval_fraction=0.99", lambda: data.split_examples(qa_examples, eval_fraction=0.99, seed=0))
  _raises_naming("eval_fraction=1.5", lambda: data.split_examples(qa_examples, eval_fraction=1.5, seed=0))


# The pydoc question-and-answer set.

def test_pydoc_qa_deterministic():
  first = pydoc_qa.build_pydoc_qa()
  second = pydoc_qa.build_pydoc_qa()
  assert len(first) >= 300
  assert first == second
  print(f"pydoc_qa: {len(first)} examples; sample: {first[len(first) // 2]}")


def test_pydoc_qa_independent_of_pytest():
  # pytest replaces hooks such as sys.unraisablehook; a fresh interpreter
  # must build the same set.
  code = (
      "import json; from jaxlora.train import pydoc_qa;"
      " print(json.dumps(pydoc_qa.build_pydoc_qa()))"
  )
  output = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout
  assert json.loads(output) == pydoc_qa.build_pydoc_qa()


def test_pydoc_qa_split_disjoint(tmp_path):
  train_path, eval_path = pydoc_qa.write_pydoc_qa(tmp_path)
  read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8")]
  train, held_out = read(train_path), read(eval_path)
  questions = lambda rows: {row["messages"][0]["content"] for row in rows}
  assert not questions(train) & questions(held_out)
  assert len(train) + len(held_out) == len(pydoc_qa.build_pydoc_qa())
  assert 0.05 < len(held_out) / (len(train) + len(held_out)) < 0.25
  assert set(pydoc_qa.showcase_questions()) <= questions(held_out)
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_pydoc_qa_answers_clean():
  items = pydoc_qa.build_pydoc_qa_items()
  for item in items:
    assert pydoc_qa.MIN_ANSWER_CHARS <= len(item.answer) <= pydoc_qa.DEFAULT_MAX_ANSWER_CHARS, item
    assert "\n" not in item.answer, item
    assert ">>>" not in item.answer, item
  assert len({item.answer for item in items}) == len(items)
  assert len({item.question for item in items}) == len(items)


def test_pydoc_qa_skips_signature_lines():
  doc = "chain(*iterables) --> chain object\n\nReturn a chain object.\nMore.\n\nDetails."
  assert pydoc_qa.first_paragraph(doc) == "Return a chain object. More."
  assert pydoc_qa.first_paragraph("f(x) -> int") is None
  long = "First sentence here. Second " + "x" * 400
  assert pydoc_qa.first_paragraph(long) == "First sentence here."


def test_pydoc_qa_fits_smollm2(smol, tmp_path):
  train_path, _ = pydoc_qa.write_pydoc_qa(tmp_path)
  examples = data.load_examples(train_path, smol, seq_len=192)
  lengths = np.array([len(ids) for ids in examples.tokens])
  assert examples.stats.truncated == 0
  assert examples.stats.dropped_unaligned == 0
  assert np.mean(lengths <= 129) > 0.95
  print(f"pydoc_qa tokens: median {np.median(lengths):.0f}, max {lengths.max()}")

"""Tests for reading data sources and finding their format."""

import json
import os
import re

import pandas as pd
import pytest

from jaxlora.train import sources

PAIRS = [
    {"question": "What is 2 + 2?", "answer": "4"},
    {"question": "Half of 13?", "answer": "6.50"},
    {"question": "Name a prime.", "answer": "007"},
]


def _write(tmp_path, name, rows):
  """Write `rows` (a list of dicts) in the format that `name`'s suffix names."""
  path = tmp_path / name
  suffix = os.path.splitext(name)[1]
  if suffix == ".jsonl":
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  elif suffix == ".json":
    path.write_text(json.dumps(rows), encoding="utf-8")
  elif suffix == ".csv":
    pd.DataFrame(rows).to_csv(path, index=False)
  elif suffix == ".parquet":
    pd.DataFrame(rows).to_parquet(path)
  return str(path)


# Reading files.

@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.csv", "pairs.parquet"])
def test_read_formats_keep_rows(tmp_path, name):
  dataset = sources.read_dataset(_write(tmp_path, name, PAIRS))
  assert sorted(dataset.column_names) == ["answer", "question"]
  assert dataset["question"] == [row["question"] for row in PAIRS]
  # CSV cells stay text: "6.50" and "007" are not parsed as numbers.
  assert dataset["answer"] == ["4", "6.50", "007"]


def test_read_csv_quoted_cells(tmp_path):
  path = tmp_path / "quoted.csv"
  path.write_text('prompt,completion\n"a, b","line one\nline two"\n', encoding="utf-8")
  dataset = sources.read_dataset(path)
  assert dataset[0] == {"prompt": "a, b", "completion": "line one\nline two"}


@pytest.mark.parametrize("name", ["notes.txt", "notes.md"])
def test_read_text_file_one_document(tmp_path, name):
  text = "# Title\n\nFirst paragraph.\n\nSecond paragraph.\n"
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  dataset = sources.read_dataset(path)
  assert dataset.column_names == ["text"]
  assert len(dataset) == 1
  assert dataset[0]["text"].strip() == text.strip()


def test_local_or_hub_name(tmp_path):
  existing = tmp_path / "data"
  existing.write_text("x")
  assert sources.is_local(existing)
  assert sources.is_local("missing/train.jsonl")
  assert sources.is_local("./train")
  assert sources.is_local("/abs/train")
  assert not sources.is_local("owner/dataset")
  assert not sources.is_local("dataset:validation")


# Sources that cannot be read.

def _raises_naming(text, call):
  with pytest.raises(ValueError, match=re.escape(str(text))) as info:
    call()
  return str(info.value)


def test_error_missing_file(tmp_path):
  missing = str(tmp_path / "nope.csv")
  message = _raises_naming(missing, lambda: sources.read_dataset(missing))
  assert "not found" in message


def test_error_unknown_suffix(tmp_path):
  path = tmp_path / "data.xlsx"
  path.write_text("x")
  message = _raises_naming(".xlsx", lambda: sources.read_dataset(path))
  assert ".parquet" in message


@pytest.mark.parametrize("name,content", [
    ("zero.jsonl", ""),
    ("blank.jsonl", "\n\n"),
    ("header.csv", "prompt,completion\n"),
    ("zero.txt", ""),
])
def test_error_no_rows(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  message = _raises_naming(str(path), lambda: sources.read_dataset(path))
  assert "empty" in message or "no examples" in message


def test_error_no_rows_parquet(tmp_path):
  path = tmp_path / "zero.parquet"
  pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(path)
  message = _raises_naming(str(path), lambda: sources.read_dataset(path))
  assert "no examples" in message


@pytest.mark.parametrize("name,content,hint", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "unterminated\n', "JSON"),
    ("bad.csv", 'a,b\n"unterminated\n', "header row"),
    ("bad.parquet", "not parquet", "to_parquet"),
    ("dupes.csv", "a,a\n1,2\n", "distinct column names"),
])
def test_error_unreadable(tmp_path, name, content, hint):
  path = tmp_path / name
  path.write_text(content, encoding="utf-8")
  message = _raises_naming(str(path), lambda: sources.read_dataset(path))
  assert "could not be read" in message or "header row" in message
  assert hint in message


def test_error_hub_offline():
  # conftest sets HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, so nothing is sent.
  assert os.environ["HF_DATASETS_OFFLINE"] == "1"
  message = _raises_naming("'someone/no-such-data'", lambda: sources.read_dataset("someone/no-such-data"))
  assert "hub" in message
  assert "local file" in message
  _raises_naming("split 'validation'", lambda: sources.read_dataset("someone/data:validation"))


# Finding the format.

@pytest.mark.parametrize("columns,expected", [
    (["text"], "text"),
    (["text", "id", "source"], "text"),
    (["prompt", "completion"], "prompt_completion"),
    (["prompt", "completion", "id"], "prompt_completion"),
    (["messages"], "chat"),
    (["messages", "id"], "chat"),
])
def test_format_auto_detected(columns, expected):
  data_format, roles = sources.resolve_format(columns)
  assert data_format == expected
  assert set(roles.values()) <= set(columns)


def test_format_from_columns_mapping():
  data_format, roles = sources.resolve_format(
      ["question", "answer", "text"], columns={"prompt": "question", "completion": "answer"}
  )
  assert data_format == "prompt_completion"
  assert roles == {"prompt": "question", "completion": "answer"}

  data_format, roles = sources.resolve_format(["body", "title"], columns={"text": "body"})
  assert (data_format, roles) == ("text", {"text": "body"})


def test_format_explicit_ignores_other_columns():
  data_format, roles = sources.resolve_format(["text", "messages"], data_format="chat")
  assert (data_format, roles) == ("chat", {"messages": "messages"})


def test_error_format_ambiguous():
  message = _raises_naming("['messages', 'text']", lambda: sources.resolve_format(["text", "messages"], source="mix.jsonl"))
  assert "mix.jsonl" in message
  assert "data_format" in message
  assert "'text'" in message
  assert "'chat'" in message


def test_error_format_unknown_columns():
  message = _raises_naming("['answer', 'question']", lambda: sources.resolve_format(["question", "answer"]))
  assert "columns=" in message
  assert "data_format" in message


def test_error_format_missing_column():
  message = _raises_naming(
      "'query'",
      lambda: sources.resolve_format(["question", "answer"], data_format="prompt_completion",
                                     columns={"prompt": "query", "completion": "answer"}),
  )
  assert "['answer', 'question']" in message
  assert "columns={'prompt':" in message


def test_error_format_explicit_missing_default_column():
  message = _raises_naming(
      "'messages'", lambda: sources.resolve_format(["text"], data_format="chat")
  )
  assert "columns found are ['text']" in message


def test_error_format_settings():
  _raises_naming("data_format='json'", lambda: sources.check_format_settings("json", None))
  message = _raises_naming("['answer']", lambda: sources.check_format_settings("auto", {"answer": "a"}))
  assert "prompt" in message
  _raises_naming("columns['prompt']=''", lambda: sources.check_format_settings("auto", {"prompt": ""}))


def test_error_columns_of_two_formats():
  message = _raises_naming(
      "columns={'text': 'body', 'prompt': 'q'}",
      lambda: sources.resolve_format(["body", "q"], columns={"text": "body", "prompt": "q"}),
  )
  assert "data_format" in message


def test_error_columns_unused_by_format():
  message = _raises_naming(
      "columns maps the roles ['prompt']",
      lambda: sources.resolve_format(["text", "q"], data_format="text", columns={"prompt": "q"}),
  )
  assert "data_format='text'" in message

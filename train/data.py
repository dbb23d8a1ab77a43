"""Training data: tokenizing examples, splitting and batching them.

Sources (local JSON Lines, JSON, CSV, Parquet and text files, or hub
datasets) are read by `jaxlora.train.sources`, which also finds each
source's format. The formats are tokenized and scored as follows:

- "text": the text with the tokenizer's usual special tokens (a BOS where the
  tokenizer adds one) and a closing EOS, every token scored, so the model
  learns where a document ends. A `.txt` or `.md` file is one document cut
  into pieces of `seq_len + 1` tokens that overlap by one token, so every
  token after the first is a target exactly once.
- "prompt_completion": the prompt with the usual special tokens, then the
  completion, then EOS. The prompt and the completion are tokenized apart,
  so the prompt's tokens are exactly those that generation feeds the model.
  The completion's tokens and the EOS are scored.
- "chat": the `messages` rendered with the tokenizer's chat template, the
  assistant replies scored (see `jaxlora.train.chat`).

With `train_on_prompt=True` every token of every format is scored. An
example longer than `seq_len + 1` tokens is cut at the end, and one left with
no scored target is dropped; both are counted and logged.

Batches, one example per row or several packed per row, are built by
`train_batches` and `eval_batches` from `jaxlora.train.packing`, re-exported
here with `collate`.
"""

import dataclasses
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np

from jaxlora.train import chat, packing, sources
from jaxlora.train.packing import (  # Re-exported: callers batch through this module.
    DEFAULT_PAD_TO_MULTIPLE_OF,
    Batch,
    collate,
    eval_batches,
    train_batches,
)
from jaxlora.train.sources import read_dataset  # Re-exported for existing callers.

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PAD_TO_MULTIPLE_OF",
    "TokenizeStats",
    "TokenizedExamples",
    "check_sizes",
    "collate",
    "eval_batches",
    "load_examples",
    "pad_id_of",
    "prepare_data",
    "read_dataset",
    "split_examples",
    "tokenize_dataset",
    "train_batches",
]


@dataclasses.dataclass(frozen=True)
class TokenizeStats:
  """Counts from tokenizing one source.

  Attributes:
    read: examples (rows, or text pieces) before dropping.
    truncated: examples cut to `seq_len + 1` tokens.
    truncated_tokens: tokens removed by those cuts, in total.
    truncated_scored: scored targets among the removed tokens.
    dropped_unscored: examples dropped because no target is scored, such as
      a completion that truncation removed entirely.
    dropped_unaligned: chat examples dropped because a reply's boundary
      falls inside a token or the template renders prefixes differently.
  """

  read: int = 0
  truncated: int = 0
  truncated_tokens: int = 0
  truncated_scored: int = 0
  dropped_unscored: int = 0
  dropped_unaligned: int = 0


@dataclasses.dataclass
class TokenizedExamples:
  """Tokenized examples, each at most `seq_len + 1` tokens long.

  Attributes:
    tokens: int32 arrays `[n_i]` with `2 <= n_i <= seq_len + 1`.
    scored: bool arrays `[n_i]`, True where the token is a scored target.
      The first token of an example is never a target.
    seq_len: T, the width of a full batch.
    pad_id: the id that fills padded positions.
    stats: what tokenizing kept, cut and dropped.
  """

  tokens: list[np.ndarray]
  scored: list[np.ndarray]
  seq_len: int
  pad_id: int
  stats: TokenizeStats = TokenizeStats()

  def __len__(self) -> int:
    return len(self.tokens)

  def subset(self, indices: Sequence[int]) -> "TokenizedExamples":
    """Return the examples at `indices`, in that order."""
    return dataclasses.replace(
        self,
        tokens=[self.tokens[i] for i in indices],
        scored=[self.scored[i] for i in indices],
    )

  def scored_token_count(self) -> int:
    """Return the number of scored targets over all examples."""
    return int(sum(mask[1:].sum() for mask in self.scored))


def check_sizes(*, seq_len: int, batch_size: int, max_positions: int | None = None) -> None:
  """Raise a ValueError for a batch shape the model cannot take.

  Args:
    seq_len: tokens per row, T.
    batch_size: rows per batch, B.
    max_positions: the model's `max_position_embeddings`, or None to skip
      that check.
  """
  packing.check_batch_size(batch_size)
  if not packing.is_integer(seq_len) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1.")
  if max_positions is not None and seq_len > max_positions:
    raise ValueError(
        f"seq_len={seq_len} exceeds the model's maximum of {max_positions}"
        f" positions (max_position_embeddings); pass seq_len <= {max_positions}."
    )


def pad_id_of(tokenizer: Any) -> int:
  """Return the tokenizer's pad id, or its EOS id when it has no pad token.

  Raises:
    ValueError: if the tokenizer has neither.
  """
  if tokenizer.pad_token_id is not None:
    return int(tokenizer.pad_token_id)
  if tokenizer.eos_token_id is not None:
    return int(tokenizer.eos_token_id)
  raise ValueError(
      "The tokenizer has neither a pad token nor an EOS token, so batches"
      " cannot be padded. Set tokenizer.pad_token, for example to an unused"
      " special token."
  )


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    seq_len: int,
    data_format: str = sources.AUTO,
    columns: Mapping[str, str] | None = None,
    train_on_prompt: bool = False,
    chunk_text: bool = False,
    source: str = "dataset",
) -> TokenizedExamples:
  """Tokenize every row of `dataset` and mark its scored tokens.

  Args:
    dataset: rows in one of the formats of `jaxlora.train.sources`.
    tokenizer: a transformers tokenizer; chat rows need a chat template.
    seq_len: T; each example keeps at most `seq_len + 1` tokens.
    data_format: "auto", "text", "prompt_completion" or "chat".
    columns: `{role: column}` for columns not named after their role.
    train_on_prompt: score every token, not only completions and replies.
    chunk_text: cut each text row into pieces of `seq_len + 1` tokens instead
      of truncating it.
    source: a name for log and error messages, such as the file path.

  Returns:
    The kept examples, in row order, with their counts in `stats`.

  Raises:
    ValueError: if the format cannot be found or a column it reads is
      missing, a row's value is malformed, chat rows meet a tokenizer
      without a chat template, or no example is left.
  """
  check_sizes(seq_len=seq_len, batch_size=1)
  data_format, role_columns = sources.resolve_format(
      dataset.column_names, data_format=data_format, columns=columns, source=source
  )
  if data_format == "chat":
    chat.check_chat_template(tokenizer)

  max_tokens = seq_len + 1
  encode_row = functools.partial(
      _tokenize_row, tokenizer, data_format, role_columns, train_on_prompt, chunk_text, max_tokens
  )
  examples = TokenizedExamples([], [], seq_len, pad_id_of(tokenizer))
  counts = {field.name: 0 for field in dataclasses.fields(TokenizeStats)}
  first_unaligned = None

  for index, row in enumerate(dataset):
    try:
      pieces = encode_row(row, f"{source}, example {index + 1}")
    except chat.UnalignedTurnError as error:
      counts["read"] += 1
      counts["dropped_unaligned"] += 1
      first_unaligned = first_unaligned or f"example {index + 1}: {error}"
      continue

    for ids, scored in pieces:
      counts["read"] += 1
      if len(ids) > max_tokens:
        counts["truncated"] += 1
        counts["truncated_tokens"] += len(ids) - max_tokens
        counts["truncated_scored"] += int(scored[max_tokens:].sum())
        ids, scored = ids[:max_tokens], scored[:max_tokens]
      if not scored[1:].any():
        counts["dropped_unscored"] += 1
        continue
      examples.tokens.append(ids)
      examples.scored.append(scored)

  examples.stats = TokenizeStats(**counts)
  _log_stats(source, data_format, examples, first_unaligned)
  if not examples.tokens:
    raise ValueError(
        f"{source}: no example is left after tokenizing ({counts['read']} read,"
        f" {counts['dropped_unscored']} without a scored token,"
        f" {counts['truncated']} truncated,"
        f" {counts['dropped_unaligned']} with unaligned assistant turns"
        f"{'; first: ' + first_unaligned if first_unaligned else ''})."
        " Chat examples need at least one assistant message, and a completion"
        " needs room within seq_len; raise seq_len or shorten the prompts."
    )
  return examples


def _tokenize_row(tokenizer, data_format, role_columns, train_on_prompt, chunk_text, max_tokens, row, label):
  """Return the `(ids, scored)` pieces of one row, before truncation.

  A chat or prompt/completion row gives one piece. A text row gives one
  piece, or with `chunk_text` pieces of at most `max_tokens` tokens.
  """
  if data_format == "chat":
    messages = chat.normalize_messages(row[role_columns[sources.MESSAGES]], label)
    return [chat.tokenize_chat(tokenizer, messages, train_on_prompt=train_on_prompt)]

  if data_format == "prompt_completion":
    prompt = _string_value(row, role_columns[sources.PROMPT], label)
    completion = _string_value(row, role_columns[sources.COMPLETION], label)
    return [_encode_pair(tokenizer, prompt, completion, train_on_prompt)]

  ids = _encode_text(tokenizer, _string_value(row, role_columns[sources.TEXT], label))
  pieces = _chunks(ids, max_tokens) if chunk_text else [ids]
  return [(piece, np.ones(len(piece), dtype=bool)) for piece in pieces]


def _string_value(row: dict[str, Any], column: str, label: str) -> str:
  value = row[column]
  if isinstance(value, str):
    return value
  present = sorted(key for key, item in row.items() if item is not None)
  raise ValueError(
      f"{label}: column {column!r} must contain a string, got {value!r:.200}"
      f" (columns with values: {present}). Fill it in every row or remove the row."
  )


def _encode_text(tokenizer: Any, text: str) -> np.ndarray:
  """Return the ids of `text` with the usual special tokens and a closing EOS."""
  ids = tokenizer(text, add_special_tokens=True)["input_ids"]
  eos = tokenizer.eos_token_id
  if eos is not None and (not ids or ids[-1] != eos):
    ids = ids + [eos]
  return np.asarray(ids, dtype=np.int32)


def _encode_pair(tokenizer: Any, prompt: str, completion: str, train_on_prompt: bool):
  """Return `(ids, scored)` of prompt + completion + EOS, scoring the completion and EOS."""
  eos = tokenizer.eos_token_id
  prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
  if eos is not None and prompt_ids and prompt_ids[-1] == eos:
    # Some tokenizers end every encoding with EOS, which would cut the pair
    # in two; the completion's own EOS comes below.
    prompt_ids = prompt_ids[:-1]
  completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
  if eos is not None:
    completion_ids = completion_ids + [eos]

  ids = np.asarray(prompt_ids + completion_ids, dtype=np.int32)
  scored = np.zeros(len(ids), dtype=bool)
  scored[0 if train_on_prompt else len(prompt_ids):] = True
  return ids, scored


def _chunks(ids: np.ndarray, max_tokens: int) -> list[np.ndarray]:
  """Cut `ids` into pieces of `max_tokens` that overlap by one token."""
  step = max_tokens - 1
  return [ids[start:start + max_tokens] for start in range(0, max(len(ids) - 1, 1), step)]


def _log_stats(source, data_format, examples, first_unaligned):
  stats = examples.stats
  lengths = [len(ids) for ids in examples.tokens] or [0]
  logger.info(
      "%s (%s): kept %d of %d examples (%d truncated to %d tokens, losing %d"
      " tokens of which %d scored; %d without a scored token dropped); tokens"
      " per example median %d, max %d.",
      source, data_format, len(examples), stats.read, stats.truncated,
      examples.seq_len + 1, stats.truncated_tokens, stats.truncated_scored,
      stats.dropped_unscored, int(np.median(lengths)), max(lengths),
  )
  if stats.dropped_unaligned:
    logger.warning(
        "%s: dropped %d chat examples whose assistant turns do not split"
        " cleanly into tokens; first: %s",
        source, stats.dropped_unaligned, first_unaligned,
    )


def load_examples(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    seq_len: int,
    data_format: str = sources.AUTO,
    columns: Mapping[str, str] | None = None,
    train_on_prompt: bool = False,
) -> TokenizedExamples:
  """Read and tokenize one source (see `tokenize_dataset` for the arguments).

  A `.txt` or `.md` file is one text document cut into pieces; `columns`
  does not apply to it.

  Raises:
    ValueError: if the source cannot be read (see `sources.read_dataset`),
      a text file meets a format other than "auto" or "text", or
      tokenizing fails (see `tokenize_dataset`).
  """
  name = os.fspath(path)
  text_file = sources.is_text_file(name)
  if text_file and data_format not in (sources.AUTO, "text"):
    raise ValueError(
        f"{name}: a {sources.suffix_of(name)} file is read as one plain text"
        f" document, so data_format={data_format!r} does not apply; use"
        " data_format='text' or 'auto', or a JSON Lines, CSV or Parquet file."
    )

  dataset = read_dataset(name)
  return tokenize_dataset(
      dataset, tokenizer, seq_len=seq_len,
      data_format="text" if text_file else data_format,
      columns=None if text_file else columns,
      train_on_prompt=train_on_prompt, chunk_text=text_file, source=name,
  )


def split_examples(
    examples: TokenizedExamples,
    *,
    eval_fraction: float,
    seed: int,
) -> tuple[TokenizedExamples, TokenizedExamples]:
  """Split examples into disjoint `(train, eval)` sets, deterministically from `seed`.

  The eval set takes `round(eval_fraction * n)` examples (at least one),
  chosen by a permutation from `seed`; both sets keep the original order.

  Raises:
    ValueError: if `eval_fraction` is outside (0, 1) or leaves either set empty.
  """
  count = len(examples)
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1), such as 0.1.")
  eval_count = max(1, round(eval_fraction * count))
  if eval_count >= count:
    raise ValueError(
        f"eval_fraction={eval_fraction} of {count} examples leaves no training"
        " example; lower it or pass a separate eval file."
    )

  order = np.random.default_rng(seed).permutation(count)
  eval_indices = np.sort(order[:eval_count])
  train_indices = np.sort(order[eval_count:])
  return examples.subset(train_indices), examples.subset(eval_indices)


def prepare_data(
    train_file: str | os.PathLike,
    tokenizer: Any,
    *,
    seq_len: int,
    batch_size: int,
    eval_file: str | os.PathLike | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    max_positions: int | None = None,
    data_format: str = sources.AUTO,
    columns: Mapping[str, str] | None = None,
    train_on_prompt: bool = False,
) -> tuple[TokenizedExamples, TokenizedExamples | None]:
  """Check the settings, then read, tokenize and split the training data.

  Every check runs before anything is compiled, and the cheap ones (sizes,
  settings, local files) before any reading or tokenizing.

  Args:
    train_file: a local data file or a hub dataset name (see
      `jaxlora.train.sources`).
    tokenizer: a transformers tokenizer.
    seq_len: T, tokens per batch row.
    batch_size: B, rows per batch.
    eval_file: held-out examples in a separate source; excludes
      `eval_fraction`.
    eval_fraction: share of the training examples to hold out instead; 0
      for none.
    seed: seed of the held-out split.
    max_positions: the model's `max_position_embeddings`; `seq_len` may not
      exceed it.
    data_format: "auto", "text", "prompt_completion" or "chat", for both
      sources.
    columns: `{role: column}` for columns not named after their role, such
      as `{"prompt": "question", "completion": "answer"}`.
    train_on_prompt: score every token, not only completions and replies.

  Returns:
    `(train, eval)`, where `eval` is None when nothing is held out.

  Raises:
    ValueError: for any invalid setting or data (see `check_sizes`,
      `sources.read_dataset`, `sources.resolve_format`, `tokenize_dataset`
      and `split_examples`).
  """
  check_sizes(seq_len=seq_len, batch_size=batch_size, max_positions=max_positions)
  if eval_file is not None and eval_fraction:
    raise ValueError(
        f"Both eval_file={os.fspath(eval_file)!r} and eval_fraction={eval_fraction}"
        " are set; pass one of them."
    )
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1), such as 0.1.")
  sources.check_format_settings(data_format, columns)
  for path in (train_file, eval_file):
    if path is not None:
      sources.check_local_file(path)
  pad_id_of(tokenizer)

  load = functools.partial(
      load_examples, tokenizer=tokenizer, seq_len=seq_len, data_format=data_format,
      columns=columns, train_on_prompt=train_on_prompt,
  )
  train = load(train_file)
  if eval_file is not None:
    return train, load(eval_file)
  if eval_fraction:
    return split_examples(train, eval_fraction=eval_fraction, seed=seed)
  return train, None

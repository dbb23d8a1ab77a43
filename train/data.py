"""Training data: reading files, tokenizing examples, splitting and batching.

Sources are read with Hugging Face `datasets`:

- JSON Lines (`.jsonl`, `.json`): one example per row, either a chat example
  with a `messages` column (a list of `{role, content}`) or a text example
  with a `text` column. Other columns are ignored.
- Plain text (`.txt`, `.md`): each file is read as one document, tokenized
  whole and cut into pieces of `seq_len + 1` tokens that overlap by one token,
  so every token after the first is a target exactly once.

A chat example is scored on its assistant replies only (see
`jaxlora.train.chat`); a text example on every token. Text gets the
tokenizer's usual special tokens (a BOS where the tokenizer adds one) and an
EOS at the end when the tokenizer has one, so the model learns where a
document ends. An example longer than `seq_len + 1` tokens is truncated, and
one left with no scored target is dropped; both are counted and logged.

A batch is a dict of numpy arrays, each `[B, T]` with T = `seq_len`:

    input_ids       int32    token ids, right-padded with the pad id
    targets         int32    targets[:, t] is the token after input_ids[:, t]
    loss_mask       float32  1 where targets[:, t] is scored
    attention_mask  int32    1 for real tokens, 0 for padding
"""

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import datasets
import numpy as np

from jaxlora.train import chat

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt", ".md")
MESSAGES = "messages"
TEXT = "text"

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenizeStats:
  """Counts from tokenizing one source.

  Attributes:
    read: examples (rows, or text pieces) before dropping.
    truncated: examples cut to `seq_len + 1` tokens.
    dropped_unscored: examples dropped because no target is scored.
    dropped_unaligned: chat examples dropped because a reply's boundary
      falls inside a token or the template renders prefixes differently.
  """

  read: int = 0
  truncated: int = 0
  dropped_unscored: int = 0
  dropped_unaligned: int = 0


@dataclasses.dataclass
class TokenizedExamples:
  """Tokenized examples, each at most `seq_len + 1` tokens long.

  Attributes:
    tokens: int32 arrays `[n_i]` with `2 <= n_i <= seq_len + 1`.
    scored: bool arrays `[n_i]`, True where the token is a scored target.
      The first token of an example is never a target.
    seq_len: T, the width of a batch.
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
  if not _is_integer(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")
  if not _is_integer(seq_len) or seq_len < 1:
    raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1.")
  if max_positions is not None and seq_len > max_positions:
    raise ValueError(
        f"seq_len={seq_len} exceeds the model's maximum of {max_positions}"
        f" positions (max_position_embeddings); pass seq_len <= {max_positions}."
    )


def _is_integer(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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


def read_dataset(path: str | os.PathLike) -> datasets.Dataset:
  """Read a JSON Lines or text file into a `datasets.Dataset`.

  A text file becomes one row, `{"text": <the whole file>}`.

  Raises:
    ValueError: if the file is missing, empty, unreadable as JSON, or has
      another suffix.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"Data file {path!r} not found; check the path.")
  if os.path.getsize(path) == 0:
    raise ValueError(f"Data file {path!r} is empty; it needs at least one example.")

  suffix = os.path.splitext(path)[1].lower()
  if suffix in JSON_SUFFIXES:
    try:
      dataset = datasets.load_dataset("json", data_files=path, split="train")
    except datasets.exceptions.DatasetGenerationError as error:
      raise ValueError(
          f"Data file {path!r} could not be read as JSON Lines ({error.__cause__ or error});"
          " write one JSON object per line."
      ) from error
  elif suffix in TEXT_SUFFIXES:
    dataset = datasets.load_dataset(
        "text", data_files=path, sample_by="document", split="train"
    )
  else:
    raise ValueError(
        f"Data file {path!r} has the suffix {suffix!r}; use one of"
        f" {', '.join(JSON_SUFFIXES + TEXT_SUFFIXES)}."
    )

  if len(dataset) == 0:
    raise ValueError(f"Data file {path!r} contains no examples; add at least one.")
  return dataset


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    seq_len: int,
    chunk_text: bool = False,
    source: str = "dataset",
) -> TokenizedExamples:
  """Tokenize every row of `dataset` and mark its scored tokens.

  Args:
    dataset: rows with a `messages` or a `text` column (or both, with one of
      the two set in each row).
    tokenizer: a transformers tokenizer; it needs a chat template when any
      row is a chat example.
    seq_len: T; each example keeps at most `seq_len + 1` tokens.
    chunk_text: cut each text row into pieces of `seq_len + 1` tokens instead
      of truncating it.
    source: a name for log and error messages, such as the file path.

  Returns:
    The kept examples, in row order, with their counts in `stats`.

  Raises:
    ValueError: if the dataset has neither column, a row has both or
      neither set, a message is malformed, a chat row meets a tokenizer
      without a chat template, or no example is left.
  """
  check_sizes(seq_len=seq_len, batch_size=1)
  columns = dataset.column_names
  if MESSAGES not in columns and TEXT not in columns:
    raise ValueError(
        f"{source}: examples need a `{MESSAGES}` column (chat) or a `{TEXT}`"
        f" column (plain text), but the columns found are {sorted(columns)}. Rename"
        " the column that holds the examples."
    )
  if MESSAGES in columns and any(value is not None for value in dataset[MESSAGES]):
    chat.check_chat_template(tokenizer)

  max_tokens = seq_len + 1
  examples = TokenizedExamples([], [], seq_len, pad_id_of(tokenizer))
  counts = dict(read=0, truncated=0, dropped_unscored=0, dropped_unaligned=0)
  first_unaligned = None

  for index, row in enumerate(dataset):
    try:
      pieces = _tokenize_row(tokenizer, row, f"{source}, example {index}", max_tokens, chunk_text)
    except chat.UnalignedTurnError as error:
      counts["read"] += 1
      counts["dropped_unaligned"] += 1
      first_unaligned = first_unaligned or f"example {index}: {error}"
      continue

    for ids, scored in pieces:
      counts["read"] += 1
      if len(ids) > max_tokens:
        counts["truncated"] += 1
        ids, scored = ids[:max_tokens], scored[:max_tokens]
      if not scored[1:].any():
        counts["dropped_unscored"] += 1
        continue
      examples.tokens.append(ids)
      examples.scored.append(scored)

  examples.stats = TokenizeStats(**counts)
  _log_stats(source, examples, first_unaligned)
  if not examples.tokens:
    raise ValueError(
        f"{source}: no example is left after tokenizing ({counts['read']} read,"
        f" {counts['dropped_unscored']} without a scored token,"
        f" {counts['dropped_unaligned']} with unaligned assistant turns"
        f"{'; first: ' + first_unaligned if first_unaligned else ''})."
        " Chat examples need at least one assistant message."
    )
  return examples


def _tokenize_row(tokenizer, row, label, max_tokens, chunk_text):
  """Return the `(ids, scored)` pieces of one row, before truncation.

  A chat row gives one piece. A text row gives one piece, or with
  `chunk_text` pieces of at most `max_tokens` tokens.
  """
  kind, value = _example_kind(row, label)
  if kind == MESSAGES:
    messages = chat.normalize_messages(value, label)
    return [chat.tokenize_chat(tokenizer, messages)]

  ids = _encode_text(tokenizer, value)
  pieces = _chunks(ids, max_tokens) if chunk_text else [ids]
  return [(piece, np.ones(len(piece), dtype=bool)) for piece in pieces]


def _example_kind(row: dict[str, Any], label: str) -> tuple[str, Any]:
  """Return `("messages", value)` or `("text", value)` for one row."""
  messages = row.get(MESSAGES)
  text = row.get(TEXT)
  if messages is not None and text is not None:
    raise ValueError(
        f"{label}: both `{MESSAGES}` and `{TEXT}` are set;"
        " keep one of them per example."
    )
  if messages is not None:
    return MESSAGES, messages
  if isinstance(text, str):
    return TEXT, text
  present = sorted(key for key, value in row.items() if value is not None)
  raise ValueError(
      f"{label}: neither `{MESSAGES}` nor a string `{TEXT}`"
      f" is set (columns with values: {present}). Give every example one of the two."
  )


def _encode_text(tokenizer: Any, text: str) -> np.ndarray:
  """Return the ids of `text` with the usual special tokens and a closing EOS."""
  ids = tokenizer(text, add_special_tokens=True)["input_ids"]
  eos = tokenizer.eos_token_id
  if eos is not None and (not ids or ids[-1] != eos):
    ids = ids + [eos]
  return np.asarray(ids, dtype=np.int32)


def _chunks(ids: np.ndarray, max_tokens: int) -> list[np.ndarray]:
  """Cut `ids` into pieces of `max_tokens` that overlap by one token."""
  step = max_tokens - 1
  return [ids[start:start + max_tokens] for start in range(0, max(len(ids) - 1, 1), step)]


def _log_stats(source: str, examples: TokenizedExamples, first_unaligned: str | None) -> None:
  stats = examples.stats
  lengths = [len(ids) for ids in examples.tokens] or [0]
  logger.info(
      "%s: kept %d of %d examples (%d truncated to %d tokens, %d without a"
      " scored token dropped); tokens per example median %d, max %d.",
      source, len(examples), stats.read, stats.truncated, examples.seq_len + 1,
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
) -> TokenizedExamples:
  """Read and tokenize one file; text files are cut into pieces (see module doc)."""
  dataset = read_dataset(path)
  chunk_text = os.path.splitext(os.fspath(path))[1].lower() in TEXT_SUFFIXES
  return tokenize_dataset(
      dataset, tokenizer, seq_len=seq_len, chunk_text=chunk_text,
      source=os.fspath(path),
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
) -> tuple[TokenizedExamples, TokenizedExamples | None]:
  """Check the settings, then read, tokenize and split the training data.

  Every check runs before anything is compiled, and the cheap ones (sizes,
  files) before any tokenizing.

  Args:
    train_file: a JSON Lines or text file.
    tokenizer: a transformers tokenizer.
    seq_len: T, tokens per batch row.
    batch_size: B, rows per batch.
    eval_file: held-out examples in a separate file; excludes `eval_fraction`.
    eval_fraction: share of the training file to hold out instead; 0 for none.
    seed: seed of the held-out split.
    max_positions: the model's `max_position_embeddings`; `seq_len` may not
      exceed it.

  Returns:
    `(train, eval)`, where `eval` is None when nothing is held out.

  Raises:
    ValueError: for any invalid setting or data (see `check_sizes`,
      `read_dataset`, `tokenize_dataset` and `split_examples`).
  """
  check_sizes(seq_len=seq_len, batch_size=batch_size, max_positions=max_positions)
  if eval_file is not None and eval_fraction:
    raise ValueError(
        f"Both eval_file={os.fspath(eval_file)!r} and eval_fraction={eval_fraction}"
        " are set; pass one of them."
    )
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1), such as 0.1.")
  for path in (train_file, eval_file):
    if path is not None and not os.path.isfile(path):
      raise ValueError(f"Data file {os.fspath(path)!r} not found; check the path.")
  pad_id_of(tokenizer)

  train = load_examples(train_file, tokenizer, seq_len=seq_len)
  if eval_file is not None:
    return train, load_examples(eval_file, tokenizer, seq_len=seq_len)
  if eval_fraction:
    return split_examples(train, eval_fraction=eval_fraction, seed=seed)
  return train, None


def collate(examples: TokenizedExamples, indices: Sequence[int], batch_size: int) -> Batch:
  """Build one batch from the examples at `indices`, right-padded to `[B, T]`.

  Rows past `len(indices)` are filler: pad ids with all-zero masks.
  """
  shape = (batch_size, examples.seq_len)
  batch = {
      "input_ids": np.full(shape, examples.pad_id, dtype=np.int32),
      "targets": np.full(shape, examples.pad_id, dtype=np.int32),
      "loss_mask": np.zeros(shape, dtype=np.float32),
      "attention_mask": np.zeros(shape, dtype=np.int32),
  }
  for row, index in enumerate(indices):
    ids = examples.tokens[index]
    length = len(ids) - 1
    batch["input_ids"][row, :length] = ids[:-1]
    batch["targets"][row, :length] = ids[1:]
    batch["loss_mask"][row, :length] = examples.scored[index][1:]
    batch["attention_mask"][row, :length] = 1
  return batch


def train_batches(
    examples: TokenizedExamples,
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
) -> Iterator[Batch]:
  """Return an endless iterator of training batches `[B, T]`.

  The examples are visited epoch after epoch, each epoch in a new order drawn
  from `(seed, epoch)`. Batches run across epoch ends, so every batch is
  full and no example is skipped.

  Args:
    examples: the training examples.
    batch_size: B.
    seed: seed of the shuffling.
    start_batch: number of batches to skip, to resume a run where it stopped;
      the batches that follow equal those of an uninterrupted run.

  Raises:
    ValueError: if `batch_size < 1`, `start_batch < 0`, or there are no examples.
  """
  check_sizes(seq_len=examples.seq_len, batch_size=batch_size)
  if start_batch < 0:
    raise ValueError(f"start_batch={start_batch} must be >= 0.")
  if not len(examples):
    raise ValueError("There are no training examples to batch.")
  return _train_batch_iterator(examples, batch_size, seed, start_batch)


def _train_batch_iterator(examples, batch_size, seed, start_batch):
  count = len(examples)
  epoch, offset = divmod(start_batch * batch_size, count)
  order = _epoch_order(count, seed, epoch)
  while True:
    indices = []
    while len(indices) < batch_size:
      if offset == count:
        epoch += 1
        offset = 0
        order = _epoch_order(count, seed, epoch)
      take = min(batch_size - len(indices), count - offset)
      indices.extend(order[offset:offset + take])
      offset += take
    yield collate(examples, indices, batch_size)


def _epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(count)


def eval_batches(examples: TokenizedExamples, *, batch_size: int) -> list[Batch]:
  """Return every example once, in order, as batches `[B, T]`.

  The last batch is filled up with filler rows (pad ids, all-zero
  `loss_mask` and `attention_mask`), so every batch has the same shape and
  the filler adds nothing to a masked loss.

  Raises:
    ValueError: if `batch_size < 1`.
  """
  check_sizes(seq_len=examples.seq_len, batch_size=batch_size)
  return [
      collate(examples, range(start, min(start + batch_size, len(examples))), batch_size)
      for start in range(0, len(examples), batch_size)
  ]

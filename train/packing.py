"""Batching tokenized examples: one example per row, or several packed per row.

A batch is a dict of numpy arrays, each `[B, W]`:

    input_ids       int32    token ids, right-padded with the pad id
    targets         int32    targets[:, t] is the token after input_ids[:, t]
    loss_mask       float32  1 where targets[:, t] is scored
    attention_mask  int32    1 for real tokens, 0 for padding

and, for packed batches, also

    positions       int32    position of each token within its example
    segment_ids     int32    1, 2, ... for the examples of a row, 0 on padding

An example of n tokens fills n - 1 positions of a row: its inputs are
`ids[:-1]` and its targets `ids[1:]`. Its last token is a target only, never
an input, so no target reaches from one example into the next one.

- One example per row (`collate`): each row is right-padded with the pad id
  to the batch width W. `padded_width` picks W: the longest row in the batch
  rounded up to a multiple of `pad_to_multiple_of` tokens (64 by default),
  at most T. The multiple bounds the number of distinct widths, and so the
  number of compilations of a jitted step, to T / `pad_to_multiple_of`,
  while a batch of short examples is not padded to T. `pad_to_multiple_of=None`
  makes every batch T wide.
- Packed rows (`collate_packed`): several whole examples side by side in a
  row of W = T tokens. `segment_ids` numbers the examples of a row and
  `positions` restart at 0 for each example. With the model's attention kept
  inside each segment, a packed example's logits equal those of the same
  example alone in a row.

`train_batches` visits the examples epoch after epoch, each epoch in an order
drawn from `(seed, epoch)`. Packed rows are formed in that order
(`pack_rows`). Batches run across epoch ends. `eval_batches` visits the
examples once, in order.
"""

import bisect
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Unpacked batches are padded to a multiple of this many tokens (see the
# module docstring).
DEFAULT_PAD_TO_MULTIPLE_OF = 64

Batch = dict[str, np.ndarray]

# Rows per epoch as lists of example indices; one index per row when unpacked.
Rows = list[list[int]]


def example_widths(examples: Any) -> np.ndarray:
  """Return the row positions each example fills, `len(ids) - 1`, as int64 `[n]`."""
  return np.array([len(ids) - 1 for ids in examples.tokens], dtype=np.int64)


def padded_width(widths: Sequence[int], seq_len: int, pad_to_multiple_of: int | None) -> int:
  """Return the width of a batch whose longest row has `max(widths)` tokens.

  Args:
    widths: positions filled per row; empty for a batch of filler rows.
    seq_len: T, the widest a batch may be.
    pad_to_multiple_of: round up to a multiple of this many tokens, or None
      for a fixed width of T.
  """
  if pad_to_multiple_of is None:
    return seq_len
  longest = max(widths, default=0)
  rounded = max(1, math.ceil(longest / pad_to_multiple_of)) * pad_to_multiple_of
  return min(seq_len, rounded)


def _empty_batch(batch_size: int, width: int, pad_id: int, packed: bool) -> Batch:
  shape = (batch_size, width)
  batch = {
      "input_ids": np.full(shape, pad_id, dtype=np.int32),
      "targets": np.full(shape, pad_id, dtype=np.int32),
      "loss_mask": np.zeros(shape, dtype=np.float32),
      "attention_mask": np.zeros(shape, dtype=np.int32),
  }
  if packed:
    batch["positions"] = np.zeros(shape, dtype=np.int32)
    batch["segment_ids"] = np.zeros(shape, dtype=np.int32)
  return batch


def collate(examples: Any, indices: Sequence[int], batch_size: int, *, width: int | None = None) -> Batch:
  """Build one batch `[B, width]` with the examples at `indices`, one per row.

  Args:
    examples: `TokenizedExamples` (anything with `tokens`, `scored`,
      `seq_len` and `pad_id`).
    indices: the examples of the first `len(indices)` rows. Rows past them
      are filler: pad ids with all-zero masks.
    batch_size: B.
    width: tokens per row; None for T, `examples.seq_len`.

  Raises:
    ValueError: if an example is wider than `width`.
  """
  width = examples.seq_len if width is None else width
  batch = _empty_batch(batch_size, width, examples.pad_id, packed=False)
  for row, index in enumerate(indices):
    ids = examples.tokens[index]
    length = len(ids) - 1
    if length > width:
      raise ValueError(f"Example {index} fills {length} positions, more than the batch width {width}.")
    batch["input_ids"][row, :length] = ids[:-1]
    batch["targets"][row, :length] = ids[1:]
    batch["loss_mask"][row, :length] = examples.scored[index][1:]
    batch["attention_mask"][row, :length] = 1
  return batch


def collate_packed(examples: Any, rows: Rows, batch_size: int) -> Batch:
  """Build one packed batch `[B, T]`, several examples per row.

  Args:
    examples: `TokenizedExamples`.
    rows: for each of the first `len(rows)` rows, the indices of its
      examples, placed left to right. Rows past them are filler.
    batch_size: B.

  Returns:
    The four keys of `collate`, plus `positions` (0, 1, ... within each
    example, 0 on padding) and `segment_ids` (k for the row's k-th example,
    0 on padding), both int32.

  Raises:
    ValueError: if the examples of a row fill more than T positions.
  """
  batch = _empty_batch(batch_size, examples.seq_len, examples.pad_id, packed=True)
  for row, indices in enumerate(rows):
    start = 0
    for segment, index in enumerate(indices, start=1):
      ids = examples.tokens[index]
      stop = start + len(ids) - 1
      if stop > examples.seq_len:
        raise ValueError(
            f"Packed row {row} fills {stop} positions with examples {list(indices)},"
            f" more than seq_len={examples.seq_len}."
        )
      batch["input_ids"][row, start:stop] = ids[:-1]
      batch["targets"][row, start:stop] = ids[1:]
      batch["loss_mask"][row, start:stop] = examples.scored[index][1:]
      batch["attention_mask"][row, start:stop] = 1
      batch["positions"][row, start:stop] = np.arange(stop - start)
      batch["segment_ids"][row, start:stop] = segment
      start = stop
  return batch


def pack_rows(widths: Sequence[int], capacity: int) -> Rows:
  """Assign items to rows of `capacity` positions by best fit, in the given order.

  Each item goes to the row with the least free room that still fits it,
  the earliest such row on a tie, or to a new row when none does. Rows whose
  room is below the narrowest item are closed. The result depends on the
  order of `widths` only. Placing an item costs O(log R) to find its row and
  O(R) to keep the R open rows sorted.

  Args:
    widths: positions each item fills, each in [1, capacity].
    capacity: positions per row, T.

  Returns:
    The rows in the order they were opened, each listing its item indices in
    the order they were placed.

  Raises:
    ValueError: if an item is wider than `capacity` or narrower than 1.
  """
  widths = [int(width) for width in widths]
  if widths and (min(widths) < 1 or max(widths) > capacity):
    raise ValueError(
        f"Items to pack must fill between 1 and {capacity} positions, got"
        f" widths from {min(widths)} to {max(widths)}."
    )
  narrowest = min(widths, default=1)

  rows = []
  open_rows = []  # (free room, row index), sorted.
  for index, width in enumerate(widths):
    position = bisect.bisect_left(open_rows, (width, -1))
    if position < len(open_rows):
      room, row = open_rows.pop(position)
    else:
      room, row = capacity, len(rows)
      rows.append([])

    rows[row].append(index)
    room -= width
    if room >= narrowest:
      bisect.insort(open_rows, (room, row))
  return rows


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
  """Return the order in which epoch `epoch` visits `count` examples."""
  return np.random.default_rng([seed, epoch]).permutation(count)


def epoch_rows_fn(widths: np.ndarray, *, seed: int, seq_len: int, pack: bool) -> Callable[[int], Rows]:
  """Return `rows(epoch)`: the epoch's rows of example indices, shuffled from `seed`.

  Unpacked, each row is one example, in the epoch's order. Packed, the
  examples are packed with `pack_rows` in the epoch's order. The two most
  recent epochs are cached.
  """

  @functools.lru_cache(maxsize=2)
  def rows(epoch: int) -> Rows:
    order = epoch_order(len(widths), seed, epoch)
    if not pack:
      return [[int(index)] for index in order]
    return [[int(order[i]) for i in row] for row in pack_rows(widths[order], seq_len)]

  return rows


def batch_iterator(
    rows: Callable[[int], Rows],
    make_batch: Callable[[Rows], Batch],
    *,
    batch_size: int,
    start_batch: int,
    rows_per_epoch: int | None = None,
) -> Iterator[Batch]:
  """Yield batches of `batch_size` rows endlessly, epoch after epoch.

  A batch that reaches the end of an epoch takes its remaining rows from the
  start of the next one, so every batch is full and no row is skipped.

  Args:
    rows: `epoch -> rows` of that epoch (`epoch_rows_fn`).
    make_batch: turns a batch's rows into arrays.
    batch_size: B.
    start_batch: batches to skip; the batches that follow equal those of an
      iterator started at 0 after `start_batch` batches.
    rows_per_epoch: the number of rows of every epoch when it is fixed, which
      skips whole epochs without building their rows.
  """
  skip = start_batch * batch_size
  epoch = 0
  if rows_per_epoch is not None:
    epoch, skip = divmod(skip, rows_per_epoch)
  current = rows(epoch)
  while skip >= len(current):
    skip -= len(current)
    epoch += 1
    current = rows(epoch)

  offset = skip
  while True:
    batch_rows = []
    while len(batch_rows) < batch_size:
      if offset == len(current):
        epoch += 1
        offset = 0
        current = rows(epoch)
      take = min(batch_size - len(batch_rows), len(current) - offset)
      batch_rows.extend(current[offset:offset + take])
      offset += take
    yield make_batch(batch_rows)


def packing_efficiency(examples: Any, rows: Rows) -> float:
  """Return the share of the row positions that hold real tokens, in [0, 1]."""
  widths = example_widths(examples)
  real = sum(int(widths[index]) for row in rows for index in row)
  return real / max(1, len(rows) * examples.seq_len)


def check_batch_size(batch_size: int) -> None:
  """Raise a ValueError unless `batch_size` is an integer >= 1."""
  if not is_integer(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")


def is_integer(value: Any) -> bool:
  """Return whether `value` is a Python or numpy integer, and not a bool."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_batching(batch_size, pad_to_multiple_of):
  check_batch_size(batch_size)
  if pad_to_multiple_of is not None and (not is_integer(pad_to_multiple_of) or pad_to_multiple_of < 1):
    raise ValueError(
        f"pad_to_multiple_of={pad_to_multiple_of!r} must be an integer >= 1,"
        " or None for batches of the full seq_len."
    )


def _unpacked_batch(examples, pad_to_multiple_of, batch_size, rows):
  indices = [row[0] for row in rows]
  widths = [len(examples.tokens[index]) - 1 for index in indices]
  width = padded_width(widths, examples.seq_len, pad_to_multiple_of)
  return collate(examples, indices, batch_size, width=width)


def _make_batch_fn(examples, batch_size, pack, pad_to_multiple_of):
  if pack:
    return functools.partial(collate_packed, examples, batch_size=batch_size)
  return functools.partial(_unpacked_batch, examples, pad_to_multiple_of, batch_size)


def train_batches(
    examples: Any,
    *,
    batch_size: int,
    seed: int,
    start_batch: int = 0,
    pack: bool = False,
    pad_to_multiple_of: int | None = DEFAULT_PAD_TO_MULTIPLE_OF,
) -> Iterator[Batch]:
  """Return an endless iterator of training batches `[B, W]`.

  The examples are visited epoch after epoch, each epoch in a new order drawn
  from `(seed, epoch)`. Batches run across epoch ends, so every batch is
  full and no example is skipped. With `pack`, each epoch's examples are
  packed into rows of T tokens in that order, and the packing efficiency of
  the first epoch is logged.

  Args:
    examples: the training examples, `data.TokenizedExamples`.
    batch_size: B.
    seed: seed of the shuffling.
    start_batch: number of batches to skip, to resume a run where it stopped;
      the batches that follow equal those of an uninterrupted run.
    pack: pack several examples per row (see the module docstring).
    pad_to_multiple_of: width multiple of unpacked batches; None for T.
      Every process of a multi-process run must pass None, because their
      batches form one global array and so need one width.

  Raises:
    ValueError: if `batch_size < 1`, `start_batch < 0`,
      `pad_to_multiple_of < 1`, or there are no examples.
  """
  _check_batching(batch_size, pad_to_multiple_of)
  if not is_integer(start_batch) or start_batch < 0:
    raise ValueError(f"start_batch={start_batch!r} must be an integer >= 0.")
  if not len(examples.tokens):
    raise ValueError("There are no training examples to batch; pass at least one example.")

  rows = epoch_rows_fn(example_widths(examples), seed=seed, seq_len=examples.seq_len, pack=pack)
  if pack:
    _log_packing(examples, rows(0), "training, per epoch")
  return batch_iterator(
      rows, _make_batch_fn(examples, batch_size, pack, pad_to_multiple_of),
      batch_size=batch_size, start_batch=start_batch,
      rows_per_epoch=None if pack else len(examples.tokens),
  )


def eval_batches(
    examples: Any,
    *,
    batch_size: int,
    pack: bool = False,
    pad_to_multiple_of: int | None = DEFAULT_PAD_TO_MULTIPLE_OF,
) -> list[Batch]:
  """Return every example once, in order, as batches `[B, W]`.

  The last batch is filled up with filler rows (pad ids, all-zero
  `loss_mask` and `attention_mask`), so they add nothing to a masked loss.
  With `pack`, the examples are packed in order into rows of T tokens.

  Args:
    examples: the held-out examples, `data.TokenizedExamples`.
    batch_size: B.
    pack: pack several examples per row.
    pad_to_multiple_of: width multiple of unpacked batches; None for T (see
      `train_batches`).

  Raises:
    ValueError: if `batch_size < 1` or `pad_to_multiple_of < 1`.
  """
  _check_batching(batch_size, pad_to_multiple_of)
  if pack:
    rows = pack_rows(example_widths(examples), examples.seq_len)
    _log_packing(examples, rows, "evaluation")
  else:
    rows = [[index] for index in range(len(examples.tokens))]

  make_batch = _make_batch_fn(examples, batch_size, pack, pad_to_multiple_of)
  return [make_batch(rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)]


def _log_packing(examples, rows, purpose):
  logger.info(
      "Packed %d examples into %d rows of %d tokens (%s): %.1f%% of the row"
      " positions hold real tokens.",
      len(examples.tokens), len(rows), examples.seq_len, purpose,
      100.0 * packing_efficiency(examples, rows),
  )

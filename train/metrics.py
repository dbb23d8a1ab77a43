"""Per-step training metrics as JSON Lines, one object per optimizer step.

A line looks like

    {"step": 12, "loss": 2.31, "grad_norm": 0.84, "lr": 0.0002,
     "scored_tokens": 412.0, "tokens_per_s": 1830.5, "elapsed_s": 9.7}

with `"eval_loss"` added on the steps where the held-out loss was measured.
"""

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)


class MetricsWriter:
  """Appends metric records to a JSON Lines file, one flushed line per record.

  The file is opened in append mode, so a resumed run continues the same file.
  Each line is flushed as soon as it is written, so a process killed in the
  middle of a write can leave at most the last line incomplete. With `path=None` the
  writer discards every record.

  Use it as a context manager:

      with MetricsWriter("run/metrics.jsonl") as writer:
        writer.write({"step": 1, "loss": 2.3})
  """

  def __init__(self, path: str | os.PathLike | None):
    self.path = None if path is None else os.fspath(path)
    self._file = None

  def __enter__(self) -> "MetricsWriter":
    if self.path is not None:
      folder = os.path.dirname(self.path)
      if folder:
        os.makedirs(folder, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      logger.info("Appending per-step metrics to %s.", self.path)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def write(self, record: Mapping[str, Any]) -> None:
    """Append `record` as one line of JSON and flush it.

    Raises:
      ValueError: if a value is NaN or infinite, which JSON cannot represent.
    """
    if self.path is None:
      return
    if self._file is None:
      raise ValueError(
          f"MetricsWriter for {self.path} is not open; use it inside a"
          " `with` block."
      )
    self._file.write(json.dumps(dict(record), allow_nan=False) + "\n")
    self._file.flush()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Read every record of a JSON Lines metrics file, in order.

  Raises:
    ValueError: if a line is not valid JSON, naming the line number.
  """
  records = []
  with open(path, encoding="utf-8") as file:
    for number, line in enumerate(file, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as error:
        raise ValueError(
            f"Line {number} of {os.fspath(path)} is not valid JSON ({error});"
            " the run that wrote it may have been killed mid-line. Delete the"
            " line to read the rest."
        ) from None
  return records

"""Per-step training metrics as JSON Lines and as TensorBoard scalars.

A JSON line, one per optimizer step, looks like

    {"step": 12, "loss": 2.31, "grad_norm": 0.84, "lr": 0.0002,
     "scored_tokens": 412.0, "tokens_per_s": 1830.5, "elapsed_s": 9.7}

with `"eval_loss"` added on the steps where the held-out loss was measured.
`TensorBoardWriter` writes the fields named in `TENSORBOARD_SCALARS` of the
same records as scalars tagged with the field name, at the record's step.
"""

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

TENSORBOARD_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss")

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


def truncate_metrics(
    path: str | os.PathLike,
    step: int,
    *,
    rewrite: bool = True,
) -> list[dict[str, Any]]:
  """Drop the records after `step` from a metrics file, so a resumed run continues it.

  The file is rewritten through a temporary file in its folder and
  `os.replace`, so a kill leaves either the old or the new file. A missing
  file is left missing. An incomplete last line, as a kill in the middle of
  a write leaves, is dropped too.

  Args:
    path: the JSON Lines file of `MetricsWriter`.
    step: the last step to keep.
    rewrite: False only reads the records to keep and leaves the file as it
      is, for a process that does not write the file.

  Returns:
    The records kept, those of steps up to `step`, in order.

  Raises:
    ValueError: if a line other than the last is not valid JSON, or a line
      is not a record with a "step" key.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as file:
    lines = [
        (number, line)
        for number, line in enumerate(file.read().splitlines(), start=1)
        if line.strip()
    ]

  records = []
  for index, (number, line) in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      if index < len(lines) - 1:
        raise ValueError(
            f"Line {number} of {path} is not valid JSON ({error}). Only the last"
            " line can be cut short by a kill, so delete or fix that line."
        ) from None
      logger.warning("Dropping the incomplete last line of %s.", path)
      continue
    if not isinstance(record, dict) or "step" not in record:
      raise ValueError(
          f"Line {number} of {path} is not a metrics record with a step:"
          f" {line[:80]!r}. Pass the file that fit's metrics_path wrote."
      )
    records.append(record)

  kept_records = [record for record in records if record["step"] <= step]
  if len(kept_records) == len(lines) or not rewrite:
    return kept_records

  logger.info(
      "Dropping %d records after step %d from %s; the resumed run rewrites them.",
      len(records) - len(kept_records), step, path,
  )
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as file:
    for record in kept_records:
      file.write(json.dumps(record, allow_nan=False) + "\n")
    file.flush()
    os.fsync(file.fileno())
  os.replace(temporary, path)
  return kept_records


class TensorBoardWriter:
  """Writes the `TENSORBOARD_SCALARS` of each metric record to TensorBoard event files.

  With `logdir=None` the writer discards every record. Use it as a context
  manager, like `MetricsWriter`.

  Args:
    logdir: the folder of the event files; created if missing.
    purge_step: when a run resumes, the first step it will write. TensorBoard
      then hides the events of this step and later that an earlier,
      interrupted process wrote, so the curves read as one run.
  """

  def __init__(self, logdir: str | os.PathLike | None, *, purge_step: int | None = None):
    self.logdir = None if logdir is None else os.fspath(logdir)
    self.purge_step = purge_step
    self._writer = None

  def __enter__(self) -> "TensorBoardWriter":
    if self.logdir is not None:
      import tensorboardX  # pylint: disable=import-outside-toplevel

      self._writer = tensorboardX.SummaryWriter(self.logdir, purge_step=self.purge_step)
      logger.info("Writing TensorBoard events to %s.", self.logdir)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def write(self, record: Mapping[str, Any]) -> None:
    """Add the record's scalars at step `record["step"]` and flush them to disk."""
    if self.logdir is None:
      return
    if self._writer is None:
      raise ValueError(
          f"TensorBoardWriter for {self.logdir} is not open; use it inside a"
          " `with` block."
      )
    for name in TENSORBOARD_SCALARS:
      if name in record:
        self._writer.add_scalar(name, record[name], global_step=record["step"])
    self._writer.flush()

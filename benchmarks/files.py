"""Atomic file writes for benchmark results."""

import json
import os
import tempfile


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Write `data` to `path` through a temporary file in the same folder and a rename.

  A reader never sees a half-written file, even if the writer is interrupted.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(handle, "wb") as f:
      f.write(data)
    # mkstemp creates the file readable by its owner only.
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def write_text(path: str | os.PathLike, text: str) -> None:
  """Write `text` as UTF-8 to `path` atomically."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value) -> None:
  """Write `value` as indented JSON to `path` atomically."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
  """Return the JSON value stored in `path`."""
  with open(path, encoding="utf-8") as f:
    return json.load(f)

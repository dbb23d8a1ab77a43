"""One training run from a `RunConfig`, end to end.

    check the output folder (resume or start fresh), write config.yaml
      -> load the model and its tokenizer          (load_model)
      -> read, tokenize and split the data         (load_data)
      -> add adapters ("lora") or not ("full")     (build_params)
      -> held-out loss before training
      -> train.fit with checkpoints, metrics and TensorBoard, resuming
         from the latest checkpoint when there is one
      -> loss.png, exports, answers to the prompts, summary.json

Everything a run writes lands inside `output.dir`:

    config.yaml      the resolved config
    data/            the pydoc Q/A files, when data.train_file is "pydoc-qa"
    checkpoints/     orbax checkpoints, step_NNNNNNNN/
    metrics.jsonl    one record per step (see `train.metrics`)
    tensorboard/     TensorBoard event files
    loss.png         training and held-out loss against steps
    merged/          Hugging Face folder with the adapters folded in
    adapter/         peft adapter folder
    summary.json     losses before and after, answers, exports, seconds

Each file is written to a temporary path beside its final one and renamed,
so a run killed at any point leaves it complete or absent. The exceptions
are metrics.jsonl and the TensorBoard events, which grow by one flushed
record per step, so a kill can cut only their last record.

NOTE: `train` runs in one process (on all of its local devices). It feeds
`fit` whole batches, not the per-process rows that a multi-host run needs.
"""

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import yaml

import jaxlora
from jaxlora import models
from jaxlora.models import peft_io, smollm2
from jaxlora.train import checkpoint as checkpoint_lib
from jaxlora.train import data, generate, loop, metrics, plot, pydoc_qa, resume, step
from jaxlora.train.config import PYDOC_QA, SMOLLM2, ModelSection, RunConfig, save_config, write_atomically

logger = logging.getLogger(__name__)

# Keys that may change between a run and its resumption. All but train.steps
# leave what the resumed steps compute unchanged; a larger train.steps trains
# further, with the learning-rate schedule stretched to the new length.
RESUMABLE_CHANGES = (
    "train.steps", "train.resume", "train.keep_checkpoints",
    "train.checkpoint_every", "train.eval_every", "data.max_eval_examples",
)


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """The files and folders of a run inside its output folder (see the module docstring)."""

  dir: pathlib.Path

  @property
  def config(self) -> pathlib.Path:
    return self.dir / "config.yaml"

  @property
  def data(self) -> pathlib.Path:
    return self.dir / "data"

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.dir / "checkpoints"

  @property
  def metrics(self) -> pathlib.Path:
    return self.dir / "metrics.jsonl"

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.dir / "tensorboard"

  @property
  def plot(self) -> pathlib.Path:
    return self.dir / "loss.png"

  @property
  def merged(self) -> pathlib.Path:
    return self.dir / "merged"

  @property
  def adapter(self) -> pathlib.Path:
    return self.dir / "adapter"

  @property
  def summary(self) -> pathlib.Path:
    return self.dir / "summary.json"


@dataclasses.dataclass
class RunResult:
  """What `train` returns.

  Attributes:
    config: the config of the run.
    paths: where the run's files are.
    history: every step's record, read back from metrics.jsonl, so a resumed
      run includes the steps before its interruption.
    eval_loss_before: held-out loss before the first step (nats per token),
      or None without held-out data.
    eval_loss_after: held-out loss after the last step, or None.
    params: the trained tree, adapters unmerged, on the training mesh.
    answers: `(prompt, answer)` for each of `output.prompts`.
    exports: `{"merged": folder, "adapter": folder}`, the folders written.
    resumed_from: the checkpoint step the run continued from, or None.
    seconds: wall time of the run.
  """

  config: RunConfig
  paths: RunPaths
  history: list[dict[str, Any]]
  eval_loss_before: float | None
  eval_loss_after: float | None
  params: dict[str, Any]
  answers: list[tuple[str, str]]
  exports: dict[str, pathlib.Path]
  resumed_from: int | None
  seconds: float


def train(config: RunConfig) -> RunResult:
  """Run the job `config` describes, end to end; see the module docstring.

  Raises:
    ValueError: for an output folder whose checkpoints cannot be resumed
      with this config (checked before the model is loaded), and for any
      invalid model, data or setting found by the loaders, all before
      anything is compiled.
    FloatingPointError: when a step's loss or gradient norm is not finite.
  """
  start = time.perf_counter()
  paths = RunPaths(pathlib.Path(config.output.dir))
  resumed_from = prepare_output(config, paths)

  pretrained = load_model(config.model)
  train_examples, eval_examples = load_data(
      config, pretrained.tokenizer, pretrained.config.max_position_embeddings
  )
  params, lora_config = build_params(config, pretrained)
  model = build_model(config, pretrained)

  eval_batches = []
  if eval_examples is not None:
    eval_batches = data.eval_batches(eval_examples, batch_size=config.data.batch_size, pack=config.data.pack)
  eval_loss_before = _evaluate_before(model, params, eval_batches)

  def train_batches(start_batch):
    return data.train_batches(
        train_examples, batch_size=config.data.batch_size, seed=config.data.seed,
        start_batch=start_batch, pack=config.data.pack,
    )

  train_config = config.train.to_train_config(
      metrics_path=paths.metrics,
      checkpoint_dir=paths.checkpoints,
      tensorboard_dir=paths.tensorboard if config.output.tensorboard else None,
  )
  result = loop.fit(
      model, params, train_batches, eval_batches, train_config,
      lora_config=lora_config, model_info=model_info(pretrained),
  )
  history = metrics.read_metrics(paths.metrics)
  evals = [record["eval_loss"] for record in history if "eval_loss" in record]
  eval_loss_after = evals[-1] if evals else None

  if config.output.plot:
    title = "LoRA fine-tuning" if config.train.mode == "lora" else "Full fine-tuning"
    plot.plot_losses(history, paths.plot, eval_loss_before=eval_loss_before, title=title)
  exports = export(config, paths, pretrained, result.params, lora_config)
  answers = answer_prompts(config, model, result.params, pretrained)

  outcome = RunResult(
      config=config, paths=paths, history=history,
      eval_loss_before=eval_loss_before, eval_loss_after=eval_loss_after,
      params=result.params, answers=answers, exports=exports,
      resumed_from=resumed_from, seconds=time.perf_counter() - start,
  )
  write_summary(outcome)
  return outcome


def _evaluate_before(model, params, eval_batches):
  """Return the held-out loss of `params` before training, or None without held-out batches."""
  if not eval_batches:
    return None
  logger.info("Measuring the held-out loss before training.")
  loss = step.evaluate(step.make_eval_step(model), params, eval_batches)
  logger.info("Held-out loss before training: %.4f.", loss)
  return loss


def answer_prompts(config: RunConfig, model, params, pretrained) -> list[tuple[str, str]]:
  """Return `(prompt, answer)` for each of `output.prompts`, generated greedily by `params`."""
  prompts = list(config.output.prompts)
  if not prompts:
    return []
  logger.info("Answering %d prompts with the trained model.", len(prompts))
  replies = generate.generate(
      model, params, pretrained.tokenizer, prompts,
      max_new_tokens=config.output.max_new_tokens,
      generation_config=pretrained.generation_config,
  )
  return list(zip(prompts, replies))


def prepare_output(config: RunConfig, paths: RunPaths) -> int | None:
  """Decide between resuming and starting fresh, and write config.yaml.

  A fresh start removes the metrics file and TensorBoard events of an
  earlier run that left no checkpoint, so they do not mix with this run's.

  Returns:
    The step of the checkpoint the run resumes from, or None for a fresh start.

  Raises:
    ValueError: if the folder contains checkpoints and `train.resume` is false,
      or if they were written with a config that differs from this one in a
      key that changes the training (a key outside `RESUMABLE_CHANGES`).
  """
  latest = checkpoint_lib.latest_step(paths.checkpoints)
  if latest is not None and not config.train.resume:
    raise ValueError(
        f"{paths.checkpoints} already contains checkpoints (the latest of step"
        f" {latest}) and train.resume is false. Set train.resume=true to"
        " continue that run, or choose another output.dir, or delete the folder."
    )
  if latest is not None and paths.config.is_file():
    _check_same_run(config, paths.config)

  paths.dir.mkdir(parents=True, exist_ok=True)
  save_config(config, paths.config)
  if latest is None:
    if paths.metrics.exists():
      logger.info("Starting fresh: removing %s of an earlier run without checkpoints.", paths.metrics)
      paths.metrics.unlink()
    if paths.tensorboard.exists():
      shutil.rmtree(paths.tensorboard)
  else:
    logger.info("Resuming from the checkpoint of step %d in %s.", latest, paths.checkpoints)
  return latest


def _check_same_run(config, saved_path):
  with open(saved_path, encoding="utf-8") as file:
    saved = yaml.safe_load(file) or {}
  current = _flatten(config.to_dict())
  previous = _flatten(saved)
  differences = [
      f"{key}: {previous.get(key)!r} before, {current.get(key)!r} now"
      for key in sorted(set(current) | set(previous))
      if key.split(".")[0] in ("model", "lora", "data", "train")
      and key not in RESUMABLE_CHANGES
      and current.get(key) != previous.get(key)
  ]
  if differences:
    raise ValueError(
        f"The checkpoints in {os.path.dirname(saved_path)} were written by a run"
        f" with another config ({saved_path}), so resuming would not continue"
        f" it: {'; '.join(differences[:5])}. Restore those values, or choose"
        " another output.dir for a new run."
    )


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and prefix == "":
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def load_model(section: ModelSection) -> models.Pretrained:
  """Load the model of `section`, fetching SmolLM2 for the path "smollm2".

  Raises:
    ValueError: if the model cannot be loaded or has no tokenizer.
  """
  path = smollm2.fetch_smollm2() if section.path == SMOLLM2 else section.path
  logger.info("Loading the model from %s.", path)
  pretrained = models.load(path, dtype=section.dtype)
  if pretrained.tokenizer is None:
    raise ValueError(
        f"The model at {path} has no tokenizer files; training reads text and"
        " needs one. Save the tokenizer into the model folder."
    )
  return pretrained


def load_data(config: RunConfig, tokenizer: Any, max_positions: int | None):
  """Read, tokenize and split the data of `config.data`.

  With `data.train_file` "pydoc-qa" the Q/A files are written to
  `<output.dir>/data` first.

  Returns:
    `(train_examples, eval_examples)`, the second None when nothing is held
    out, and cut to `data.max_eval_examples`.
  """
  section = config.data
  train_file, eval_file = section.train_file, section.eval_file
  eval_fraction = section.resolved_eval_fraction()
  if train_file == PYDOC_QA:
    folder = RunPaths(pathlib.Path(config.output.dir)).data
    train_file, eval_file = pydoc_qa.write_pydoc_qa(folder, eval_fraction=eval_fraction)
    eval_fraction = 0.0

  train_examples, eval_examples = data.prepare_data(
      train_file, tokenizer,
      seq_len=section.seq_len, batch_size=section.batch_size,
      eval_file=eval_file, eval_fraction=eval_fraction, seed=section.seed,
      max_positions=max_positions, data_format=section.data_format,
      columns=dict(section.columns) or None, train_on_prompt=section.train_on_prompt,
  )
  if eval_examples is not None and section.max_eval_examples is not None:
    eval_examples = eval_examples.subset(range(min(section.max_eval_examples, len(eval_examples))))
  logger.info(
      "%d training and %d held-out examples.",
      len(train_examples), 0 if eval_examples is None else len(eval_examples),
  )
  return train_examples, eval_examples


def build_params(config: RunConfig, pretrained: models.Pretrained):
  """Return `(params, lora_config)`: adapters added in "lora" mode, `(params, None)` in "full"."""
  if config.train.mode == "full":
    return pretrained.params, None
  lora_config = config.lora.to_lora_config()
  params = jaxlora.apply(pretrained.params, lora_config, rng=jax.random.PRNGKey(config.train.seed))
  return params, lora_config


def build_model(config: RunConfig, pretrained: models.Pretrained):
  """Return the Flax module of the run: its compute dtype, and LoRA dropout in "lora" mode."""
  fields = {}
  if config.train.compute_dtype is not None:
    fields["dtype"] = jnp.dtype(config.train.compute_dtype)
  if config.train.mode == "lora" and config.lora.dropout:
    fields["lora_dropout"] = config.lora.dropout
  return models.build_model(pretrained.config, **fields)


def model_info(pretrained: models.Pretrained) -> dict[str, Any]:
  """Return the JSON-able description of the model that checkpoints record."""
  return pretrained.config.to_hf()


def export(config, paths, pretrained, params, lora_config) -> dict[str, pathlib.Path]:
  """Write the exports that `output.export` selects and return their folders."""
  exports = {}
  if config.output.export in ("merged", "both"):
    save_merged(paths.merged, pretrained, params, dtype=config.output.export_dtype)
    exports["merged"] = paths.merged
  if config.output.export in ("adapter", "both"):
    models.save_peft_adapter(
        paths.adapter, pretrained.config, params, lora_config,
        base_model_name_or_path=str(pretrained.path), overwrite=True,
    )
    exports["adapter"] = paths.adapter
  return exports


def save_merged(folder, pretrained, params, *, dtype=None, max_shard_size=None, overwrite=True):
  """Write `params` with adapters folded in as a Hugging Face folder beside the model's tokenizer.

  A Hugging Face model folder's tokenizer, generation and chat-template files
  are copied unchanged; a GGUF file's tokenizer is saved by transformers.

  Args:
    dtype: dtype of the saved weights; None keeps the loaded checkpoint's.
    max_shard_size: the largest weights file, such as "5GB"; None is
      `save_pretrained`'s default.
  """
  extras = {}
  if os.path.isdir(pretrained.path):
    extras["source_folder"] = pretrained.path
  else:
    extras["tokenizer"] = pretrained.tokenizer
    extras["generation_config"] = pretrained.generation_config
  if max_shard_size is not None:
    extras["max_shard_size"] = max_shard_size
  models.save_merged(
      folder, pretrained.config, params, dtype=dtype or pretrained.source_dtype,
      overwrite=overwrite, **extras,
  )


@dataclasses.dataclass
class Trained:
  """A base model with trained weights on it, as `load_trained` returns it.

  Attributes:
    pretrained: the base model as loaded.
    params: the tree to run: the base with adapters, the fully fine-tuned
      weights, or the base alone.
    lora_config: the adapters' settings, or None without adapters.
  """

  pretrained: models.Pretrained
  params: dict[str, Any]
  lora_config: jaxlora.LoraConfig | None


def load_trained(model_path, *, adapter=None, checkpoint=None, dtype=None) -> Trained:
  """Load a base model with a peft adapter or a training checkpoint on it.

  Args:
    model_path: a Hugging Face folder, a .gguf file or "smollm2".
    adapter: a peft adapter folder, or a training checkpoint as `checkpoint`
      takes it; None for neither.
    checkpoint: a run's checkpoints folder (its latest step) or one
      `step_NNNNNNNN` folder in it.
    dtype: dtype of the loaded base weights; None keeps the stored dtype.

  Raises:
    ValueError: if a path is missing or is neither kind, or if the
      checkpoint was saved from another model, naming what differs.
  """
  if adapter is not None and checkpoint is not None:
    raise ValueError("Pass an adapter or a checkpoint, not both.")
  for name, path in (("adapter", adapter), ("checkpoint", checkpoint)):
    if path is not None and not os.path.isdir(path):
      raise ValueError(f"The {name} folder {os.fspath(path)!r} not found; check the path.")
  if adapter is not None and not os.path.isfile(os.path.join(adapter, peft_io.ADAPTER_CONFIG_FILE)):
    adapter, checkpoint = None, adapter
  location = None if checkpoint is None else _checkpoint_location(checkpoint)

  pretrained = load_model(ModelSection(path=os.fspath(model_path), dtype=dtype))
  if adapter is not None:
    loaded = models.load_peft_adapter(adapter, pretrained.config, pretrained.params)
    return Trained(pretrained, loaded.params, loaded.lora_config)
  if location is not None:
    params, lora_config = _restore_checkpoint(*location, pretrained)
    return Trained(pretrained, params, lora_config)
  return Trained(pretrained, pretrained.params, None)


def _restore_checkpoint(directory, step, pretrained):
  """Return `(params, lora_config)` of a checkpoint restored onto `pretrained`'s weights."""
  path = checkpoint_lib.step_path(directory, step if step is not None else checkpoint_lib.latest_step(directory))
  metadata = checkpoint_lib.read_metadata(directory, step)
  mode = metadata.get("mode")
  if mode == "lora":
    lora_config = jaxlora.LoraConfig.from_dict(metadata["lora_config"])
    params = jaxlora.apply(pretrained.params, lora_config)
    mask = jaxlora.adapter_mask(params)
  elif mode == "full":
    lora_config = None
    params = pretrained.params
    mask = jaxlora.full_mask(params)
  else:
    raise ValueError(
        f"{path} is not a checkpoint of jaxlora.train.fit: its"
        f" metadata has mode {mode!r}, not 'lora' or 'full'."
    )

  trainable, frozen = jaxlora.partition(params, trainable_mask=mask)
  run = resume.describe_run(
      mode=mode, lora_config=lora_config, model_info=model_info(pretrained), trainable=trainable,
  )
  resume.check_same_run(metadata, run, path=path)
  _, trainable, _ = checkpoint_lib.restore(directory, trainable=trainable, step=step)
  return jaxlora.combine(trainable, frozen), lora_config


def _checkpoint_location(path):
  """Return `(checkpoints folder, step or None)` for a checkpoints folder or one step folder."""
  path = pathlib.Path(path)
  match = checkpoint_lib.STEP_FOLDER.fullmatch(path.name)
  if match:
    return path.parent, int(match.group(1))
  if checkpoint_lib.latest_step(path) is None:
    raise ValueError(
        f"{path} is neither a peft adapter folder ({peft_io.ADAPTER_CONFIG_FILE}"
        f" not found) nor a training checkpoint (no {checkpoint_lib.STEP_PREFIX}N"
        " folder). Pass a run's checkpoints folder, one of its step folders, or"
        " an adapter folder."
    )
  return path, None


def write_summary(result: RunResult) -> None:
  """Write `summary.json`: losses, answers, exports and wall time of the run."""
  summary = {
      "steps": result.history[-1]["step"] if result.history else 0,
      "final_loss": result.history[-1]["loss"] if result.history else None,
      "eval_loss_before": result.eval_loss_before,
      "eval_loss_after": result.eval_loss_after,
      "resumed_from": result.resumed_from,
      "answers": [{"prompt": prompt, "answer": answer} for prompt, answer in result.answers],
      "exports": {name: str(folder) for name, folder in result.exports.items()},
      "seconds": result.seconds,
  }
  write_atomically(result.paths.summary, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))

"""The loss curve of a run as a PNG: training and held-out loss against steps."""

import io
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from jaxlora.train.config import write_atomically

logger = logging.getLogger(__name__)


def plot_losses(
    history: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    eval_loss_before: float | None = None,
    title: str = "Fine-tuning",
) -> None:
  """Draw the training and held-out loss against steps and write the PNG atomically.

  Args:
    history: per-step records with `step` and `loss`, and `eval_loss` on
      evaluation steps, as `train.fit` returns them or `read_metrics` reads
      them back.
    path: the PNG file to write; its folder is created if missing.
    eval_loss_before: the held-out loss before the first step, drawn at step
      0; None draws none.
    title: the title above the plot.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot, ticker  # pylint: disable=import-outside-toplevel

  history = list(history)
  evals = [(record["step"], record["eval_loss"]) for record in history if "eval_loss" in record]
  if eval_loss_before is not None:
    evals.insert(0, (0, eval_loss_before))

  figure, axes = pyplot.subplots(figsize=(7, 4))
  try:
    axes.plot([r["step"] for r in history], [r["loss"] for r in history], label="training loss")
    if evals:
      axes.plot([step for step, _ in evals], [loss for _, loss in evals], "o-", label="held-out loss")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_ylabel("cross entropy (nats per token)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
  finally:
    pyplot.close(figure)
  write_atomically(path, buffer.getvalue())
  logger.info("Wrote the loss curve to %s.", path)

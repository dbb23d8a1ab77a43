"""Training: the optimizer, the jitted steps, and the loop that runs them.

`fit(model, params, train_batches, eval_batches, TrainConfig(...))` partitions
the tree, trains the trainable half with AdamW on a warmup-cosine schedule,
and returns the joined tree with a per-step history.
"""

from jaxlora.train.loop import FitResult, TrainConfig, fit
from jaxlora.train.metrics import MetricsWriter, read_metrics
from jaxlora.train.optim import adamw, decay_mask, learning_rate_schedule
from jaxlora.train.step import (
    BATCH_KEYS,
    evaluate,
    make_eval_step,
    make_train_step,
    stack_micro_batches,
    token_cross_entropy,
)

__all__ = [
    "BATCH_KEYS",
    "FitResult",
    "MetricsWriter",
    "TrainConfig",
    "adamw",
    "decay_mask",
    "evaluate",
    "fit",
    "learning_rate_schedule",
    "make_eval_step",
    "make_train_step",
    "read_metrics",
    "stack_micro_batches",
    "token_cross_entropy",
]

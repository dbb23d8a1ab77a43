"""Training: the optimizer, the jitted steps, and the loop that runs them.

`fit(model, params, train_batches, eval_batches, TrainConfig(...))` partitions
the tree by mode (LoRA adapters or every weight), places it on a device mesh
by sharding rules, trains the trainable half with AdamW on a warmup-cosine
schedule, and returns the joined tree with a per-step history.
"""

from jaxlora.train import checkpoint, distributed, resume, summary
from jaxlora.train.loop import FitResult, TrainConfig, fit
from jaxlora.train.mesh import AXES, make_mesh
from jaxlora.train.metrics import MetricsWriter, TensorBoardWriter, read_metrics, truncate_metrics
from jaxlora.train.optim import adamw, decay_mask, learning_rate_schedule
from jaxlora.train.sharding import REPLICATED, ShardingRules, llama_rules, optimizer_shardings, place
from jaxlora.train.summary import parameter_summary
from jaxlora.train.step import (
    BATCH_KEYS,
    StepShardings,
    evaluate,
    make_eval_step,
    make_train_step,
    stack_micro_batches,
    token_cross_entropy,
)

__all__ = [
    "AXES",
    "BATCH_KEYS",
    "FitResult",
    "MetricsWriter",
    "REPLICATED",
    "ShardingRules",
    "StepShardings",
    "TensorBoardWriter",
    "TrainConfig",
    "adamw",
    "checkpoint",
    "decay_mask",
    "distributed",
    "evaluate",
    "fit",
    "learning_rate_schedule",
    "llama_rules",
    "make_eval_step",
    "make_mesh",
    "make_train_step",
    "optimizer_shardings",
    "parameter_summary",
    "place",
    "read_metrics",
    "resume",
    "stack_micro_batches",
    "summary",
    "token_cross_entropy",
    "truncate_metrics",
]

"""Fine-tune your own Flax NNX model with LoRA, without changing its code.

The model is an ordinary `nnx.Module`: residual MLP blocks in an `nnx.List`,
with `nnx.Linear`, `nnx.LayerNorm` and `nnx.Dropout` (whose random state lives
in the model). The script:

  1. trains it fully on task A: label a Gaussian point by the largest output
     of a random two-layer "teacher";
  2. splits it with `nnx.split`, adds adapters to the block layers with
     `jaxlora.apply` on the parameter dict, builds the adapted model with
     `jaxlora.nnx_model`, and trains only the adapters on task B (a teacher
     that differs by a low-rank change) with
     `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`;
  3. merges the adapters with `jaxlora.merge` and checks that the unmodified
     model, rebuilt with `nnx.merge`, gives the adapted model's logits.

It runs in a few seconds on a CPU. `python examples/custom_nnx.py --help`
lists the flags.
"""

import argparse
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlora

logger = logging.getLogger("custom_nnx")

FEATURES = 12
CLASSES = 5


class Block(nnx.Module):
  """`x + fc2(dropout(gelu(fc1(norm(x)))))`."""

  def __init__(self, width: int, hidden: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    return x + self.fc2(self.dropout(nnx.gelu(self.fc1(self.norm(x)))))


class Classifier(nnx.Module):
  """Inputs `[B, FEATURES]` to logits `[B, CLASSES]`."""

  def __init__(self, rngs: nnx.Rngs, width: int = 32, hidden: int = 48, depth: int = 2):
    self.embed = nnx.Linear(FEATURES, width, rngs=rngs)
    self.blocks = nnx.List([Block(width, hidden, rngs) for _ in range(depth)])
    self.head = nnx.Linear(width, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument("--base-steps", type=int, default=300, help="full training steps on task A.")
  parser.add_argument("--steps", type=int, default=100, help="LoRA training steps on task B.")
  parser.add_argument("--rank", type=int, default=4, help="LoRA rank r.")
  parser.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha; scale = alpha / rank.")
  parser.add_argument(
      "--targets", default=r"blocks\.\d+\.fc[12]",
      help="comma-separated module names, a regular expression over the dotted"
      " module path (blocks.0.fc1), or 'all-linear'.",
  )
  parser.add_argument("--learning-rate", type=float, default=1e-2, help="Adam learning rate.")
  parser.add_argument("--batch-size", type=int, default=256, help="examples per step.")
  parser.add_argument("--seed", type=int, default=0, help="seed for data and weights.")
  return parser.parse_args(argv)


def make_task(first, second):
  """Return `sample(key, n) -> (x [n, FEATURES], labels [n])` for a two-layer teacher."""

  def sample(key, n):
    x = jax.random.normal(key, (n, FEATURES))
    return x, jnp.argmax(jnp.tanh(x @ first) @ second, axis=-1)

  return sample


def cross_entropy(model, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def train(model, optimizer, wrt, sample, key, steps, batch_size):
  """Run `steps` steps of `optimizer` on the variables of `model` that `wrt` selects."""

  @nnx.jit
  def step(model, optimizer, x, labels):
    loss, grads = nnx.value_and_grad(cross_entropy, argnums=nnx.DiffState(0, wrt))(model, x, labels)
    optimizer.update(model, grads)
    return loss

  model.train()
  for index in range(steps):
    x, labels = sample(jax.random.fold_in(key, index), batch_size)
    loss = step(model, optimizer, x, labels)
    if index % max(1, steps // 5) == 0 or index == steps - 1:
      logger.info("step %d: loss %.4f", index, loss)
  model.eval()


def parse_targets(text: str):
  """Return 'all-linear' or a regular expression as is, and split a list of names."""
  if text == jaxlora.ALL_LINEAR or "," not in text and not text.isidentifier():
    return text
  return [name.strip() for name in text.split(",") if name.strip()]


def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
  logging.getLogger("jax").setLevel(logging.WARNING)
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 6)

  first = jax.random.normal(keys[0], (FEATURES, 16))
  second = jax.random.normal(keys[1], (16, CLASSES))
  change = jax.random.normal(keys[2], (FEATURES, 1)) @ jax.random.normal(keys[3], (1, 16))
  task_a = make_task(first, second)
  task_b = make_task(first + 0.8 * change, second)

  print(f"1. full training on task A for {args.base_steps} steps")
  model = Classifier(nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)
  train(model, optimizer, nnx.Param, task_a, keys[4], args.base_steps, args.batch_size)

  print(f"2. LoRA on task B for {args.steps} steps")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  lora_params = jaxlora.apply(
      nnx.to_pure_dict(params), rank=args.rank, alpha=args.alpha,
      targets=parse_targets(args.targets), kernel_axes=jaxlora.nnx_kernel_axes(model),
  )
  jaxlora.print_trainable_parameters(lora_params)
  adapted = jaxlora.nnx_model(graphdef, lora_params, rest)
  adapted.eval()

  eval_x, eval_labels = task_b(keys[5], 2048)
  evaluate = nnx.jit(cross_entropy)
  loss_before = float(evaluate(adapted, eval_x, eval_labels))
  optimizer = nnx.Optimizer(adapted, optax.adam(args.learning_rate), wrt=nnx.LoRAParam)
  train(adapted, optimizer, nnx.LoRAParam, task_b, keys[4], args.steps, args.batch_size)
  loss_after = float(evaluate(adapted, eval_x, eval_labels))
  logits = nnx.jit(lambda model, x: model(x))(adapted, eval_x)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == eval_labels))
  print(f"task B held-out loss: {loss_before:.4f} before, {loss_after:.4f} after; accuracy {accuracy:.3f}")

  print("3. merge and run the unmodified model")
  merged = jaxlora.merge(nnx.to_pure_dict(nnx.state(adapted, nnx.Param)))
  plain = nnx.merge(graphdef, merged, rest)
  plain.eval()
  difference = float(np.max(np.abs(plain(eval_x) - logits)))
  print(f"max |merged logits - adapted logits| = {difference:.2e}")
  return {
      "loss_before": loss_before,
      "loss_after": loss_after,
      "accuracy": accuracy,
      "merged_max_difference": difference,
  }


if __name__ == "__main__":
  main()

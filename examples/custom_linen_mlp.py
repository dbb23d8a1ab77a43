"""Fine-tune your own Flax Linen classifier with LoRA, without changing its code.

The model is an ordinary `nn.Module` of `nn.Dense` layers. The script:

  1. trains it fully on task A: label a Gaussian point by the largest output
     of a random linear "teacher";
  2. adds rank-r adapters with `jaxlora.apply` and trains only them, through
     `jaxlora.wrap(model.apply)`, on task B, whose teacher differs from A's by
     a low-rank change;
  3. merges the adapters with `jaxlora.merge` and checks that the unmodified
     model gives the adapted model's logits.

It runs in a few seconds on a CPU. `python examples/custom_linen_mlp.py --help`
lists the flags.
"""

import argparse
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora

logger = logging.getLogger("custom_linen_mlp")

FEATURES = 12
CLASSES = 5


class Classifier(nn.Module):
  """A two-hidden-layer MLP: inputs `[B, FEATURES]` to logits `[B, CLASSES]`."""

  hidden: int = 48

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(CLASSES, name="head")(x)


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
      "--targets", default="Dense_0,Dense_1",
      help="comma-separated module names, a regular expression over the dotted"
      " module path (Linen's Dense_0/kernel is Dense_0), or 'all-linear'.",
  )
  parser.add_argument("--learning-rate", type=float, default=1e-2, help="Adam learning rate.")
  parser.add_argument("--batch-size", type=int, default=256, help="examples per step.")
  parser.add_argument("--seed", type=int, default=0, help="seed for data and weights.")
  return parser.parse_args(argv)


def make_task(teacher):
  """Return `sample(key, n) -> (x [n, FEATURES], labels [n])` for a linear teacher."""

  def sample(key, n):
    x = jax.random.normal(key, (n, FEATURES))
    return x, jnp.argmax(x @ teacher, axis=-1)

  return sample


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(loss_fn, params, tx, sample, key, steps, batch_size):
  """Run `steps` Adam steps of `loss_fn(params, x, labels)`; return the new params."""

  @jax.jit
  def step(params, state, x, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  for index in range(steps):
    x, labels = sample(jax.random.fold_in(key, index), batch_size)
    params, state, loss = step(params, state, x, labels)
    if index % max(1, steps // 5) == 0 or index == steps - 1:
      logger.info("step %d: loss %.4f", index, loss)
  return params


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

  teacher_a = jax.random.normal(keys[0], (FEATURES, CLASSES))
  change = jax.random.normal(keys[1], (FEATURES, 1)) @ jax.random.normal(keys[2], (1, CLASSES))
  task_a = make_task(teacher_a)
  task_b = make_task(teacher_a + 1.5 * change)

  model = Classifier()
  base = model.init(keys[3], jnp.zeros((1, FEATURES)))["params"]

  print(f"1. full training on task A for {args.base_steps} steps")
  full_loss = lambda params, x, labels: cross_entropy(model.apply({"params": params}, x), labels)
  base = train(full_loss, base, optax.adam(args.learning_rate), task_a, keys[4], args.base_steps, args.batch_size)

  print(f"2. LoRA on task B for {args.steps} steps")
  params = jaxlora.apply(base, rank=args.rank, alpha=args.alpha, targets=parse_targets(args.targets))
  jaxlora.print_trainable_parameters(params)
  trainable, frozen = jaxlora.partition(params)
  apply_fn = jaxlora.wrap(model.apply)

  def lora_loss(trainable, x, labels):
    logits = apply_fn({"params": jaxlora.combine(trainable, frozen)}, x)
    return cross_entropy(logits, labels)

  eval_x, eval_labels = task_b(keys[5], 2048)
  evaluate = jax.jit(lora_loss)
  loss_before = float(evaluate(trainable, eval_x, eval_labels))
  trainable = train(lora_loss, trainable, optax.adam(args.learning_rate), task_b, keys[4], args.steps, args.batch_size)
  loss_after = float(evaluate(trainable, eval_x, eval_labels))
  params = jaxlora.combine(trainable, frozen)
  logits = jax.jit(apply_fn)({"params": params}, eval_x)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == eval_labels))
  print(f"task B held-out loss: {loss_before:.4f} before, {loss_after:.4f} after; accuracy {accuracy:.3f}")

  print("3. merge and run the unmodified model")
  merged = jaxlora.merge(params)
  difference = float(np.max(np.abs(jax.jit(model.apply)({"params": merged}, eval_x) - logits)))
  print(f"max |merged logits - adapted logits| = {difference:.2e}")
  return {
      "loss_before": loss_before,
      "loss_after": loss_after,
      "accuracy": accuracy,
      "merged_max_difference": difference,
  }


if __name__ == "__main__":
  main()

"""Tests of the optimizer, the schedule and the jitted training and eval steps."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import paths
from jaxlora import train
from jaxlora.models import Llama, LlamaConfig, init_params

from conftest import SMALL_LLAMA  # pylint: disable=g-bad-import-order

CONFIG = LlamaConfig(**SMALL_LLAMA)
TOKENS = 12


@pytest.fixture(scope="module")
def base_params():
  return init_params(CONFIG, jax.random.PRNGKey(0))


def adapted(base_params, targets=("q_proj", "v_proj")):
  """Return the base tree with rank-4 adapters whose B is random, not zero."""
  params = jaxlora.apply(base_params, rank=4, targets=targets, rng=jax.random.PRNGKey(1))
  rng = jax.random.PRNGKey(2)

  def randomize_b(path, leaf):
    if path[-2:] == ("lora", "b"):
      return 0.1 * jax.random.normal(jax.random.fold_in(rng, hash(path) % 1000), leaf.shape)
    return leaf

  return paths.map_with_path(randomize_b, params)


def make_batch(rows, seed=0, scored=None):
  """Return a `[rows, TOKENS]` batch; row i scores `scored[i]` tokens at its end."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CONFIG.vocab_size, size=(rows, TOKENS + 1))
  loss_mask = np.ones((rows, TOKENS), np.float32)
  if scored is not None:
    for row, count in enumerate(scored):
      loss_mask[row, : TOKENS - count] = 0.0
  return {
      "input_ids": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "loss_mask": loss_mask,
      "attention_mask": np.ones((rows, TOKENS), np.int32),
  }


def as_step_batch(batch, grad_accum_steps):
  """Reshape a `[A * B, T]` batch into `[A, B, T]`."""
  return {
      key: value.reshape(grad_accum_steps, -1, *value.shape[1:])
      for key, value in batch.items()
  }


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)


def run_steps(model, params, tx, *, steps, trainable_mask=None, grad_accum_steps=1):
  """Run `steps` steps on fresh batches; return the joined tree and the state."""
  trainable, frozen = jaxlora.partition(params, trainable_mask=trainable_mask)
  trainable = copy_tree(trainable)
  opt_state = tx.init(trainable)
  step = train.make_train_step(model, tx, grad_accum_steps=grad_accum_steps)
  for index in range(steps):
    batch = as_step_batch(make_batch(2 * grad_accum_steps, seed=index), grad_accum_steps)
    trainable, opt_state, _ = step(
        trainable, frozen, opt_state, batch, jax.random.PRNGKey(index)
    )
  return jaxlora.combine(trainable, frozen), opt_state


def standard_optimizer(learning_rate=1e-2, steps=10):
  schedule = train.learning_rate_schedule(
      learning_rate, steps=steps, warmup_steps=0, min_lr_ratio=0.1
  )
  return train.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0), schedule


def test_schedule_formula():
  peak, steps, warmup, ratio = 3e-4, 100, 10, 0.2
  schedule = train.learning_rate_schedule(
      peak, steps=steps, warmup_steps=warmup, min_lr_ratio=ratio
  )

  def cosine(step):
    progress = (step - warmup) / (steps - warmup)
    return ratio * peak + (1 - ratio) * peak * 0.5 * (1 + math.cos(math.pi * progress))

  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(peak * 5 / warmup, rel=1e-6)
  assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
  assert float(schedule(40)) == pytest.approx(cosine(40), rel=1e-5)
  assert float(schedule(steps)) == pytest.approx(ratio * peak, rel=1e-5)
  assert float(schedule(steps + 50)) == pytest.approx(ratio * peak, rel=1e-5)


def test_schedule_edge_warmups():
  no_warmup = train.learning_rate_schedule(1.0, steps=10, warmup_steps=0, min_lr_ratio=0.0)
  assert float(no_warmup(0)) == pytest.approx(1.0)
  assert float(no_warmup(10)) == pytest.approx(0.0, abs=1e-7)

  all_warmup = train.learning_rate_schedule(1.0, steps=10, warmup_steps=10, min_lr_ratio=0.0)
  assert float(all_warmup(5)) == pytest.approx(0.5)
  assert float(all_warmup(10)) == pytest.approx(1.0)
  assert float(all_warmup(20)) == pytest.approx(1.0)


def test_decay_mask_matrices_only(base_params):
  params = jaxlora.apply(base_params, rank=4)
  mask = dict(paths.iter_leaves(train.decay_mask(params)))
  layers = ("model", "layers")

  assert mask[layers + ("self_attn", "q_proj", "kernel")]
  assert mask[layers + ("self_attn", "q_proj", "lora", "a")]
  assert mask[layers + ("self_attn", "q_proj", "lora", "b")]
  assert mask[("model", "embed_tokens", "embedding")]
  assert not mask[layers + ("self_attn", "q_proj", "lora", "scale")]
  assert not mask[layers + ("input_layernorm", "scale")]
  assert not mask[("model", "norm", "scale")]


def test_adamw_decays_matrices_not_norms():
  params = {
      "mlp": {"up_proj": {"kernel": jnp.full((3, 5), 2.0)}},
      "input_layernorm": {"scale": jnp.full((2, 3), 2.0)},
  }
  tx = train.adamw(lambda count: 0.5, weight_decay=0.1, max_grad_norm=1.0)
  zero_grads = jax.tree.map(jnp.zeros_like, params)

  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)

  np.testing.assert_allclose(new["mlp"]["up_proj"]["kernel"], 2.0 * (1 - 0.5 * 0.1), rtol=1e-6)
  np.testing.assert_array_equal(new["input_layernorm"]["scale"], params["input_layernorm"]["scale"])


def test_cross_entropy_masked_mean():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
  targets = jnp.array([[1, 2, -100], [4, 0, 3]])
  loss_mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])

  with jax.numpy_rank_promotion("raise"):
    loss_sum, count = train.token_cross_entropy(logits, targets, loss_mask)

  log_probs = jax.nn.log_softmax(logits)
  expected = -(log_probs[0, 0, 1] + log_probs[0, 1, 2] + log_probs[1, 1, 0] + log_probs[1, 2, 3])
  assert float(count) == 4.0
  np.testing.assert_allclose(loss_sum, expected, rtol=1e-6)


@pytest.fixture(scope="module")
def lora_run(base_params):
  """Three LoRA steps; returns the trees before and after, the state and metrics."""
  params = adapted(base_params)
  before = jax.tree.map(np.asarray, params)
  tx, schedule = standard_optimizer(learning_rate=1e-2, steps=10)
  trainable, frozen = jaxlora.partition(params)
  trainable = copy_tree(trainable)
  opt_state = tx.init(trainable)
  step = train.make_train_step(Llama(CONFIG), tx, schedule=schedule)

  history = []
  for index in range(3):
    batch = as_step_batch(make_batch(2, seed=index, scored=(5, 7)), 1)
    trainable, opt_state, metrics = step(
        trainable, frozen, opt_state, batch, jax.random.PRNGKey(index)
    )
    history.append(jax.device_get(metrics))
  return {
      "before": before,
      "after": jaxlora.combine(trainable, frozen),
      "frozen": frozen,
      "trainable": trainable,
      "opt_state": opt_state,
      "history": history,
      "schedule": schedule,
  }


def test_step_updates_only_adapters(lora_run):
  before = dict(paths.iter_leaves(lora_run["before"]))

  for path, leaf in paths.iter_leaves(lora_run["after"]):
    name = paths.module_name(path)
    if jaxlora.is_adapter_weight(path):
      assert not np.array_equal(leaf, before[path]), f"{name} did not change"
    else:
      assert np.array_equal(leaf, before[path]), f"frozen {name} changed"


def test_step_keeps_frozen_arrays(lora_run):
  after = dict(paths.iter_leaves(lora_run["after"]))

  for path, leaf in paths.iter_leaves(lora_run["frozen"]):
    assert after[path] is leaf, paths.module_name(path)


def test_optimizer_state_trainable_only(lora_run):
  trainable_paths = {path for path, _ in paths.iter_leaves(lora_run["trainable"])}
  frozen_shapes = {
      leaf.shape for _, leaf in paths.iter_leaves(lora_run["frozen"]) if leaf.ndim >= 2
  }

  state_arrays = []
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(lora_run["opt_state"]):
    if leaf.ndim == 0:
      continue
    dict_keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
    state_arrays.append(dict_keys)
    assert dict_keys in trainable_paths, f"state for {paths.module_name(dict_keys)}"
    assert leaf.shape not in frozen_shapes, f"{paths.module_name(dict_keys)} {leaf.shape}"

  # Adam keeps two moments per trainable leaf, and nothing else of that size.
  assert len(state_arrays) == 2 * len(trainable_paths)


def test_step_reports_metrics(lora_run):
  for index, metrics in enumerate(lora_run["history"]):
    expected_lr = float(lora_run["schedule"](index))
    assert float(metrics["lr"]) == pytest.approx(expected_lr, rel=1e-6)

  metrics = lora_run["history"][-1]
  assert set(metrics) == {"loss", "grad_norm", "scored_tokens", "real_tokens", "lr"}
  assert float(metrics["scored_tokens"]) == 12.0
  assert float(metrics["real_tokens"]) == 2 * TOKENS
  assert 0 < float(metrics["loss"]) < 10
  assert float(metrics["grad_norm"]) > 0


def test_grad_accum_matches_big_batch(base_params):
  params = adapted(base_params)
  model = Llama(CONFIG)
  # Rows score 2, 3, 11 and 12 tokens: a mean of per-micro-batch means would
  # weigh the two halves equally and differ from the token mean.
  batch = make_batch(4, seed=3, scored=(2, 3, 11, 12))
  tx = optax.sgd(0.5)
  results = {}

  for accum in (1, 2):
    trainable, frozen = jaxlora.partition(params)
    trainable = copy_tree(trainable)
    step = train.make_train_step(model, tx, grad_accum_steps=accum)
    trainable, _, metrics = step(
        trainable, frozen, tx.init(trainable), as_step_batch(batch, accum),
        jax.random.PRNGKey(0),
    )
    results[accum] = (trainable, metrics)

  (one, one_metrics), (two, two_metrics) = results[1], results[2]
  assert float(one_metrics["scored_tokens"]) == float(two_metrics["scored_tokens"]) == 28.0
  np.testing.assert_allclose(one_metrics["loss"], two_metrics["loss"], atol=1e-5)
  np.testing.assert_allclose(one_metrics["grad_norm"], two_metrics["grad_norm"], rtol=1e-5)
  for (path, a), (_, b) in zip(paths.iter_leaves(one), paths.iter_leaves(two)):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=paths.module_name(path))
  start = dict(paths.iter_leaves(jaxlora.partition(params)[0]))
  for path, leaf in paths.iter_leaves(one):
    assert not np.array_equal(leaf, start[path]), f"{paths.module_name(path)} did not change"


def test_full_mode_changes_every_leaf(base_params):
  params = base_params
  mask = jaxlora.full_mask(params)
  trainable, frozen = jaxlora.partition(params, trainable_mask=mask)
  assert frozen == {}
  before = jax.tree.map(np.asarray, params)
  tx, _ = standard_optimizer()

  after, _ = run_steps(Llama(CONFIG), params, tx, steps=2, trainable_mask=mask)

  for (path, old), (_, new) in zip(paths.iter_leaves(before), paths.iter_leaves(after)):
    assert not np.array_equal(old, new), f"{paths.module_name(path)} did not change"


def test_step_with_dropout_runs(base_params):
  params = adapted(base_params)
  model = Llama(CONFIG, lora_dropout=0.5)
  tx, _ = standard_optimizer()
  trainable, frozen = jaxlora.partition(params)
  step = train.make_train_step(model, tx)
  batch = as_step_batch(make_batch(2), 1)

  losses = []
  for seed in (0, 1):
    state = copy_tree(trainable)
    _, _, metrics = step(state, frozen, tx.init(state), batch, jax.random.PRNGKey(seed))
    losses.append(float(metrics["loss"]))

  # Different dropout keys drop different adapter inputs.
  assert losses[0] != losses[1]


def test_step_rejects_wrong_batch_shape(base_params):
  params = adapted(base_params)
  tx, _ = standard_optimizer()
  trainable, frozen = jaxlora.partition(params)
  step = train.make_train_step(Llama(CONFIG), tx, grad_accum_steps=2)

  with pytest.raises(ValueError, match=r"\[A, B, T\] with A = grad_accum_steps = 2"):
    step(trainable, frozen, tx.init(trainable), make_batch(2), jax.random.PRNGKey(0))


def test_evaluate_weights_by_tokens(base_params):
  params = adapted(base_params)
  eval_step = train.make_eval_step(Llama(CONFIG))
  first = make_batch(2, seed=1, scored=(1, 2))
  second = make_batch(2, seed=2, scored=(12, 12))
  joined = {key: np.concatenate([first[key], second[key]]) for key in first}

  loss = train.evaluate(eval_step, params, [first, second])

  loss_sum, count = eval_step(params, joined)
  assert float(count) == 27.0
  assert loss == pytest.approx(float(loss_sum) / 27.0, rel=1e-5)


def test_evaluate_rejects_no_tokens(base_params):
  eval_step = train.make_eval_step(Llama(CONFIG))
  with pytest.raises(ValueError, match="no scored token"):
    train.evaluate(eval_step, base_params, [make_batch(2, scored=(0, 0))])


def test_stack_micro_batches_pads():
  short = make_batch(2)
  short = {key: value[:, :7] for key, value in short.items()}
  long = make_batch(2, seed=1)

  stacked = train.stack_micro_batches([short, long])

  assert stacked["input_ids"].shape == (2, 2, TOKENS)
  assert stacked["attention_mask"][0, :, 7:].sum() == 0
  assert stacked["loss_mask"][0, :, 7:].sum() == 0
  np.testing.assert_array_equal(stacked["targets"][1], long["targets"])

"""Tests of `train.checkpoint`: atomic saves, metadata, pruning and leftovers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.train import checkpoint

TRAINABLE = {"layer": {"lora": {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3, 5))}}}
OPT_STATE = {"count": jnp.asarray(7, jnp.int32), "mu": {"a": jnp.full((2, 3), 0.5)}}


def test_save_restore_round_trip(tmp_path):
  metadata = {"mode": "lora", "rng": [0, 42], "nested": {"rank": 4, "pattern": None}}

  path = checkpoint.save(tmp_path, 12, TRAINABLE, OPT_STATE, metadata=metadata)

  assert path == checkpoint.step_path(tmp_path, 12)
  assert path.name == "step_00000012"
  step, trainable, opt_state = checkpoint.restore(tmp_path, trainable=TRAINABLE, opt_state=OPT_STATE)
  assert step == 12
  np.testing.assert_array_equal(trainable["layer"]["lora"]["a"], TRAINABLE["layer"]["lora"]["a"])
  np.testing.assert_array_equal(trainable["layer"]["lora"]["b"], TRAINABLE["layer"]["lora"]["b"])
  assert int(opt_state["count"]) == 7
  np.testing.assert_array_equal(opt_state["mu"]["a"], OPT_STATE["mu"]["a"])
  assert checkpoint.read_metadata(tmp_path) == metadata
  assert checkpoint.read_metadata(tmp_path, 12) == metadata


def test_restore_without_opt_state(tmp_path):
  checkpoint.save(tmp_path, 3, TRAINABLE, OPT_STATE)

  step, trainable, opt_state = checkpoint.restore(tmp_path, trainable=TRAINABLE)

  assert step == 3
  assert opt_state is None
  np.testing.assert_array_equal(trainable["layer"]["lora"]["a"], TRAINABLE["layer"]["lora"]["a"])
  assert checkpoint.read_metadata(tmp_path) == {}


def test_save_keeps_last_checkpoints(tmp_path):
  for step in range(1, 6):
    checkpoint.save(tmp_path, step, TRAINABLE, OPT_STATE, keep=2)

  assert checkpoint.saved_steps(tmp_path) == [4, 5]
  assert sorted(child.name for child in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]


def test_save_keep_zero_keeps_all(tmp_path):
  for step in (2, 4, 6):
    checkpoint.save(tmp_path, step, TRAINABLE, OPT_STATE, keep=0)

  assert checkpoint.saved_steps(tmp_path) == [2, 4, 6]
  assert checkpoint.latest_step(tmp_path) == 6


def test_interrupted_commit_leaves_previous(tmp_path, monkeypatch):
  checkpoint.save(tmp_path, 2, TRAINABLE, OPT_STATE, metadata={"step": 2})

  def interrupted(partial, path):
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint, "_commit", interrupted)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(tmp_path, 4, TRAINABLE, OPT_STATE, metadata={"step": 4})

  assert (tmp_path / "step_00000004.partial").is_dir()
  assert not (tmp_path / "step_00000004").exists()
  assert checkpoint.latest_step(tmp_path) == 2
  assert checkpoint.read_metadata(tmp_path) == {"step": 2}
  step, _, _ = checkpoint.restore(tmp_path, trainable=TRAINABLE, opt_state=OPT_STATE)
  assert step == 2


def test_save_replaces_partial_of_same_step(tmp_path):
  stale = tmp_path / "step_00000004.partial"
  stale.mkdir()
  (stale / "junk").write_text("left by a killed save")

  checkpoint.save(tmp_path, 4, TRAINABLE, OPT_STATE, metadata={"step": 4})

  assert sorted(child.name for child in tmp_path.iterdir()) == ["step_00000004"]
  assert checkpoint.read_metadata(tmp_path) == {"step": 4}


def test_remove_leftovers(tmp_path):
  checkpoint.save(tmp_path, 2, TRAINABLE, OPT_STATE)
  leftovers = [
      "step_00000004.partial",
      "step_00000004.partial.orbax-checkpoint-tmp",
      "step_00000001.deleted",
  ]
  for name in leftovers:
    (tmp_path / name).mkdir()
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  (tmp_path / "step_extra").mkdir()

  assert checkpoint.saved_steps(tmp_path) == [2]
  removed = checkpoint.remove_leftovers(tmp_path)

  assert removed == sorted(leftovers)
  assert sorted(child.name for child in tmp_path.iterdir()) == ["notes.txt", "step_00000002", "step_extra"]
  assert checkpoint.remove_leftovers(tmp_path / "missing") == []


def test_save_rejects_bad_input(tmp_path):
  checkpoint.save(tmp_path, 5, TRAINABLE, OPT_STATE)

  with pytest.raises(ValueError, match="step_00000005 already contains a checkpoint"):
    checkpoint.save(tmp_path, 5, TRAINABLE, OPT_STATE)
  with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
    checkpoint.save(tmp_path, -1, TRAINABLE, OPT_STATE)
  with pytest.raises(ValueError, match="keep must be an integer >= 0, got 1.5"):
    checkpoint.save(tmp_path, 6, TRAINABLE, OPT_STATE, keep=1.5)
  with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
    checkpoint.save(tmp_path, 6, TRAINABLE, OPT_STATE, metadata={"loss": float("nan")})
  with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
    checkpoint.save(tmp_path, 6, TRAINABLE, OPT_STATE, metadata={"shape": jnp.ones(2)})
  assert checkpoint.saved_steps(tmp_path) == [5]


def test_restore_rejects_bad_input(tmp_path):
  checkpoint.save(tmp_path, 5, TRAINABLE, OPT_STATE)

  with pytest.raises(ValueError, match="No checkpoint of step 4 in .*; the latest is 5"):
    checkpoint.restore(tmp_path, trainable=TRAINABLE, opt_state=OPT_STATE, step=4)
  with pytest.raises(ValueError, match="contains no checkpoint"):
    checkpoint.restore(tmp_path / "none", trainable=TRAINABLE, opt_state=OPT_STATE)
  with pytest.raises(ValueError, match="does not match the target trees"):
    checkpoint.restore(tmp_path, trainable={"other": jnp.ones((2, 3))}, opt_state=OPT_STATE)
  with pytest.raises(ValueError, match="contains no checkpoint"):
    checkpoint.read_metadata(tmp_path / "none")


def test_read_metadata_missing_item(tmp_path):
  (tmp_path / "step_00000003").mkdir()

  with pytest.raises(ValueError, match="step_00000003 has no metadata item"):
    checkpoint.read_metadata(tmp_path)

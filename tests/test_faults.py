"""Faults the trainer must survive without losing or hiding anything (the fast cases; benchmarks/faults.py runs the
full sweep): non-finite steps, interrupted and corrupt checkpoints, a full disk, bad configurations."""
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import tiny_config
from xsample_jax import train


def saved_state(workdir, step):
  mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",))
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  return jax.tree.map(np.asarray, state)


def test_a_non_finite_step_stops_the_run_naming_it_and_the_checkpoints_stay_good(tmp_path):
  config = tiny_config(total_steps=6, checkpoint_every_steps=2, **{"debug.inject_nonfinite_steps": (3,)})
  with pytest.raises(train.NonFiniteError, match="step 3: the loss or a gradient is NaN/Inf"):
    train.train_and_evaluate(config, str(tmp_path))
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints")
  assert mngr.all_steps() == [2]  # nothing saved after the bad step; the last good checkpoint restores
  state = saved_state(tmp_path, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))
  # The same workdir, told to skip such steps, resumes from step 2 and finishes.
  config.nonfinite = "skip"
  out = train.train_and_evaluate(config, str(tmp_path))
  assert out["step"] == 6 and np.isfinite(out["loss"]) and out["nonfinite_steps"] == 1


def test_a_skipped_step_changes_nothing_but_the_step_and_the_count(tmp_path):
  config = tiny_config(total_steps=5, checkpoint_every_steps=1, keep_checkpoints=5, nonfinite="skip",
                       **{"debug.inject_nonfinite_steps": (3,)})
  out = train.train_and_evaluate(config, str(tmp_path))
  assert out["step"] == 5 and np.isfinite(out["loss"]) and out["nonfinite_steps"] == 1
  before, after = saved_state(tmp_path, 2), saved_state(tmp_path, 3)
  assert int(before["optimizer"]["step"]["value"]) == 2 and int(after["optimizer"]["step"]["value"]) == 3
  assert int(before["nonfinite_steps"]["value"]) == 0 and int(after["nonfinite_steps"]["value"]) == 1
  for part in ("model", "optimizer"):  # parameters, BatchNorm statistics and optimizer state untouched
    flat_b = jax.tree_util.tree_flatten_with_path(before[part])[0]
    flat_a = dict(jax.tree_util.tree_flatten_with_path(after[part])[0])
    for path, x in flat_b:
      if "step" not in jax.tree_util.keystr(path):
        np.testing.assert_array_equal(x, flat_a[path], err_msg=jax.tree_util.keystr(path))
  # The next step trains again: step 4 changes the parameters.
  later = saved_state(tmp_path, 4)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after["model"]), jax.tree.leaves(later["model"])))


def test_nonfinite_is_checked():
  with pytest.raises(train.ConfigError, match="config.nonfinite: must be 'stop' or 'skip'"):
    train.check_config(tiny_config(nonfinite="ignore"))

"""End-to-end runs of the entry point as a user runs it: deterministic, and resumable bit for bit after SIGTERM or
kill -9. Each run is a real `python -m xsample_jax.main` process on 8 fake CPU devices."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
# The smoke config's `tiny` form: 20 steps in seconds; batch 64 keeps a step long enough to interrupt.
ARGS = ["--config", "configs/smoke.py:tiny"]


def start(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "xsample_jax.main", *ARGS, f"--workdir={workdir}", *extra],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(workdir, *extra):
  proc = start(workdir, *extra)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return out


def losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def final_state(workdir):
  mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",))
  assert mngr.latest_step() == STEPS
  state = mngr.restore(STEPS, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  return jax.tree.map(np.asarray, state)


def wait_for(proc, condition, what):
  deadline = time.time() + 300
  while not condition():
    assert proc.poll() is None, f"the run ended before {what}: {proc.stdout.read()[-3000:]}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def assert_same_run(a, b):
  la, lb = losses(a), losses(b)
  assert sorted(la) == list(range(1, STEPS + 1)) and la == lb  # every step, bit for bit
  sa, sb = final_state(a), final_state(b)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  out = run(workdir)
  assert f"done: {STEPS} steps" in out
  return workdir


def test_a_run_is_deterministic_for_a_seed(reference, tmp_path):
  run(tmp_path)
  assert_same_run(reference, tmp_path)
  first = losses(reference)
  assert first[STEPS] < first[1]


def test_sigterm_saves_and_the_rerun_continues_bit_for_bit(reference, tmp_path):
  # Logging every 7 steps: the steps after the last log must still reach metrics.jsonl when SIGTERM stops the run.
  every7 = "--config.log_every_steps=7"
  # Both runs share an XLA compilation cache: the rerun loads its programs from it and must still continue exactly.
  cache = f"--config.xla_cache_dir={tmp_path / 'xla_cache'}"
  proc = start(tmp_path, every7, cache)
  wait_for(proc, lambda: (tmp_path / "metrics.jsonl").exists() and max(losses(tmp_path), default=0) >= 10,
           "step 10")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted at step" in out, out[-3000:]
  stopped = max(losses(tmp_path))
  assert stopped < STEPS
  assert sorted(losses(tmp_path)) == list(range(1, stopped + 1))
  assert ocp.CheckpointManager(tmp_path / "checkpoints").latest_step() == stopped  # saved where it stopped
  assert any(p.name.startswith("jit_train_step") for p in (tmp_path / "xla_cache").iterdir())
  run(tmp_path, every7, cache)
  assert_same_run(reference, tmp_path)


def test_kill_9_after_a_checkpoint_and_the_rerun_continues_bit_for_bit(reference, tmp_path):
  proc = start(tmp_path)
  wait_for(proc, lambda: (tmp_path / "checkpoints" / "10").is_dir(), "the step-10 checkpoint")
  proc.kill()
  proc.communicate()
  logged = max(losses(tmp_path))
  assert logged < STEPS  # the run really died before the end
  run(tmp_path)
  assert_same_run(reference, tmp_path)


def test_config_flag_errors_name_the_key(tmp_path):
  for flag, message in [("--config.totl_steps=5", "totl_steps"), ("--config.total_steps=many", "total_steps"),
                        ("--config.loss.temperature=0", "config.loss.temperature: must be > 0")]:
    proc = start(tmp_path / "run", flag)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and message in out, out[-2000:]
    assert not (tmp_path / "run").exists()

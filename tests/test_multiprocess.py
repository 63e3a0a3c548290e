"""Real multi-process runs on this machine: launch/local.sh starts N processes of the same entry point, joined by
jax.distributed on 127.0.0.1 with CPU devices (gloo collectives) — the multi-controller path of a TPU pod."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / "launch" / "local.sh")
STEPS = 20
# The smoke config's `tiny` form (20 steps in seconds), checkpoints at steps 10 and 20.
ARGS = ["--config", "configs/smoke.py:tiny", "--config.checkpoint_every_steps=10"]


def launch(processes, devices, *args, env=None, **kw):
  env = dict(os.environ, **(env or {}))
  env.pop("XLA_FLAGS", None)  # conftest's 8 devices must not leak into the processes' own device counts
  return subprocess.Popen([LAUNCH, str(processes), str(devices), "--", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]
  return out


def train(processes, devices, workdir, *extra):
  return finish(launch(processes, devices, *ARGS, f"--workdir={workdir}", *extra))


def losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory):
  """The reference: one process with 8 devices, a plain run of the entry point (no jax.distributed)."""
  workdir = tmp_path_factory.mktemp("1x8")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "xsample_jax.main", *ARGS, f"--workdir={workdir}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return workdir


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_on_one(one_by_eight, tmp_path):
  two = tmp_path / "2x4"
  out = train(2, 4, two)
  assert f"[0] done: {STEPS} steps" in out and "[1] done" not in out  # process 0 speaks for the run
  reference, got = losses(one_by_eight), losses(two)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(got)], rtol=0, atol=1e-5)
  saved = sorted(p.name for p in (two / "checkpoints" / "10" / "data").glob("process_*.json"))
  assert saved == ["process_0-of-2.json", "process_1-of-2.json"]  # each process saved its own iterator

  # The 2-process run as if it had stopped after its step-10 checkpoint, resumed by one process of 8 devices.
  resumed = tmp_path / "resumed"
  shutil.copytree(two, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  out = train(1, 8, resumed)
  assert "this run has 1 process(es): the data stream continues at global batch 10" in out
  after = losses(resumed)
  assert sorted(after) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([after[s] for s in range(11, STEPS + 1)], [reference[s] for s in range(11, STEPS + 1)],
                             rtol=0, atol=1e-5)


def _wait_for_steps(proc, workdir, steps, timeout=300):
  deadline = time.time() + timeout
  path = workdir / "metrics.jsonl"
  while not (path.exists() and len(path.read_text().splitlines()) >= steps):
    assert proc.poll() is None, f"the run ended early: {proc.stdout.read()[-4000:]}"
    assert time.time() < deadline, "timed out waiting for the run's first steps"
    time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_one_agreed_step_and_the_rerun_finishes(one_by_eight, tmp_path):
  workdir = tmp_path / "run"
  proc = launch(2, 4, *ARGS, f"--workdir={workdir}")
  _wait_for_steps(proc, workdir, 3)
  proc.send_signal(signal.SIGTERM)  # as a TPU VM's maintenance event reaches every host
  out = finish(proc, timeout=120)
  assert "[0] preempted at step" in out
  step = int(out.split("[0] preempted at step ")[1].split(":")[0])
  assert 3 <= step < STEPS
  data = workdir / "checkpoints" / str(step) / "data"
  assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  train(2, 4, workdir)  # the same command resumes
  got, reference = losses(workdir), losses(one_by_eight)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in got], [reference[s] for s in got], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_a_killed_process_makes_the_other_exit_with_an_error_not_hang(victim, tmp_path):
  """As on a pod, without the launcher: two processes that only share the coordinator (process 0's)."""
  workdir = tmp_path / "run"
  args = [*ARGS, "--config.total_steps=1000"]
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-m", "xsample_jax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                                     JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  survivor = procs[1 - victim]
  try:
    _wait_for_steps(survivor, workdir, 3)
    procs[victim].kill()
    start = time.time()
    out, _ = survivor.communicate(timeout=120)
    took = time.time() - start
  finally:
    for p in procs:
      p.kill()
  assert survivor.returncode != 0
  assert took < 60, f"the surviving process took {took:.0f} s to stop"
  # Whichever notices first: a collective with the dead process fails (our message), or jax's coordination
  # service reports the dead task (the coordinator gone, or a missed heartbeat) and ends the process.
  ours = f"error: process {1 - victim} of 2 stops" in out and "another one failed or was killed" in out
  assert ours or "another task died" in out, out[-3000:]


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_the_launcher_takes_the_others_down_when_one_fails(tmp_path):
  # Process 1 exits at once with status 3; process 0 would wait for it at start-up for minutes.
  python = tmp_path / "python"
  python.write_text(f'#!/usr/bin/env bash\n[[ $JAX_PROCESS_ID == 1 ]] && exit 3\nexec {sys.executable} "$@"\n')
  python.chmod(0o755)
  start = time.time()
  proc = launch(2, 1, *ARGS, f"--workdir={tmp_path / 'run'}", env={"PYTHON": str(python)})
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 3, out
  assert "a process exited with status 3; stopping the others" in out
  assert time.time() - start < 30


def test_a_group_that_never_forms_ends_with_a_message(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  out = subprocess.run([sys.executable, "-m", "xsample_jax.main", *ARGS, f"--workdir={tmp_path / 'run'}",
                        "--coordinator_timeout_s=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert "error: process 1 of 2 could not join the run's processes at 127.0.0.1:" in out.stderr
  assert not (tmp_path / "run").exists()


def test_the_launcher_checks_its_arguments():
  for args in (["2"], ["two", "4", "--"], ["2", "0", "--"], ["2", "4", "--config"]):
    out = subprocess.run([LAUNCH, *args, "x"], capture_output=True, text=True)
    assert out.returncode == 2, (args, out.stderr)


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
  """The data path in 2 real processes x 4 devices (tests/multiprocess_worker.py)."""
  out_dir = tmp_path_factory.mktemp("mp_data")
  folder = tmp_path_factory.mktemp("folder")
  for c, name in enumerate(["golden_retriever", "tabby_cat"]):
    (folder / name).mkdir()
    for k in range(2):
      img = np.full((12, 12, 3), 40 * c + 10 * k, np.uint8)
      (folder / name / f"{k}.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())
  finish(launch(2, 4, str(out_dir), str(folder), env={"ENTRY": "tests.multiprocess_worker"}), timeout=300)
  return out_dir, [dict(np.load(out_dir / f"process_{i}.npz")) for i in range(2)]


def test_two_processes_read_every_example_once_per_epoch(pipeline_runs):
  from multiprocess_worker import TRAIN_EXAMPLES
  _, runs = pipeline_runs
  ids = [r["local_train_ids"][0::2] for r in runs]  # both views of an image share its id
  assert len(ids[0]) == len(ids[1]) == TRAIN_EXAMPLES // 2
  assert not set(ids[0]) & set(ids[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(TRAIN_EXAMPLES))


def test_the_assembled_global_batches_equal_the_single_process_batches(pipeline_runs, mesh):
  from multiprocess_worker import eval_batches, train_batches
  _, runs = pipeline_runs
  for prefix, batches in (("train", train_batches(mesh)), ("eval", eval_batches(mesh))):
    single = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
    for run in runs:  # every process gathered the same global arrays
      fields = {k[len(prefix) + 1:] for k in run if k.startswith(prefix + "_")}
      assert fields == set(single[0])
      for k in fields:
        np.testing.assert_array_equal(run[f"{prefix}_{k}"], np.stack([b[k] for b in single]), err_msg=k)
  assert runs[0]["eval_valid"].sum() == 21  # one pass, the last batch padded


def test_process_zero_writes_the_shared_cache_and_the_others_read_it(pipeline_runs):
  out_dir, runs = pipeline_runs
  assert (out_dir / "order").read_text() == "0\n1\n"
  assert len(list((out_dir / "cache").glob("caption_emb_*.npy"))) == 1
  assert not list((out_dir / "cache").glob("*.tmp.*"))
  np.testing.assert_array_equal(runs[0]["table"], runs[1]["table"])
  assert runs[0]["table"].shape == (2, 384)

"""The fault sweep: every fault the trainer must survive, injected into real runs of the entry point, with outcomes
as counts. (tests/test_faults.py and tests/test_train_e2e.py hold one fast case of each.)

  python -m benchmarks.faults [--kills 5] [--sigterms 3] [--seed 0] [--only kill9,sigterm,...]

Every run is `python -m xsample_jax.main --config configs/smoke.py:tiny` (20 steps, 8 fake CPU devices). Faults:
  kill9       kill -9 at random moments (the first ones while a checkpoint is being written), then the same command
              again: the final parameters must equal an uninterrupted run's bit for bit.
  sigterm     SIGTERM at a random step: exit 0 within a bound, a checkpoint at that step, the rerun bit-exact.
  corrupt     1% corrupt records (truncated JPEG, empty caption, wrong embedding width, non-UTF-8 caption) and one
              truncated shard file: the run completes, every one counted and named; strict stops naming one.
  nonfinite   NaN loss and gradients injected at a step: 'stop' exits 1 naming it with the checkpoints intact;
              'skip' completes and counts it.
  config      bad configurations: each exits 1 naming the problem, before anything is compiled (JAX_LOG_COMPILES
              shows nothing), the workdir unchanged.
  damaged     the newest checkpoint's array files overwritten: the rerun sets it aside and resumes from the one
              before, ending bit-exact.
  diskfull    the workdir on a 3.5 MB tmpfs (user namespace): a clear error naming the full disk; the last
              checkpoint resumes elsewhere.
Prints a table (fault | tried | as required | outcome) and one JSON line per fault.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# This process restores the runs' checkpoints, which name 8 devices: the same fake CPU devices as the runs.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
ARGS = ["--config", "configs/smoke.py:tiny"]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def start(workdir, *extra, env=None):
  return subprocess.Popen([sys.executable, "-m", "xsample_jax.main", *ARGS, f"--workdir={workdir}", *extra],
                          cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(workdir, *extra, env=None) -> tuple[int, str]:
  proc = start(workdir, *extra, env=env)
  out, _ = proc.communicate(timeout=900)
  return proc.returncode, out


def logged_steps(workdir) -> int:
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except (ValueError, KeyError):
      pass
  return max(steps, default=0)


def final_params(workdir) -> list[np.ndarray]:
  import orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(Path(workdir) / "checkpoints", item_names=("state",))
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def same(a, b) -> bool:
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def kill9(tmp: Path, reference, kills: int, rng: random.Random) -> dict:
  outcomes = {"bit-exact": 0, "divergent": 0, "killed during a save": 0, "rerun failed": 0}
  for trial in range(kills):
    workdir = tmp / f"kill9_{trial}"
    proc = start(workdir)
    during_save = trial < max(1, kills // 2)
    target = rng.randint(1, STEPS - 2)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
      ckpt = workdir / "checkpoints"
      if during_save:
        if ckpt.exists() and any("tmp" in p.name for p in ckpt.iterdir()):
          break
      elif logged_steps(workdir) >= target:
        time.sleep(rng.uniform(0, 0.3))  # somewhere inside the next step
        break
      time.sleep(0.002)
    saving = (workdir / "checkpoints").exists() and any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())
    proc.kill()
    proc.communicate()
    outcomes["killed during a save"] += saving
    rc, out = run(workdir)
    if rc != 0:
      outcomes["rerun failed"] += 1
      print(out[-2000:], file=sys.stderr)
      continue
    outcomes["bit-exact" if same(final_params(workdir), reference) else "divergent"] += 1
  return {"fault": "kill -9 (random moments, some during a save)", "tried": kills,
          "as required": outcomes["bit-exact"], "outcome": outcomes}


def sigterm(tmp: Path, reference, n: int, rng: random.Random) -> dict:
  outcomes = {"exit 0": 0, "saved at the stop": 0, "bit-exact after rerun": 0}
  seconds = []
  for trial in range(n):
    workdir = tmp / f"sigterm_{trial}"
    proc = start(workdir)
    target = rng.randint(2, STEPS - 3)
    while proc.poll() is None and logged_steps(workdir) < target:
      time.sleep(0.01)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    seconds.append(time.time() - t0)
    outcomes["exit 0"] += proc.returncode == 0
    m = re.search(r"preempted at step (\d+)", out)
    if m and (workdir / "checkpoints" / m.group(1)).is_dir():
      outcomes["saved at the stop"] += 1
    rc, _ = run(workdir)
    outcomes["bit-exact after rerun"] += rc == 0 and same(final_params(workdir), reference)
  outcomes["max seconds to exit"] = round(max(seconds), 2)
  return {"fault": "SIGTERM (random steps)", "tried": n, "as required": outcomes["bit-exact after rerun"],
          "outcome": outcomes}


def _corrupt_shards(directory: Path, n: int = 1000) -> tuple[dict, str]:
  """n records in shards of 50: 1% corrupt (four kinds), and one shard file truncated. -> ({key: reason}, shard)."""
  import cv2
  from xsample_jax.data import procedural, shards, sources
  src = procedural.ProceduralSource("train", n, image_size=24)
  table = sources.procedural_caption_table()
  writer = shards.ShardWriter(str(directory), records_per_shard=50)
  corrupt = {i: j % 4 for j, i in enumerate(range(5, n, n // 10))}  # 1%: records 5, 105, ...; four kinds in turn
  bad, names = {}, []
  for i in range(n):
    ex = src[i]
    jpg = cv2.imencode(".jpg", ex["image"][..., ::-1])[1].tobytes()
    key, caption, emb = ex["key"], ex["caption"].encode(), table[ex["caption_id"]]
    kind = corrupt.get(i)
    if kind == 0:
      jpg, bad[key] = jpg[: len(jpg) // 3], "undecodable image"
    elif kind == 1:
      caption, bad[key] = b"", "empty caption"
    elif kind == 2:
      emb, bad[key] = np.ones(100, "<f4"), "shape (100,)"
    elif kind == 3:
      caption, bad[key] = b"a b\xff\xfeat", "not valid UTF-8"
    done = writer.write(shards.encode_record(key=key, caption=caption, image=jpg, embedding=emb, id=i))
    names += [done] if done else []
  last = writer.close()
  names += [last] if last else []
  (directory / "manifest.json").write_text(json.dumps({"shards": names, "written": n, "skipped": 0,
                                                       "skipped_items": [], "complete": True}))
  # A shard without corrupt records (150-199), truncated (a failed copy): its 50 records are lost, and reported.
  truncated = directory / names[3]
  truncated.write_bytes(truncated.read_bytes()[:200])
  return bad, truncated.name


def corrupt(tmp: Path) -> dict:
  directory = tmp / "corrupt_shards"
  bad, truncated = _corrupt_shards(directory)
  # 1000 - 50 lost - 10 bad = 940 good images: 16 steps of 64 cover one epoch (1024 > 950 read).
  data = [f"--config.data.train=shards:{directory}", "--config.total_steps=16", "--config.checkpoint_every_steps=16"]
  rc, out = run(tmp / "corrupt_run", *data)
  rows = [json.loads(line) for line in (tmp / "corrupt_run" / "metrics.jsonl").read_text().splitlines()]
  last = rows[-1]
  named = sum(any(key in line and reason in line for line in out.splitlines()) for key, reason in bad.items())
  rc_strict, out_strict = run(tmp / "corrupt_strict", *data, "--config.data.strict=true")
  strict_named = rc_strict == 1 and any(k in out_strict for k in bad)
  outcome = {"run completed": rc == 0, "bad records met (counted)": last.get("data/skipped_records"),
             "records named in the log": named, "truncated shard counted": last.get("data/unreadable_shards"),
             "truncated shard named": truncated in out, "strict stopped naming a record": strict_named}
  # Counted once per encounter: past the first epoch a bad record met again counts again.
  ok = (rc == 0 and last.get("data/skipped_records", 0) >= len(bad) and named == len(bad)
        and last.get("data/unreadable_shards") == 1 and truncated in out and strict_named)
  return {"fault": f"corrupt data ({len(bad)} of 1000 records, 1 truncated shard)", "tried": len(bad) + 2,
          "as required": len(bad) + 2 if ok else 0, "outcome": outcome}


def nonfinite(tmp: Path) -> dict:
  inject = "--config.debug.inject_nonfinite_steps=(7,)"
  rc, out = run(tmp / "nan_stop", inject)
  import orbax.checkpoint as ocp
  kept = ocp.CheckpointManager(tmp / "nan_stop" / "checkpoints").all_steps()
  stop_ok = rc == 1 and "error: step 7: the loss or a gradient is NaN/Inf" in out and kept == [5]
  rc2, _ = run(tmp / "nan_stop", "--config.nonfinite=skip", inject)  # the same workdir, told to skip
  rows = [json.loads(line) for line in (tmp / "nan_stop" / "metrics.jsonl").read_text().splitlines()]
  skip_ok = rc2 == 0 and rows[-1]["step"] == STEPS and rows[-1]["nonfinite_steps"] == 1
  return {"fault": "NaN loss and gradients (injected at step 7)", "tried": 2, "as required": stop_ok + skip_ok,
          "outcome": {"stop: exit 1 naming step 7, checkpoints [5] intact": stop_ok,
                      "skip: resumed, completed, counted 1": skip_ok}}


def bad_configs(tmp: Path) -> dict:
  """(flags, what the error must say, prepare) for each kind."""
  from xsample_jax.models import sentence_encoder
  afile = tmp / "afile"
  afile.write_text("x")
  digits = tmp / "digits"
  pets = tmp / "pets"
  import cv2
  for root, classes in ((digits, ["0", "1"]), (pets, ["cat", "dog"])):
    for c in classes:
      (root / c).mkdir(parents=True, exist_ok=True)
      (root / c / "a.png").write_bytes(cv2.imencode(".png", np.full((8, 8, 3), 9, np.uint8))[1].tobytes())
  other = tmp / "other_model"
  run(other, "--config.total_steps=3", "--config.checkpoint_every_steps=3")  # a run of another length, to resume
  shadow = tmp / "site" / sentence_encoder.GT_PACKAGE
  shadow.mkdir(parents=True, exist_ok=True)
  (shadow / "__init__.py").write_text("")
  cases = [
      (["--config.totl_steps=5"], "totl_steps", None, None),
      (["--config.total_steps=many"], "total_steps", None, None),
      (["--config.batch_size=3"], "config.batch_size", None, None),
      (["--config.data.train=tfds:no_such_dataset"], "config.data.train", None, None),
      ([f"--config.data.train=folder:{digits}"], "--config.data.class_names", None, None),
      (["--config.loss.temperature=0"], "config.loss.temperature: must be > 0", None, None),
      (["--config.mesh.data=16"], "config.mesh.data", None, None),
      ([], "is not writable", afile / "run", None),
      (["--config.model.head=(48,32)", "--config.total_steps=6"], "no checkpoint in", other, None),
      ([f"--config.data.train=folder:{pets}"], sentence_encoder.HOW_TO_GET[:40], None, str(tmp / "site")),
      (["--config.nonfinite=ignore"], "config.nonfinite", None, None),
      (["--config.loss.name=infonce"], "config.loss.name", None, None),
  ]
  ok, failures = 0, []
  for i, (flags, says, workdir, pythonpath) in enumerate(cases):
    workdir = workdir or tmp / f"config_{i}"
    before = {str(p): p.read_bytes() for p in Path(workdir).rglob("*") if p.is_file()} if Path(workdir).exists() else None
    env = dict(ENV, JAX_LOG_COMPILES="1", **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    rc, out = run(workdir, *flags, env=env)
    after = {str(p): p.read_bytes() for p in Path(workdir).rglob("*") if p.is_file()} if Path(workdir).exists() else None
    good = rc != 0 and says in out and "Compiling" not in out and before == after
    ok += good
    if not good:
      failures.append({"flags": flags, "rc": rc, "tail": out[-500:]})
  return {"fault": "bad configuration", "tried": len(cases), "as required": ok,
          "outcome": {"exit != 0, named, nothing compiled, workdir unchanged": ok, "failures": failures}}


def damaged(tmp: Path, reference) -> dict:
  workdir = tmp / "damaged"
  proc = start(workdir)
  while proc.poll() is None and not (workdir / "checkpoints" / "10").is_dir():
    time.sleep(0.01)
  proc.kill()
  proc.communicate()
  for p in (workdir / "checkpoints" / "10" / "state").rglob("*"):
    if p.is_file() and p.parent.name == "d":
      p.write_bytes(b"\0garbage")
  rc, out = run(workdir)
  set_aside = (workdir / "corrupt_checkpoints").is_dir()
  exact = rc == 0 and same(final_params(workdir), reference)
  return {"fault": "damaged newest checkpoint", "tried": 1, "as required": int(exact and set_aside),
          "outcome": {"set aside (kept)": set_aside, "resumed from step 5": "resuming from step 5" in out,
                      "bit-exact": exact}}


def diskfull(tmp: Path, reference) -> dict:
  mnt = tmp / "small_disk"
  mnt.mkdir()
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True).returncode:
    return {"fault": "disk full", "tried": 0, "as required": 0, "outcome": "cannot mount a tmpfs here"}
  script = (f"mount -t tmpfs -o size=3500k tmpfs {mnt} && cd {ROOT} && "
            f"{shlex.join([sys.executable, '-m', 'xsample_jax.main', *ARGS, f'--workdir={mnt}/run'])}; "
            f"rc=$?; cp -r {mnt}/run {tmp}/diskfull_copy; exit $rc")
  out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=ENV, capture_output=True, text=True,
                       timeout=900)
  named = re.search(r"failed because the disk is full .*step (\d+), is intact", out.stderr)
  rc, _ = run(tmp / "diskfull_copy")
  exact = rc == 0 and same(final_params(tmp / "diskfull_copy"), reference)
  return {"fault": "disk full during a save", "tried": 1, "as required": int(bool(named) and exact),
          "outcome": {"exit 1 naming the full disk": out.returncode == 1 and bool(named),
                      "last complete checkpoint": int(named.group(1)) if named else None,
                      "resumed elsewhere, bit-exact": exact}}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--sigterms", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--only", default="kill9,sigterm,corrupt,nonfinite,config,damaged,diskfull")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  only = args.only.split(",")
  rows = []
  with tempfile.TemporaryDirectory() as d:
    tmp = Path(d)
    rc, out = run(tmp / "reference")
    assert rc == 0, out[-3000:]
    reference = final_params(tmp / "reference")
    jobs = {"kill9": lambda: kill9(tmp, reference, args.kills, rng),
            "sigterm": lambda: sigterm(tmp, reference, args.sigterms, rng),
            "corrupt": lambda: corrupt(tmp), "nonfinite": lambda: nonfinite(tmp),
            "config": lambda: bad_configs(tmp), "damaged": lambda: damaged(tmp, reference),
            "diskfull": lambda: diskfull(tmp, reference)}
    for name in only:
      t0 = time.time()
      row = jobs[name]()
      row["seconds"] = round(time.time() - t0, 1)
      rows.append(row)
      print(json.dumps(row), flush=True)
  width = max(len(r["fault"]) for r in rows)
  print(f"\n{'fault':<{width}}  tried  as required  outcome")
  for r in rows:
    outcome = {k: v for k, v in r["outcome"].items() if k != "failures"} if isinstance(r["outcome"], dict) else r["outcome"]
    print(f"{r['fault']:<{width}}  {r['tried']:>5}  {r['as required']:>11}  {outcome}")


if __name__ == "__main__":
  main()

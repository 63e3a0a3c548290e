"""Faults the trainer must survive without losing or hiding anything (the fast cases; benchmarks/faults.py runs the
full sweep): non-finite steps, interrupted and corrupt checkpoints, a full disk, bad configurations."""
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
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


def _records(n, bad):
  """n training records; those with bad(i) carry 512-wide caption embeddings (the model expects 384)."""
  img = np.full((8, 8, 3), 90, np.uint8)
  return [dict(image=img, caption=f"photo {i}", key=f"k{i}", id=i,
               caption_emb=np.full(512 if bad(i) else 384, 0.05, np.float32)) for i in range(n)]


def test_a_dataset_of_bad_records_stops_training_instead_of_searching_forever():
  from xsample_jax.data import augment, pipeline, shards
  aug = augment.SimCLRAugment(size=8)
  everything_bad = pipeline.train_dataset(_records(3000, lambda i: True), global_batch_size=4, augment=aug, seed=0,
                                          process_index=0, process_count=1)
  with pytest.raises(shards.BadRecordError, match=r"1000 bad records in a row, 1000 of 1000 read; .*shape \(512,\)"):
    next(iter(everything_bad))
  # Mostly bad, never 50 in a row: the fraction stops it once 1000 records were read.
  mostly_bad = pipeline.train_dataset(_records(3000, lambda i: i % 5 < 3), global_batch_size=4, augment=aug, seed=0,
                                      process_index=0, process_count=1, max_bad_in_a_row=50)
  with pytest.raises(shards.BadRecordError, match=r"of 10\d\d read"):
    it = iter(mostly_bad)
    for _ in range(1000):
      next(it)
  # A few bad records (1 in 10) train on, counted.
  it = iter(pipeline.train_dataset(_records(3000, lambda i: i % 10 == 0), global_batch_size=4, augment=aug, seed=0,
                                   process_index=0, process_count=1))
  for _ in range(400):
    next(it)
  assert 100 < it.skipped < 220


def _losses(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _snapshot(workdir):
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path):
  reference = tmp_path / "reference"
  train.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every_steps=2), str(reference))
  run = tmp_path / "run"
  # A run stopped after its step-4 checkpoint (by a NaN at step 5), whose array files were then damaged.
  config = tiny_config(total_steps=6, checkpoint_every_steps=2, **{"debug.inject_nonfinite_steps": (5,)})
  with pytest.raises(train.NonFiniteError):
    train.train_and_evaluate(config, str(run))
  data_files = [p for p in (run / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for p in data_files:
    p.write_bytes(b"\0garbage" * 7)
  out = train.train_and_evaluate(tiny_config(total_steps=6, checkpoint_every_steps=2), str(run))
  assert out["step"] == 6
  assert [p.name.split(".")[0] for p in (run / "corrupt_checkpoints").iterdir()] == ["4"]  # kept, not deleted
  got, want = _losses(run), _losses(reference)
  # Resumed from step 2 (the first two steps ran in the fault-injecting program, hence float-level differences).
  np.testing.assert_allclose([got[s] for s in (3, 4, 5, 6)], [want[s] for s in (3, 4, 5, 6)], rtol=1e-5)


def test_a_checkpoint_of_another_model_is_refused_and_the_workdir_left_as_it_was(tmp_path):
  train.train_and_evaluate(tiny_config(total_steps=3, checkpoint_every_steps=3), str(tmp_path))
  before = _snapshot(tmp_path)
  with pytest.raises(train.CheckpointError, match="no checkpoint in .* restores .*use that config or a new workdir"):
    train.train_and_evaluate(tiny_config(total_steps=4, **{"model.head": (48, 32)}), str(tmp_path))
  assert _snapshot(tmp_path) == before


def test_restoring_never_unpickles(tmp_path, monkeypatch):
  import pickle
  train.train_and_evaluate(tiny_config(total_steps=3, checkpoint_every_steps=3), str(tmp_path))

  def refuse(*args, **kwargs):
    raise AssertionError("a checkpoint restore unpickled data")
  monkeypatch.setattr(pickle, "load", refuse)
  monkeypatch.setattr(pickle, "loads", refuse)
  out = train.train_and_evaluate(tiny_config(total_steps=4, checkpoint_every_steps=3), str(tmp_path))
  assert out["step"] == 4
  assert not [p for p in (tmp_path / "checkpoints").rglob("*") if p.suffix in (".pkl", ".pickle")]


def _folder(root, classes):
  for c, name in enumerate(classes):
    (root / name).mkdir(parents=True)
    for k in range(2):
      img = np.full((12, 12, 3), 30 * c + 10 * k, np.uint8)
      (root / name / f"{k}.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())
  return root


def test_a_workdir_that_cannot_take_files_is_refused_first(tmp_path):
  (tmp_path / "afile").write_text("not a directory")
  with pytest.raises(train.ConfigError, match=r"workdir .*afile/run is not writable .*afile is a file"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "afile" / "run"))
  assert (tmp_path / "afile").read_text() == "not a directory"


def test_class_names_that_are_not_words_are_refused_naming_the_config_key(tmp_path):
  folder = _folder(tmp_path / "digits", ["0", "1"])
  config = tiny_config(**{"data.train": f"folder:{folder}", "loss.graph": "class"})
  with pytest.raises(train.ConfigError, match=r"class '0' \(label 0\) is not a word.*--config.data.class_names=FILE"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  (tmp_path / "names.txt").write_text("zero\none\n")
  config.data.class_names = str(tmp_path / "names.txt")
  assert train.get_source(config, config.data.train, "train", tmp_path / "run").class_names == ["zero", "one"]


def test_missing_sentence_encoder_weights_are_named_with_the_fix(tmp_path):
  from xsample_jax.models import sentence_encoder
  shadow = tmp_path / "site" / sentence_encoder.GT_PACKAGE  # an install without its model directory
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text("")
  folder = _folder(tmp_path / "pets", ["cat", "dog"])
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "xsample_jax.main", "--config", "configs/smoke.py",
                        f"--config.data.train=folder:{folder}", f"--workdir={tmp_path / 'run'}"],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "error: config.data.train:" in out.stderr and sentence_encoder.HOW_TO_GET in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_corrupt_caption_shards_train_on_counted_and_named_and_strict_stops(tmp_path, caplog):
  """1% corrupt records of four kinds and one truncated shard file, as web-scraped data brings them."""
  from test_data_shards_faults import _good, _raw_record, _write_dir
  from xsample_jax.data import shards
  n = 400
  records = [_good(i) for i in range(n)]
  good_jpeg = records[10]
  bad = {"k10": "undecodable image", "k111": "empty caption", "k222": "shape (100,)", "k333": "not valid UTF-8"}
  rec = shards.decode_record(good_jpeg)
  records[10] = shards.encode_record(key="k10", caption="a boat", image=rec["image"][: len(rec["image"]) // 3],
                                     embedding=rec["caption_emb"], id=10)
  records[111] = shards.encode_record(key="k111", caption="", image=rec["image"], embedding=rec["caption_emb"], id=111)
  records[222] = shards.encode_record(key="k222", caption="a boat", image=rec["image"],
                                      embedding=np.ones(100, np.float32), id=222)
  records[333] = _raw_record(b"k333", b"a b\xff\xfeat", rec["image"], rec["caption_emb"], 333)
  directory = _write_dir(tmp_path / "shards", records)  # 100 shards of 4
  truncated = sorted((tmp_path / "shards").glob("*.array_record"))[50]
  truncated.write_bytes(truncated.read_bytes()[:100])
  config = tiny_config(total_steps=26, checkpoint_every_steps=26, **{"data.train": f"shards:{directory}"})
  with caplog.at_level(logging.WARNING):
    out = train.train_and_evaluate(config, str(tmp_path / "run"))  # 26 x 16 images > one epoch of 396
  assert out["step"] == 26 and np.isfinite(out["loss"])
  assert out["data/skipped_records"] == 4 and out["data/unreadable_shards"] == 1
  log = caplog.text
  assert truncated.name in log
  for key, reason in bad.items():
    assert any(key in r.getMessage() and reason in r.getMessage() for r in caplog.records), key
  config.data.strict = True
  with pytest.raises(shards.BadRecordError, match=r"bad record '.*k(10|111|222|333)"):
    train.train_and_evaluate(config, str(tmp_path / "strict"))


def _small_disk_or_skip(mnt):
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (unshare and user namespaces needed)")


def test_the_metric_writer_raises_on_a_full_disk_instead_of_blocking(tmp_path):
  """tensorboardX's own writer thread dies on a full disk and its queue then blocks the run forever."""
  mnt = tmp_path / "small_disk"
  mnt.mkdir()
  _small_disk_or_skip(mnt)
  code = ("import os, sys; from etils import epath; from xsample_jax import train\n"
          f"w = train.MetricWriter(epath.Path('{mnt}'), None)\n"
          "try:\n"
          "  for step in range(1, 100000): w.write(step, {'loss': 1.0, 'lr': 0.1, 'note': 'x' * 200})\n"
          "except OSError as e: print('raised', e.errno == 28); sys.exit(0)\n")
  script = f"mount -t tmpfs -o size=64k tmpfs {mnt} && cd {Path(__file__).resolve().parents[1]} && " \
           f"{shlex.join([sys.executable, '-c', code])}"
  out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0 and out.stdout.strip() == "raised True", out.stderr[-2000:]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_it_and_the_last_checkpoint_resumes(tmp_path):
  """The workdir on a 3.5 MB tmpfs (a user+mount namespace: no root needed): room for two checkpoints, not three."""
  from test_train_e2e import ARGS, ROOT, STEPS
  mnt = tmp_path / "small_disk"
  mnt.mkdir()
  _small_disk_or_skip(mnt)
  script = (f"mount -t tmpfs -o size=3500k tmpfs {mnt} && cd {ROOT} && "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "
            f"{shlex.join([sys.executable, '-m', 'xsample_jax.main', *ARGS, f'--workdir={mnt}/run'])}; "
            f"rc=$?; cp -r {mnt}/run {tmp_path}/run; exit $rc")
  out = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
  assert out.returncode == 1, out.stderr[-3000:]
  # Whichever write meets the full disk first, a checkpoint's or the metrics', says so.
  match = re.search(r"error: (saving a checkpoint|writing the metrics) in .* failed because the disk is full .*the "
                    r"newest complete checkpoint, step (\d+), is intact", out.stderr)
  assert match, out.stderr[-3000:]
  last = int(match.group(2))
  assert 0 < last < STEPS
  # The copied workdir (a bigger disk) resumes from that checkpoint and finishes.
  run = subprocess.run([sys.executable, "-m", "xsample_jax.main", *ARGS, f"--workdir={tmp_path}/run"], cwd=ROOT,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert f"resumed from step {last}" in run.stderr and f"done: {STEPS} steps" in run.stdout

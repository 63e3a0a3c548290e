"""The grain pipelines: TFDS label source to a sharded global batch, process slicing, exact resume, bad records."""
import json
import logging
import os
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec as P

from xsample_jax.data import augment, pipeline, shards, sources
from tests.helpers import bow_embed


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def must_not_run(embed_fn):
  """An embed_fn with embed_fn's identity (so its cached tables) that fails if the cache is not used."""
  def fail(texts):
    raise AssertionError(f"embed_fn ran on {len(texts)} texts: the cached table was not read")
  fail.identity = sources.embed_identity(embed_fn)[0]
  return fail

AUG = augment.SimCLRAugment(size=16)


def _local(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def _take(it, n):
  return [_local(next(it)) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_tfds_label_source_to_sharded_global_batch(mesh, tmp_path):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    # Unprepared (mock) cifar10's label names are the placeholders "0".."9": refused, so name them.
    src = sources.tfds_label_source("cifar10", "train", embed_fn=bow_embed, cache_dir=str(tmp_path),
                                    class_names=CIFAR10)
    assert len(src) == 40 and src.captions[3] == "a photo of a cat"
    # The class table is cached: a second source with the same encoder does not run it.
    again = sources.tfds_label_source("cifar10", "train", embed_fn=must_not_run(bow_embed), cache_dir=str(tmp_path),
                                      class_names=CIFAR10)
    np.testing.assert_array_equal(again.table, src.table)
    np.testing.assert_allclose(src.table, bow_embed(src.captions), atol=1e-6)

    ds = pipeline.train_dataset(src, global_batch_size=8, augment=AUG, seed=1, mesh=mesh)
    batch = next(iter(ds))
  assert set(batch) == {"image", "caption_emb", "label", "id"}
  assert batch["image"].shape == (16, 16, 16, 3) and batch["image"].dtype == np.uint8
  assert batch["caption_emb"].shape == (16, 384) and batch["label"].shape == batch["id"].shape == (16,)
  for leaf in batch.values():
    assert isinstance(leaf, jax.Array) and leaf.sharding.spec == P("data")
    assert len(leaf.addressable_shards) == 8 and leaf.addressable_shards[0].data.shape[0] == 2
  b = _local(batch)
  np.testing.assert_array_equal(b["id"][0::2], b["id"][1::2])  # rows 2i, 2i+1: the two views of image i
  assert len(set(b["id"][0::2])) == 8
  np.testing.assert_array_equal(b["caption_emb"], src.table[b["label"]])  # the graph input is a class lookup
  assert not np.array_equal(b["image"][0::2], b["image"][1::2])


def test_wordnet_label_names_become_readable_class_names(tmp_path):
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.tfds_label_source("imagenet2012", "validation", embed_fn=bow_embed, cache_dir=str(tmp_path))
    assert len(src.class_names) == 1000 and src.table.shape == (1000, 384)
    assert src.captions[:2] == ["a photo of a tench", "a photo of a goldfish"]
    assert src.captions[2] == "a photo of a great white shark"
    with pytest.raises(ValueError, match="3 class names for"):
      sources.tfds_label_source("cifar10", "train", embed_fn=bow_embed, class_names=["a", "b", "c"])
  assert sources.wordnet_names(["n01443537", "n01440764"]) == ["goldfish", "tench"]
  assert sources.wordnet_names(["n01440764", "n99999999"]) is None  # not ImageNet-1k: tfds_label_source raises
  with pytest.raises(ValueError, match="no embed_fn"):
    sources.caption_table(["a photo of a cat"], None, str(tmp_path))


@pytest.fixture(scope="module")
def procedural():
  return sources.procedural_source("train", 24, image_size=24)


def test_process_slices_cover_the_dataset_once(procedural):
  seen = []
  for process_index in range(2):
    ds = pipeline.train_dataset(procedural, global_batch_size=8, augment=AUG, seed=3, num_epochs=1,
                                process_index=process_index, process_count=2)
    ids = np.concatenate([b["id"][0::2] for b in ds])
    assert len(ids) == 12
    seen.append(ids)
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(24))
  # The same holds for the (unshuffled, padded) evaluation pipeline with an uneven split.
  ev = [np.concatenate([b["id"][b["valid"]] for b in pipeline.eval_dataset(
      sources.procedural_source("mixed_rand", 11, image_size=24), global_batch_size=4, image_size=16,
      process_index=p, process_count=2)]) for p in range(2)]
  assert len(ev[0]) == 6 and len(ev[1]) == 5
  np.testing.assert_array_equal(np.sort(np.concatenate(ev)), np.arange(11))


def test_process_rows_give_the_same_global_batches_for_any_layout_and_element_size():
  def rows(index, count, local, start=0, per=3):  # positions, flattened out of the elements
    ds = pipeline.ProcessRows(lambda ps: ps, 30, index, count, local, start, per)
    return [p for element in ds for p in element]

  single = rows(0, 1, 4)  # 30 positions: 7 whole global batches of 4
  assert single == list(range(28)) == rows(0, 1, 4, per=16) == rows(0, 1, 4, per=1)
  parts = [rows(i, 2, 2) for i in range(2)]
  assert [x for k in range(7) for part in parts for x in part[2 * k:2 * k + 2]] == single
  # A resume on another layout starts every process at the global batch reached.
  later = [rows(i, 4, 1, start=5) for i in range(4)]
  assert [part[k] for k in range(2) for part in later] == single[20:]
  assert len(pipeline.ProcessRows(lambda ps: ps, 30, 0, 1, 4, per_element=3)) == 10  # 28 rows, the last element 1


def test_every_epoch_is_a_permutation_and_reshuffled(procedural):
  it = iter(pipeline.train_dataset(procedural, global_batch_size=8, augment=AUG, seed=0, process_index=0,
                                   process_count=1))
  ids = np.concatenate([b["id"][0::2] for b in _take(it, 6)])  # two epochs of 24
  np.testing.assert_array_equal(np.sort(ids[:24]), np.arange(24))
  np.testing.assert_array_equal(np.sort(ids[24:]), np.arange(24))
  assert not np.array_equal(ids[:24], ids[24:])


def test_deterministic_for_a_seed(procedural):
  def first(seed):
    return _take(iter(pipeline.train_dataset(procedural, global_batch_size=4, augment=AUG, seed=seed,
                                             process_index=0, process_count=1, read_threads=4)), 2)
  a, b, c = first(5), first(5), first(6)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_saved_state_yields_identical_batches(procedural, mesh, num_workers):
  def make():
    return iter(pipeline.train_dataset(procedural, global_batch_size=8, augment=AUG, seed=7, mesh=mesh,
                                       num_workers=num_workers))
  it = make()
  _take(it, 5)  # past the first epoch boundary (24 images = 3 batches), half-way through a grain element
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state["rows_used"] == 40 % pipeline.ROWS_PER_ELEMENT
  expected = _take(it, 3)
  restored = make()
  restored.set_state(state)
  _assert_same(_take(restored, 3), expected)
  it.close()
  restored.close()
  if num_workers:  # worker processes change nothing in the stream
    reference = iter(pipeline.train_dataset(procedural, global_batch_size=8, augment=AUG, seed=7, mesh=mesh))
    _assert_same(_take(reference, 8)[5:], expected)


def test_auto_worker_count_follows_the_host_cores():
  # Threads up to 4 cores (they beat worker processes on 2: benchmarks/results/input_bench_cpu_2core.jsonl).
  assert [pipeline.default_num_workers(c) for c in (1, 2, 4, 8, 12, 64, 240)] == [0, 0, 0, 4, 6, 16, 16]
  assert pipeline.resolve_num_workers(-1) == pipeline.default_num_workers(pipeline.host_cores())
  assert pipeline.resolve_num_workers(3) == 3
  with pytest.raises(ValueError, match="num_workers must be >= 0, or -1"):
    pipeline.resolve_num_workers(-2)


def test_auto_read_threads_follow_the_worker_count_and_the_host_cores():
  # No read threads in the training process of a small host (the step has the cores; Prefetch's thread reads), 8
  # elsewhere.
  assert [pipeline.default_read_threads(0, c) for c in (1, 2, 4, 8)] == [0, 0, 0, 8]
  assert [pipeline.default_read_threads(w, 2) for w in (1, 4)] == [8, 8]
  assert pipeline.resolve_read_threads(-1, 0) == pipeline.default_read_threads(0)
  assert pipeline.resolve_read_threads(3, 0) == 3
  assert pipeline.resolve_read_threads(0, 4) == 0
  for bad in (-2, -5):
    with pytest.raises(ValueError, match="read_threads must be >= 0, or -1"):
      pipeline.resolve_read_threads(bad, 0)


def _write_shards(directory, records):
  writer = shards.ShardWriter(str(directory), records_per_shard=4)
  for r in records:
    writer.write(shards.encode_record(**r))
  names = [f"data-{i:05d}.array_record" for i in range(writer.shard_index + (writer.in_shard > 0))]
  writer.close()
  (directory / "manifest.json").write_text(json.dumps({"shards": names, "written": len(records), "skipped": 0,
                                                        "skipped_items": []}))


@pytest.fixture
def shards_with_bad_records(tmp_path):
  import cv2
  recs, bad = [], {}
  for i in range(12):
    img = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    cap = f"picture {i} of a boat"
    recs.append(dict(key=f"k{i}", caption=cap, image=cv2.imencode(".png", img)[1].tobytes(),
                     embedding=bow_embed([cap])[0], id=i))
  recs[2]["image"] = b"not an image"
  bad["k2"] = "undecodable image"
  recs[5]["caption"] = ""
  bad["k5"] = "empty caption"
  recs[9]["embedding"] = np.ones(100, np.float32)
  bad["k9"] = "shape (100,)"
  _write_shards(tmp_path, recs)
  return sources.CaptionShardSource(str(tmp_path)), bad


def test_bad_records_are_skipped_counted_and_logged(shards_with_bad_records, caplog):
  src, bad = shards_with_bad_records
  ds = pipeline.train_dataset(src, global_batch_size=3, augment=AUG, seed=0, num_epochs=1, process_index=0,
                              process_count=1)
  it = iter(ds)
  with caplog.at_level(logging.WARNING):
    batches = list(it)
  ids = np.concatenate([b["id"][0::2] for b in batches])
  assert sorted(ids) == [i for i in range(12) if f"k{i}" not in bad]
  assert it.skipped == 3 and it.metrics() == {"data/skipped_records": 3}
  assert it.get_state()["skipped"] == 3
  for key, reason in bad.items():
    assert any(key in r.getMessage() and reason in r.getMessage() for r in caplog.records), key
  assert all((b["label"] == -1).all() for b in batches)

  # Evaluation masks them instead, keeping one row per record.
  ev = pipeline.eval_dataset(src, global_batch_size=5, image_size=16, process_index=0, process_count=1)
  it = iter(ev)
  batches = list(it)
  valid = np.concatenate([b["valid"] for b in batches])
  ids = np.concatenate([b["id"] for b in batches])
  assert len(valid) == 15 and it.skipped == 3
  assert sorted(ids[valid]) == [i for i in range(12) if f"k{i}" not in bad]


def test_resume_after_skipped_records_yields_identical_batches_and_counts(shards_with_bad_records):
  src, _ = shards_with_bad_records

  def make():
    return iter(pipeline.train_dataset(src, global_batch_size=2, augment=AUG, seed=3, num_epochs=3,
                                       process_index=0, process_count=1))
  it = make()
  states, batches = [], []
  for batch in it:  # 27 good records of 36: 13 batches
    batches.append(batch)
    states.append(json.loads(json.dumps(it.get_state())))
  assert len(batches) == 13 and it.skipped == 9
  assert any(s["rows_used"] for s in states)  # some batches end inside a grain element
  for k in (2, 5, 9):
    restored = make()
    restored.set_state(states[k])
    assert restored.skipped == states[k]["skipped"]
    _assert_same(list(restored), batches[k + 1:])
    assert restored.skipped == 9
  with pytest.raises(ValueError, match="start_batch"):  # a state of the per-example layout before
    make().set_state({"parent": {"next_index": 3}, "skipped": 0, "seen": 3})


def test_strict_mode_raises_naming_the_record(shards_with_bad_records):
  src, _ = shards_with_bad_records
  ds = pipeline.train_dataset(src, global_batch_size=12, augment=AUG, seed=0, num_epochs=1, process_index=0,
                              process_count=1, strict=True)
  with pytest.raises(shards.BadRecordError, match=r"'k(2|5|9)'"):
    next(iter(ds))


def test_prefetch_reads_ahead_but_its_state_is_the_last_batch_returned(procedural, mesh):
  def make():
    return iter(pipeline.train_dataset(procedural, global_batch_size=8, augment=AUG, seed=7, mesh=mesh))
  plain, ahead = make(), pipeline.Prefetch(make(), size=2)
  expected = _take(plain, 4)
  _assert_same(_take(ahead, 2), expected[:2])
  time.sleep(0.5)  # let it read ahead
  assert ahead.get_state() == json.loads(json.dumps(ahead.get_state())) != plain.get_state()
  restored = make()
  restored.set_state(ahead.get_state())  # a checkpoint taken now resumes at batch 3, not after the read-ahead
  _assert_same(_take(restored, 2), expected[2:])
  ahead.set_state(restored.get_state())  # and set_state drops what was read ahead
  _assert_same(_take(ahead, 1), _take(plain, 1))
  for it in (plain, ahead, restored):
    it.close()


def test_prefetch_ready_counts_the_batches_assembled_and_not_yet_returned(procedural):
  it = pipeline.Prefetch(iter(pipeline.train_dataset(procedural, global_batch_size=8, augment=AUG, seed=0,
                                                     process_index=0, process_count=1)), size=2)

  def settled():  # the thread fills the queue, then holds one more batch while it waits for room
    deadline = time.monotonic() + 30
    while it.ready() < 3 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.2)  # and assembles nothing beyond it
    return it.ready()

  assert settled() == 3
  next(it)
  next(it)
  assert settled() == 3  # two taken, two more assembled
  it.set_state(it.get_state())  # a restart drops the read-ahead and reads it again
  assert settled() == 3
  it.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling is Linux's")
def test_prefetch_thread_runs_at_the_priority_it_was_given(procedural):
  def make(**kw):
    return pipeline.Prefetch(iter(pipeline.train_dataset(procedural, global_batch_size=8, augment=AUG, seed=0,
                                                          process_index=0, process_count=1)), **kw)
  own = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
  for kw, want in (({}, (os.SCHED_IDLE, own[1])), ({"priority": "low"}, (own[0], 19)),
                   ({"priority": "normal"}, own)):
    it = make(**kw)
    next(it)  # the thread has set its priority before its first batch
    tid = it._thread.native_id
    assert (os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)) == want, kw
    it.close()
  with pytest.raises(ValueError, match="prefetch priority must be one of"):
    pipeline.Prefetch(iter([]), priority="high")


def test_prefetch_passes_errors_and_the_end_on_in_order(shards_with_bad_records):
  src, _ = shards_with_bad_records
  strict = pipeline.Prefetch(iter(pipeline.train_dataset(src, global_batch_size=12, augment=AUG, seed=0, num_epochs=1,
                                                         process_index=0, process_count=1, strict=True)))
  for _ in range(2):  # and again on the next call
    with pytest.raises(shards.BadRecordError, match=r"'k(2|5|9)'"):
      next(strict)
  it = pipeline.Prefetch(iter(pipeline.train_dataset(src, global_batch_size=3, augment=AUG, seed=0, num_epochs=1,
                                                     process_index=0, process_count=1)))
  assert len(list(it)) == 3 and it.skipped == 3 and it.metrics() == {"data/skipped_records": 3}
  it.close()


def test_eval_batches_are_padded_and_centre_cropped(mesh):
  src = sources.procedural_source("mixed_same", 10, image_size=32)
  batches = list(pipeline.eval_dataset(src, global_batch_size=8, image_size=28, mesh=mesh))
  assert len(batches) == 2
  last = _local(batches[1])
  assert last["image"].shape == (8, 28, 28, 3) and last["valid"].tolist() == [True] * 2 + [False] * 6
  assert (last["id"][2:] == -1).all() and (last["image"][2:] == 0).all()
  first = _local(batches[0])
  np.testing.assert_array_equal(first["image"][0], augment.eval_view(src[0]["image"], 28))
  np.testing.assert_array_equal(first["background"], [src[i]["background"] for i in range(8)])


def test_batch_size_must_split_over_processes_and_devices(procedural, mesh):
  with pytest.raises(ValueError, match="processes"):
    pipeline.train_dataset(procedural, global_batch_size=7, augment=AUG, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="data shards"):
    pipeline.eval_dataset(procedural, global_batch_size=6, image_size=16, mesh=mesh)


def test_iterator_checkpoints_with_orbax_and_grains_handler(procedural, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  def make():
    return iter(pipeline.train_dataset(procedural, global_batch_size=4, augment=AUG, seed=2, process_index=0,
                                       process_count=1))
  it = make()
  _take(it, 3)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 2)
  restored = make()
  mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_same(_take(restored, 2), expected)
  mngr.close()


def test_get_source_from_config_strings(tmp_path, shards_with_bad_records):
  src = sources.get_source("procedural", "mixed_same", num_examples=3, image_size=16)
  assert len(src) == 3 and src[0]["image"].shape == (16, 16, 3)
  assert len(sources.get_source(f"shards:{tmp_path}", "train")) == 12
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    assert len(sources.get_source("tfds:cifar10", "test", embed_fn=bow_embed, class_names=CIFAR10)) == 5
  with pytest.raises(ValueError, match="unknown data source"):
    sources.get_source("webdataset:/x", "train")

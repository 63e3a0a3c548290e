"""ImageNet ReaL: tfds:imagenet2012_real's original label and padded real_label set, through the eval pipeline,
and the linear probe's real_top1."""
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec as P

from tests.helpers import bow_embed
from xsample_jax import evals
from xsample_jax.data import pipeline, sources
from xsample_jax.evals import linear_probe

# Controlled examples: two have no ReaL label (such images are left out of ReaL accuracy).
ORIGINAL = [7, 3, 12, 4, 5, 1]
REAL = [[7], [7, 3], [12, 0, 999], [], [5], []]


def _controlled(self, split, decoders=None, deserialize_method=None, **kw):
  """In place of the ArrayRecord data source: the dataset's own features info, with the examples chosen above."""
  class Source(list):
    dataset_info = self.info
  rng = np.random.default_rng(0)
  return Source({"image": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "original_label": np.int64(o),
                 "real_label": np.array(r, np.int64), "file_name": f"ILSVRC2012_val_{i:08d}.JPEG"}
                for i, (o, r) in enumerate(zip(ORIGINAL, REAL)))


def test_real_source_with_the_mocks_random_sets(tmp_path):
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.data_source("imagenet2012_real", split="validation")
    # The mock draws 5 to 49 labels per set, more than ReaL's handful: a wider set for it.
    src = sources.tfds_label_source("imagenet2012_real", "validation", embed_fn=bow_embed, cache_dir=str(tmp_path),
                                    set_width=64)
    assert len(src) == 6 and src.class_names[:2] == ["tench", "goldfish"]
    for i in range(6):
      ex, want = src[i], np.asarray(raw[i]["real_label"])
      assert ex["label"] == int(raw[i]["original_label"]) and ex["caption"] == src.captions[ex["label"]]
      assert ex["real_label"].dtype == np.int32 and ex["real_label"].shape == (64,)
      np.testing.assert_array_equal(ex["real_label"][:len(want)], want)
      assert (ex["real_label"][len(want):] == -1).all()
    # At the default width the mock's long sets are an error naming the example, not a silent cut.
    lengths = [len(raw[i]["real_label"]) for i in range(6)]
    first = next(i for i, n in enumerate(lengths) if n > sources.SET_WIDTH)
    narrow = sources.get_source("tfds:imagenet2012_real", "validation", embed_fn=bow_embed, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=f"real_label of example {first} has {lengths[first]} labels, more than "
                                         "the set width 16"):
      [narrow[i] for i in range(first + 1)]


def test_real_sets_ride_through_eval_batches_padded_with_minus_one(tmp_path, mesh):
  with tfds.testing.mock_data(as_data_source_fn=_controlled, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.get_source("tfds:imagenet2012_real", "validation", embed_fn=bow_embed, cache_dir=str(tmp_path))
    assert [src[i]["label"] for i in range(6)] == ORIGINAL
    batches = list(pipeline.eval_dataset(src, global_batch_size=8, image_size=16, mesh=mesh))
  assert len(batches) == 1
  b = batches[0]
  assert b["real_label"].shape == (8, 16) and b["real_label"].dtype == np.int32
  assert b["real_label"].sharding.spec == P("data")
  b = {k: np.asarray(v) for k, v in b.items()}
  assert b["valid"].tolist() == [True] * 6 + [False] * 2
  np.testing.assert_array_equal(b["label"], ORIGINAL + [-1, -1])
  for i, r in enumerate(REAL + [[], []]):  # the two padding rows: empty sets, all -1
    np.testing.assert_array_equal(b["real_label"][i], r + [-1] * (16 - len(r)))


def test_set_top1_counts_a_prediction_in_the_set_over_rows_with_a_set():
  pred = np.array([0, 1, 2, 3, 4, 5])
  sets = np.array([[0, 5, -1], [2, -1, -1], [-1, -1, -1], [9, 3, -1], [-1, -1, -1], [-1, 1, 7]])
  # Scored: rows 0 (hit), 1 (miss), 3 (hit), 5 (miss); rows 2 and 4 have no label and are left out.
  assert linear_probe.set_top1(pred, sets) == 0.5
  assert linear_probe.set_top1(np.array([-1, 0]), np.array([[-1, 0], [0, -1]])) == 0.5  # -1 is padding, not a label
  with pytest.raises(ValueError, match="none of the 2 rows has a label"):
    linear_probe.set_top1(np.array([0, 1]), np.full((2, 4), -1))
  with pytest.raises(ValueError, match=r"predictions \[N\] and label sets \[N, R\]"):
    linear_probe.set_top1(np.array([0, 1]), np.array([0, 1]))


def test_predict_is_the_argmax_optionally_among_some_classes(mesh):
  w = np.eye(4, dtype=np.float32) * np.array([1, 2, 3, 4], np.float32)
  probe = linear_probe.Probe(mean=np.zeros(4, np.float32), std=np.ones(4, np.float32), w=w,
                             b=np.zeros(4, np.float32), l2=0.0)
  x = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(linear_probe.predict(probe, x), [0, 1, 3, 0])  # a tie goes to the first class
  np.testing.assert_array_equal(linear_probe.predict(probe, x, mesh=mesh), [0, 1, 3, 0])
  np.testing.assert_array_equal(linear_probe.predict(probe, x, mesh=mesh, classes=[0, 2]), [0, 0, 2, 0])
  with pytest.raises(ValueError, match=r"classes must be a non-empty list of indices in \[0, 4\)"):
    linear_probe.predict(probe, x, classes=[4])


def _blobs(labels, k, seed):
  """Features 4 * onehot(label) + noise: a probe learns them exactly."""
  rng = np.random.default_rng(seed)
  return (4 * np.eye(k)[labels] + 0.3 * rng.normal(size=(len(labels), k))).astype(np.float32)


def test_linear_probe_evaluator_reports_real_top1(mesh):
  k = 8
  train_y = np.repeat(np.arange(k), 40).astype(np.int32)
  # The probe predicts each test row's `aim`; real sets (padded to 16) hit rows 0, 1, 3 and miss row 2; rows 4, 5
  # have no ReaL label. The original labels are right on rows 0, 2, 4.
  aim = np.array([1, 2, 3, 4, 5, 6])
  original = np.array([1, 0, 3, 0, 5, 0], np.int32)
  real = [[1, 6], [2], [0, 7], [4, 3, 2], [], []]
  real = np.array([r + [-1] * (16 - len(r)) for r in real], np.int32)
  rows = {"train": {"features": _blobs(train_y, k, 0), "label": train_y},
          "real": {"features": 4 * np.eye(k, dtype=np.float32)[aim], "label": original, "real_label": real}}
  config = ml_collections.ConfigDict({"data": {"train": "train", "train_split": "train", "eval": "real",
                                               "eval_split": "validation"}})
  data = evals.Features(lambda spec, split, n: rows[spec], config, mesh)
  out = evals.run_all(data, {"linear_probe": ml_collections.ConfigDict()})
  assert out["eval/linear_probe/top1"] == pytest.approx(3 / 6)
  assert out["eval/linear_probe/real_top1"] == pytest.approx(3 / 4)
  # Without a real_label field there is no real_top1.
  del rows["real"]["real_label"]
  assert "real_top1" not in linear_probe.evaluator(evals.Features(lambda s, p, n: rows[s], config, mesh),
                                                    evals.settings_for("linear_probe"))

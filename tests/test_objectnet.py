"""ObjectNet: the release's folder layout and mapping files, ImageNet class names to label indices, and the
evaluator on a tiny ObjectNet-like folder with features whose predictions are known."""
import json

import ml_collections
import numpy as np
import pytest

from tests.helpers import bow_embed, objectnet_folder
from xsample_jax import evals
from xsample_jax.data import sources
from xsample_jax.evals import objectnet

BACKPACK = "backpack, back pack, knapsack, packsack, rucksack, haversack"
MOUNTAIN_BIKE = "mountain bike, all-terrain bike, off-roader"
TANDEM = "bicycle-built-for-two, tandem bicycle, tandem"
# As the release spells them; air_freshener is one of the classes outside ImageNet.
FOLDER_MAP = {"alarm_clock": "Alarm clock", "backpack": "Backpack", "bicycle": "Bicycle",
              "air_freshener": "Air freshener"}
MAPPING = {"Alarm clock": "analog clock; digital clock", "Backpack": BACKPACK,
           "Bicycle": f"{MOUNTAIN_BIKE}; {TANDEM}"}
IMAGES = {"air_freshener": 1, "alarm_clock": 2, "backpack": 1, "bicycle": 3}  # sorted: labels 0..3
# A 6-class "ImageNet" in label order for the probe: the mapped classes and one more.
NAMES = ["analog clock", "digital clock", BACKPACK, MOUNTAIN_BIKE, TANDEM, "tench, Tinca tinca"]


def test_class_sets_in_the_standard_imagenet_order():
  names = objectnet.imagenet_names()
  assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
  sets = objectnet.class_sets(sorted(FOLDER_MAP), FOLDER_MAP, MAPPING, names)
  # ImageNet-1k: analog clock 409, digital clock 530, backpack 414, mountain bike 671, bicycle-built-for-two 444.
  np.testing.assert_array_equal(sets, [[-1, -1], [409, 530], [414, -1], [671, 444]])


def test_imagenet_class_index_files(tmp_path):
  (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n")
  (tmp_path / "list.json").write_text(json.dumps(NAMES))
  (tmp_path / "object.json").write_text(json.dumps({str(i): n for i, n in enumerate(NAMES)}))
  for f in ("names.txt", "list.json", "object.json"):
    assert objectnet.imagenet_names(str(tmp_path / f)) == NAMES
  (tmp_path / "bad.json").write_text(json.dumps({"1": "a", "2": "b"}))
  with pytest.raises(ValueError, match="keys must be 0..1"):
    objectnet.imagenet_names(str(tmp_path / "bad.json"))
  with pytest.raises(ValueError, match="ImageNet class 'analog clock' .*'Alarm clock'.* is not in the class index"):
    objectnet.class_sets(sorted(FOLDER_MAP), FOLDER_MAP, MAPPING, NAMES[1:])


@pytest.fixture
def release(tmp_path):
  root = objectnet_folder(tmp_path / "objectnet-1.0", IMAGES, FOLDER_MAP, MAPPING)
  (tmp_path / "imagenet_names.txt").write_text("\n".join(NAMES))
  return root, str(tmp_path / "imagenet_names.txt")


def _features(root, cache_dir, aims, extra=None, classes=6):
  """An extract: "train" gives blobs of `classes` classes in dim 6; the ObjectNet folder gives its real labels
  (from the folder source) and, for image key k, the feature 4 * onehot(aims[k]) (+ extra[k]), so the probe's
  prediction is aims[k]."""
  rng = np.random.default_rng(0)
  train_y = np.repeat(np.arange(classes), 40).astype(np.int32)
  train = {"features": (4 * np.eye(classes, 6)[train_y] + 0.3 * rng.normal(size=(len(train_y), 6))).astype(np.float32),
           "label": train_y}

  def extract(spec, split, n):
    if spec == "train":
      return train
    assert spec == f"folder:{root / 'images'}" and split == ""
    src = sources.get_source(spec, split, embed_fn=bow_embed, cache_dir=cache_dir)
    keys = [src[i]["key"] for i in range(len(src))]
    x = np.stack([4 * np.eye(6)[aims.get(k, 0)] + (extra or {}).get(k, 0) for k in keys]).astype(np.float32)
    return {"features": x, "label": np.array([src[i]["label"] for i in range(len(src))], np.int32)}
  return extract


def test_objectnet_evaluator_on_a_tiny_release(release, tmp_path, mesh):
  root, names = release
  aims = {"air_freshener/0.png": 0,  # not an overlapping class: not scored
          "alarm_clock/0.png": 1, "alarm_clock/1.png": 5,  # digital clock: right; tench: wrong
          "backpack/0.png": 2,  # right
          "bicycle/0.png": 4, "bicycle/1.png": 0, "bicycle/2.png": 3}  # tandem, analog clock, mountain bike
  # alarm_clock/1 leans to digital clock second: among the mapped classes only, it is right.
  extra = {"alarm_clock/1.png": 2 * np.eye(6)[1]}
  config = ml_collections.ConfigDict({"data": {"train": "train", "train_split": "train"}})
  data = evals.Features(_features(root, str(tmp_path / "cache"), aims, extra), config, mesh)
  settings = ml_collections.ConfigDict({"folder": str(root), "imagenet_class_index": names})
  out = evals.run_all(data, {"objectnet": settings})
  assert out["eval/objectnet/images"] == 6
  assert out["eval/objectnet/top1"] == pytest.approx(4 / 6)
  assert out["eval/objectnet/top1_subset"] == pytest.approx(5 / 6)


def test_objectnet_needs_its_folder_and_mapping_files(release, tmp_path, mesh):
  root, names = release
  config = ml_collections.ConfigDict({"data": {"train": "train", "train_split": "train"}})
  data = evals.Features(_features(root, str(tmp_path / "cache"), {}), config, mesh)
  with pytest.raises(ValueError, match="objectnet needs settings.folder"):
    objectnet.evaluator(data, evals.settings_for("objectnet"))
  (root / "mappings" / "objectnet_to_imagenet_1k.json").unlink()
  with pytest.raises(ValueError, match="ObjectNet -> ImageNet-1k class mapping .*objectnet_to_imagenet_1k.json "
                                       "does not exist"):
    objectnet.evaluator(data, evals.settings_for("objectnet", {"folder": str(root), "imagenet_class_index": names}))
  # settings.mapping points elsewhere; a 6-class index cannot name the labels of a 7-class training set.
  (tmp_path / "m.json").write_text(json.dumps(MAPPING))
  data = evals.Features(_features(root, str(tmp_path / "cache"), {}, classes=7), config, mesh)
  with pytest.raises(ValueError, match="training labels go up to 6 but the ImageNet class index names 6 classes"):
    settings = {"folder": str(root), "mapping": str(tmp_path / "m.json"), "imagenet_class_index": names}
    objectnet.evaluator(data, evals.settings_for("objectnet", settings))

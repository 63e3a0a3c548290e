"""Objects and attributes, MIT-States style: how linearly readable each factor of an image is from one feature.

MIT-States has no standard probe split, so the rows are split once, at random (seeded), into two halves; a
linear probe (`linear_probe.fit`, l2 chosen on a held-out part of the training half) is fitted on the first
half and scored on the second, once with the object labels and once with the attribute labels. Both use the same
split, so the two accuracies are of the same images. Each label set has max(label) + 1 classes; rows with a label
< 0 are ignored for that label set only (a row may have an object but no attribute).

    attributes.run(x, object_y, attribute_y, seed=0, mesh=mesh)    # {"object_top1": ..., "attribute_top1": ...}
"""
from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from xsample_jax.evals import linear_probe


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) row indices: a seeded random permutation of range(n), cut in half (test gets the odd row),
  each half in increasing order."""
  if n < 2:
    raise ValueError(f"need at least 2 rows to split in half, got {n}")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[:n // 2]), np.sort(perm[n // 2:])


SETTINGS = dict(folder="", object="label", attribute="attribute", seed=0)


def evaluator(data, settings) -> dict:
  """The evaluator entry. By default the rows of data.eval (`data.test(settings)`) with their int fields
  settings.object (default "label") and settings.attribute (default "attribute": the procedural dataset's object
  colour); with `settings.folder` = a MIT-States-style directory of "adjective noun" class folders, the object is
  the noun and the attribute the adjective of each image's folder name."""
  root = settings.folder
  if root:
    from xsample_jax.data import sources
    names = [n.replace("_", " ").strip() for n in sources.folder_classes(root)]
    rows = data.get(f"folder:{root}", "", settings.eval_examples)
    adjectives, nouns = zip(*(n.split(" ", 1) if " " in n else ("", n) for n in names))
    adj_ids = {a: i for i, a in enumerate(sorted(set(adjectives)))}
    noun_ids = {o: i for i, o in enumerate(sorted(set(nouns)))}
    object_y = np.array([noun_ids[nouns[y]] for y in rows["label"]], np.int32)
    attribute_y = np.array([adj_ids[adjectives[y]] for y in rows["label"]], np.int32)
  else:
    rows = data.test(settings)
    object_y, attribute_y = rows[settings.object], rows[settings.attribute]
  return run(rows["features"], object_y, attribute_y, seed=settings.seed, mesh=data.mesh)


def run(x, object_y, attribute_y, *, seed: int = 0, mesh: Mesh | None = None, **fit_kw) -> dict:
  """{"object_top1", "attribute_top1"} of [n, D] features, on the test half of `split_halves(n, seed)`.

  `seed` also seeds the probes' l2 holdouts; `fit_kw` goes to `linear_probe.fit` (e.g. l2=).
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"features must be [n, D], got shape {x.shape}")
  labels = {"object": np.asarray(object_y), "attribute": np.asarray(attribute_y)}
  for name, y in labels.items():
    if y.shape != (len(x),):
      raise ValueError(f"{name}_y must be [n] with n = {len(x)} rows of features, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"{name}_y must be integers, got dtype {y.dtype}")
    if len(y) and y.max() < 1:
      raise ValueError(f"{name}_y needs at least 2 classes (labels 0 and up), got max label "
                       f"{int(y.max())}")
  train, test = split_halves(len(x), seed)
  out = {}
  for name, y in labels.items():
    try:
      res = linear_probe.run(x[train], y[train], x[test], y[test], int(y.max()) + 1, mesh=mesh, seed=seed,
                             **fit_kw)
    except ValueError as e:
      raise ValueError(f"{name} labels: {e}") from e  # say which of the two probes failed
    out[f"{name}_top1"] = res["top1"]
  return out

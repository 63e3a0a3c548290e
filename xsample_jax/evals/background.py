"""Background reliance, ImageNet-9 style (Xiao et al. 2020, "Noise or Signal: The Role of Image Backgrounds
in Object Recognition"): one linear probe, fitted on the training features, scored on test splits that keep or
replace each object's background.

Split names follow the paper (and `data/procedural.py`, which generates original, mixed_same and mixed_rand):
  original: the test images as they are;
  only_fg: the object on a blank background;
  mixed_same: the object on the background of another image of the same class;
  mixed_rand: the object on the background of an image of a random class.
Any other name is scored too; the gaps below are reported only when both of their splits are given.

  bg_gap = mixed_same/top1 - mixed_rand/top1: the paper's BG-Gap. Both splits have the object on a foreign
    background; only whether that background matches the class changes, so the gap is what the background's
    class signal is worth to the classifier. 0 for a classifier that ignores backgrounds.
  shift_gap = original/top1 - mixed_rand/top1: the whole drop from natural images to random backgrounds (the
    BG-Gap plus the cost of pasted, unnatural backgrounds).

Accuracies and gaps are fractions in [0, 1] (not percentage points), as Python floats.

    background.run(train_x, train_y, {"original": (x, y), "mixed_same": (x, y), "mixed_rand": (x, y)}, 9)
    # {"original/top1", "mixed_same/top1", "mixed_rand/top1", "bg_gap", "shift_gap", "l2"}
"""
from __future__ import annotations

from collections.abc import Mapping

from jax.sharding import Mesh

from xsample_jax.evals import linear_probe

# name -> (minuend split, subtrahend split), both top-1.
GAPS = {"bg_gap": ("mixed_same", "mixed_rand"), "shift_gap": ("original", "mixed_rand")}


# The public ImageNet-9 ("backgrounds challenge") release: ROOT/SPLIT/val/CLASS/*.JPEG, with ROOT/original/train.
IMAGENET9_SPLITS = ("original", "only_fg", "mixed_same", "mixed_rand")


SETTINGS = dict(folder="", splits=("original", "mixed_same", "mixed_rand"))


def evaluator(data, settings) -> dict:
  """The evaluator entry. By default the probe is fitted on data.train and scored on the `settings.splits` of
  data.eval (the procedural dataset's original / mixed_same / mixed_rand); with `settings.folder` = an ImageNet-9
  release directory, fitted on ROOT/original/train and scored on ROOT/SPLIT/val for its four splits."""
  n, root = settings.eval_examples, settings.folder
  if root:
    train = data.get(f"folder:{root}/original", "train", settings.train_examples)
    tests = {s: data.get(f"folder:{root}/{s}", "val", n) for s in IMAGENET9_SPLITS}
  else:
    train = data.train(settings)
    spec = settings.eval_data or data.config.data.eval
    tests = {s: data.get(spec, s, n) for s in settings.splits}
  label = settings.label
  k = int(max([train[label].max()] + [t[label].max() for t in tests.values()])) + 1
  return run(train["features"], train[label], {s: (t["features"], t[label]) for s, t in tests.items()}, k,
             mesh=data.mesh)


def run(train_x, train_y, splits: Mapping, num_classes: int, *, mesh: Mesh | None = None, **fit_kw) -> dict:
  """"{split}/top1" for every (features, labels) pair in `splits`, the gaps, and the probe's "l2".

  One probe (`linear_probe.fit(train_x, train_y, num_classes, mesh=mesh, **fit_kw)`) scores every split, so
  the differences between splits come from the test images alone.
  """
  if not isinstance(splits, Mapping) or not splits:
    raise ValueError(f"splits must be a non-empty dict of name -> (features, labels), got {splits!r:.80}")
  for name, pair in splits.items():
    if not isinstance(name, str) or not name or "/" in name:
      raise ValueError(f"split names must be non-empty strings without '/', got {name!r}")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"split {name!r} must be a (features, labels) pair, got {type(pair).__name__}")
  probe = linear_probe.fit(train_x, train_y, num_classes, mesh=mesh, **fit_kw)
  out = {}
  for name, (x, y) in splits.items():
    try:
      out[f"{name}/top1"] = linear_probe.evaluate(probe, x, y, mesh=mesh)["top1"]
    except ValueError as e:
      raise ValueError(f"split {name!r}: {e}") from e  # say which split, not just "the test set"
  for gap, (a, b) in GAPS.items():
    if a in splits and b in splits:
      out[gap] = out[f"{a}/top1"] - out[f"{b}/top1"]
  out["l2"] = probe.l2
  return out

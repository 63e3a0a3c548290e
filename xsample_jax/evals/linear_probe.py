"""Linear probe: L2-regularised multinomial logistic regression on frozen features, on device.

    objective(W, b) = mean_i CE(softmax(z_i W + b), y_i) + l2 * ||W||^2      (no penalty on b)

where z = (x - mean) / std with mean and std fitted on the training rows only (a feature whose std is 0 keeps
std 1). It is minimised full-batch by L-BFGS (optax.lbfgs with its zoom linesearch) inside one jitted
while_loop, until the gradient norm falls below `tol` times its value at W = 0, b = 0, or after `steps`
iterations. The objective is strictly convex for l2 > 0, so the solution does not depend on the device layout.

With a mesh, the [N, D] features and [N] labels are global arrays split by rows over the 'data' axis (N padded
up to a multiple of its size with zero-weight rows) and W, b are replicated: each device holds N / n_data rows
and XLA all-reduces the gradient, which is how ImageNet's 1.28M x 2048 features fit. Inputs are host arrays
(NumPy); each device's rows are copied to it without forming a padded copy on the host.

Rows with a label < 0 are padding: they get weight 0 in the fit and are not counted in the accuracies.

    probe = linear_probe.fit(train_x, train_y, num_classes=1000, mesh=mesh)    # l2 picked on a held-out 20%
    linear_probe.evaluate(probe, test_x, test_y, mesh=mesh)                     # {"top1": ..., "top5": ...}
    linear_probe.run(train_x, train_y, test_x, test_y, 1000, mesh=mesh)         # the above + {"l2": ...}
    linear_probe.predict(probe, test_x, mesh=mesh)                              # int32 [N]: each row's class
    linear_probe.set_top1(pred, sets)        # accuracy against a set of right answers per row (ReaL, ObjectNet)

The evaluator also reports `real_top1` when the test rows carry ImageNet ReaL labels (tfds:imagenet2012_real,
whose "real_label" field is each image's set of ReaL labels, padded with -1): Beyer et al. 2020, "Are we done with
ImageNet?": a prediction is right if it is one of the image's ReaL labels, over the images that have any.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xsample_jax.sharding import DATA

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
STEPS = 1000
TOL = 1e-7
_PATIENCE = 20
# Full f32 matmuls: TPU's default (bf16 passes) and GPU's TF32 would leave gradient noise L-BFGS cannot get under.
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class Probe:
  """A fitted probe, on the host. Logits of raw features x: ((x - mean) / std) @ w + b."""
  mean: np.ndarray  # [D] float32, of the training rows
  std: np.ndarray  # [D] float32, of the training rows; 1 where it was 0
  w: np.ndarray  # [D, K] float32
  b: np.ndarray  # [K] float32
  l2: float
  # l2 -> held-out top-1, when l2 was chosen from a grid; else None.
  holdout_top1: dict | None = None
  # How the final fit ended: L-BFGS iterations, final objective, gradient norm relative to the one at zero.
  steps: int = 0
  objective: float = math.nan
  grad_rel: float = math.nan

  @property
  def num_classes(self) -> int:
    return int(self.b.shape[0])


# ------------------------------------------------------------------------------------------------------------
# Public entry points.


def fit(train_x, train_y, num_classes: int, *, mesh: Mesh | None = None, l2: float | None = None,
        l2_grid=L2_GRID, holdout_fraction: float = 0.2, steps: int = STEPS, tol: float = TOL,
        seed: int = 0) -> Probe:
  """Fits the probe on [N, D] features and [N] int labels (labels < 0 are ignored).

  With l2=None, l2 is the value of `l2_grid` with the best top-1 on a random `holdout_fraction` of the
  training rows (seeded; ties go to the larger l2) when fitted on the rest, standardised with the rest's
  statistics; the probe is then refitted on all training rows with that l2.
  """
  x, y = _check_xy(train_x, train_y, num_classes, "train")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if not tol >= 0:
    raise ValueError(f"tol must be >= 0, got {tol}")
  valid = y >= 0
  if not valid.any():
    raise ValueError("the train set is empty: no rows with a label >= 0")
  if l2 is None:
    grid = sorted({float(v) for v in l2_grid}, reverse=True)
    if not grid or any(not (v >= 0 and math.isfinite(v)) for v in grid):
      raise ValueError(f"l2_grid must be a non-empty sequence of finite values >= 0, got {l2_grid!r}")
    fit_w, hold_w = _holdout_split(valid, holdout_fraction, seed)
  else:
    l2 = float(l2)
    if not (l2 >= 0 and math.isfinite(l2)):
      raise ValueError(f"l2 must be a finite value >= 0, got {l2}")
  xd, yd, sharding, rep = _put(x, y, mesh)
  n_pad = xd.shape[0]

  holdout_top1 = None
  if l2 is None:
    fit_wd = _put_rows(fit_w, n_pad, sharding, 0.0, np.float32)
    hold_wd = _put_rows(hold_w, n_pad, sharding, 0.0, np.float32)
    mean, std = _stats(xd, fit_wd, x[np.flatnonzero(fit_w)[0]])
    z = _standardise(xd, yd >= 0, mean, std)
    params = _zeros(x.shape[1], num_classes, rep)
    holdout_top1 = {}
    # Largest l2 first, each fit warm-started from the previous one: the path along which L-BFGS moves least.
    for v in grid:
      params, *_ = _lbfgs(params, z, yd, fit_wd, jnp.float32(v), steps, tol, rep)
      top1, _, n = _scores(params, z, yd, hold_wd)
      holdout_top1[v] = float(top1) / float(n)
    del z
    l2 = max(grid, key=lambda v: (holdout_top1[v], v))

  # The final fit starts from zero, so fit(l2=None) and fit(l2=<the value it chose>) give the same probe.
  wd = _put_rows(valid.astype(np.float32), n_pad, sharding, 0.0, np.float32)
  mean, std = _stats(xd, wd, x[np.flatnonzero(valid)[0]])
  z = _standardise(xd, yd >= 0, mean, std)
  params, count, value, grad_rel = _lbfgs(_zeros(x.shape[1], num_classes, rep), z, yd, wd, jnp.float32(l2),
                                          steps, tol, rep)
  return Probe(mean=np.asarray(mean), std=np.asarray(std), w=np.asarray(params["w"]), b=np.asarray(params["b"]),
               l2=l2, holdout_top1=holdout_top1, steps=int(count), objective=float(value),
               grad_rel=float(grad_rel))


def evaluate(probe: Probe, test_x, test_y, *, mesh: Mesh | None = None) -> dict:
  """{"top1": ..., "top5": ...} (top5 only when num_classes > 5) over the rows with a label >= 0.

  The test features are standardised with the probe's (training) mean and std, never their own. A row counts
  as correct at k when fewer than k other classes score at least as high as its label (ties count against it).
  """
  x, y = _check_xy(test_x, test_y, probe.num_classes, "test")
  if x.shape[1] != probe.mean.shape[0]:
    raise ValueError(f"test features have dim {x.shape[1]} but the probe was fitted on dim {probe.mean.shape[0]}")
  if not (y >= 0).any():
    raise ValueError("the test set is empty: no rows with a label >= 0")
  xd, yd, _, rep = _put(x, y, mesh)
  params, mean, std = jax.device_put(({"w": probe.w, "b": probe.b}, probe.mean, probe.std), rep)
  z = _standardise(xd, yd >= 0, mean, std)
  top1, top5, n = (float(v) for v in _scores(params, z, yd, (yd >= 0).astype(jnp.float32)))
  out = {"top1": top1 / n}
  if probe.num_classes > 5:
    out["top5"] = top5 / n
  return out


def predict(probe: Probe, x, *, mesh: Mesh | None = None, classes=None) -> np.ndarray:
  """int32 [N]: the probe's class for each row of raw features x [N, D] (the first of equal top scores), or the
  best of `classes` (a sequence of class indices) when given."""
  x, _ = _check_xy(x, np.zeros(len(x), np.int32), probe.num_classes, "test")
  if x.shape[1] != probe.mean.shape[0]:
    raise ValueError(f"features have dim {x.shape[1]} but the probe was fitted on dim {probe.mean.shape[0]}")
  allowed = np.ones(probe.num_classes, bool)
  if classes is not None:
    classes = np.asarray(classes, np.int64).reshape(-1)
    if not len(classes) or classes.min() < 0 or classes.max() >= probe.num_classes:
      raise ValueError(f"classes must be a non-empty list of indices in [0, {probe.num_classes}), got {classes!r:.80}")
    allowed[:] = False
    allowed[classes] = True
  xd, yd, _, rep = _put(x, np.zeros(len(x), np.int32), mesh)
  params, mean, std, allowed = jax.device_put(({"w": probe.w, "b": probe.b}, probe.mean, probe.std, allowed), rep)
  return np.asarray(_argmax(params, _standardise(xd, yd >= 0, mean, std), allowed, rep))[:len(x)]


def set_top1(pred, sets) -> float:
  """The fraction of rows whose prediction pred [N] is one of the row's right answers sets [N, R] (int, padded
  with -1), over the rows with at least one; rows with none are left out (ReaL's images without ReaL labels)."""
  pred, sets = np.asarray(pred), np.asarray(sets)
  if pred.ndim != 1 or sets.ndim != 2 or len(sets) != len(pred):
    raise ValueError(f"need predictions [N] and label sets [N, R], got shapes {pred.shape} and {sets.shape}")
  rows = (sets >= 0).any(axis=1)
  if not rows.any():
    raise ValueError(f"none of the {len(sets)} rows has a label in its set: nothing to score")
  hit = ((sets == pred[:, None]) & (sets >= 0)).any(axis=1)
  return float(hit[rows].mean())


def run(train_x, train_y, test_x, test_y, num_classes: int, **kw) -> dict:
  """fit on the train split, evaluate on the test split: {"top1", "top5" (num_classes > 5), "l2"}."""
  probe = fit(train_x, train_y, num_classes, **kw)
  return {**evaluate(probe, test_x, test_y, mesh=kw.get("mesh")), "l2": probe.l2}


# ------------------------------------------------------------------------------------------------------------
# Host side: checks, the holdout split, placement.


SETTINGS = {}  # only the common ones (evals.COMMON)


def evaluator(data, settings) -> dict:
  """The evaluator entry: fit on `data.train(settings)`, score on `data.test(settings)` (see evals/__init__.py);
  settings.label names the int field to predict (default "label"). Test rows with a "real_label" set field
  (tfds:imagenet2012_real) also give `real_top1`."""
  tr, te, label, k = data.classification(settings)
  probe = fit(tr["features"], tr[label], k, mesh=data.mesh)
  out = {**evaluate(probe, te["features"], te[label], mesh=data.mesh), "l2": probe.l2}
  if "real_label" in te:
    out["real_top1"] = set_top1(predict(probe, te["features"], mesh=data.mesh), te["real_label"])
  return out


def _check_xy(x, y, num_classes, split):
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2:
    raise ValueError(f"{split} features must be [N, D], got shape {x.shape}")
  if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
    raise ValueError(f"{split} features must be numeric, got dtype {x.dtype}")
  if y.ndim != 1:
    raise ValueError(f"{split} labels must be [N], got shape {y.shape}")
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"{split} features and labels have different lengths: {x.shape[0]} rows vs {y.shape[0]} labels")
  if x.shape[0] == 0:
    raise ValueError(f"the {split} set is empty: 0 rows")
  if x.shape[1] == 0:
    raise ValueError(f"{split} features have dim 0")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{split} labels must be integers, got dtype {y.dtype}")
  if y.max() >= num_classes:
    raise ValueError(f"{split} labels must be < num_classes={num_classes}, got a label {int(y.max())}")
  return x, y.astype(np.int32)


def _holdout_split(valid, fraction, seed):
  """0/1 weights of the fit part and the held-out part, a seeded random split of the valid rows."""
  if not 0 < fraction < 1:
    raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
  idx = np.flatnonzero(valid)
  n_hold = int(round(fraction * len(idx)))
  if not 0 < n_hold < len(idx):
    raise ValueError(f"holdout_fraction={fraction} of {len(idx)} labelled rows leaves an empty fit or held-out "
                     "part; pass l2= or use more rows")
  hold = np.random.default_rng(seed).permutation(idx)[:n_hold]
  hold_w = np.zeros(len(valid), np.float32)
  hold_w[hold] = 1
  return valid.astype(np.float32) - hold_w, hold_w


def _put(x, y, mesh):
  """Features and labels as device arrays, rows split over the mesh's 'data' axis (padded rows: label -1).

  Also returns the rows' sharding and the replicated one for W, b.
  """
  if mesh is None:
    sharding = rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    n_pad = len(x)
  else:
    sharding, rep = NamedSharding(mesh, P(DATA)), NamedSharding(mesh, P())
    n_pad = -(-len(x) // mesh.shape[DATA]) * mesh.shape[DATA]
  xd, yd = _put_rows(x, n_pad, sharding, 0.0, np.float32), _put_rows(y, n_pad, sharding, -1, np.int32)
  return xd, yd, sharding, rep


def _put_rows(a, n_pad, sharding, fill, dtype):
  """`a` padded with `fill` rows to n_pad, each device getting only its own rows (no padded host copy)."""
  n = len(a)

  def shard(index):
    start, stop, _ = index[0].indices(n_pad)
    out = np.full((stop - start,) + a.shape[1:], fill, dtype)
    hi = min(stop, n)
    if hi > start:
      out[:hi - start] = a[start:hi]
    return out[(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback((n_pad,) + a.shape[1:], sharding, shard)


# ------------------------------------------------------------------------------------------------------------
# Device side (jit).


@jax.jit
def _stats_impl(x, wt, x0):
  # Shifted by one training row: a constant feature then has exactly 0 variance (std 1), not rounding noise.
  used = wt[:, None] > 0
  d = jnp.where(used, x - x0, 0.0)
  n = jnp.sum(wt)
  mean_d = jnp.sum(wt[:, None] * d, axis=0) / n
  var = jnp.sum(wt[:, None] * jnp.square(jnp.where(used, d - mean_d, 0.0)), axis=0) / n
  std = jnp.sqrt(var)
  finite = jnp.all(jnp.isfinite(x) | ~used)
  return x0 + mean_d, jnp.where(std > 0, std, 1.0), finite


def _stats(x, wt, x0):
  mean, std, finite = _stats_impl(x, wt, jnp.asarray(x0, jnp.float32))
  if not bool(finite):
    raise ValueError("the train features contain NaN or inf")
  return mean, std


@jax.jit
def _standardise(x, valid, mean, std):
  # Ignored rows become 0 so that a NaN there cannot reach the gradient through 0 * NaN.
  return jnp.where(valid[:, None], (x - mean) / std, 0.0)


def _zeros(d, k, rep):
  # Placed (committed) like the fits' outputs, so warm starts reuse the same compiled L-BFGS.
  return jax.device_put({"w": jnp.zeros((d, k), jnp.float32), "b": jnp.zeros((k,), jnp.float32)}, rep)


def _logits(params, z):
  return jnp.dot(z, params["w"], precision=_HIGHEST) + params["b"]


def _objective(params, z, y, wt, l2):
  logits = _logits(params, z)
  true = jnp.take_along_axis(logits, jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
  ce = jax.nn.logsumexp(logits, axis=1) - true
  return jnp.sum(wt * ce) / jnp.sum(wt) + l2 * jnp.sum(jnp.square(params["w"]))


@functools.partial(jax.jit, static_argnums=(7,))
def _lbfgs(params, z, y, wt, l2, steps, tol, rep):
  """L-BFGS from `params`: (params, iterations, objective, |grad| / |grad at zero|)."""
  fun = lambda p: _objective(p, z, y, wt, l2)
  opt = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=30,
                                                              initial_guess_strategy="one"))
  value_and_grad = optax.value_and_grad_from_state(fun)
  # The scale the tolerance is relative to: the gradient at W = 0, b = 0, whatever the starting point.
  g0 = optax.tree.norm(jax.grad(fun)(jax.tree.map(jnp.zeros_like, params)))

  def grad_rel(state):
    return optax.tree.norm(optax.tree.get(state, "grad")) / g0

  def cond(carry):
    _, state, _, stale = carry
    count = optax.tree.get(state, "count")
    # `stale`: iterations since the gradient norm last reached a new low. Once float32 is exhausted the
    # objective stops changing and the gradient only jitters; `tol` may never be reached.
    return (count == 0) | ((count < steps) & (grad_rel(state) > tol) & (stale < _PATIENCE))

  def body(carry):
    params, state, best, stale = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    # W and b stay replicated: XLA all-reduces their gradient rather than picking another layout.
    params = jax.lax.with_sharding_constraint(optax.apply_updates(params, updates), rep)
    g = grad_rel(state)
    return params, state, jnp.minimum(best, g), jnp.where(g < best, 0, stale + 1)

  init = (params, opt.init(params), jnp.float32(jnp.inf), jnp.int32(0))
  params, state, _, _ = jax.lax.while_loop(cond, body, init)
  return params, optax.tree.get(state, "count"), optax.tree.get(state, "value"), grad_rel(state)


@functools.partial(jax.jit, static_argnums=(3,))
def _argmax(params, z, allowed, rep):
  # Replicated, so every process can read all the predictions.
  pred = jnp.argmax(jnp.where(allowed, _logits(params, z), -jnp.inf), axis=1).astype(jnp.int32)
  return jax.lax.with_sharding_constraint(pred, rep)


@jax.jit
def _scores(params, z, y, wt):
  """Weighted counts of rows correct at 1 and at 5, and the total weight."""
  logits = _logits(params, z)
  true = jnp.take_along_axis(logits, jnp.maximum(y, 0)[:, None], axis=1)
  # Other classes scoring at least as high as the label; `~(l < t)` also counts NaNs against the row.
  rank = jnp.sum(~(logits < true), axis=1) - 1
  return jnp.sum(wt * (rank < 1)), jnp.sum(wt * (rank < 5)), jnp.sum(wt)

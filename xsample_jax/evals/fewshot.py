"""Few-shot linear classification by closed-form ridge regression, as big_vision's fewshot_lsr evaluator.

For n shots, a draw takes n random training rows of every class (n * K rows), standardises them with their own
mean and std (a feature whose std is 0 keeps std 1), and fits

    W, b = argmin  sum_i ||z_i W + b - t_i||^2 + l2 * ||W||^2        (no penalty on b)

to targets t_i = 2 * onehot(y_i) - 1 in {-1, +1}. The test set is standardised with the *drawn rows'* mean and
std and a row is correct when its label scores highest (ties count against it). The result is the mean top-1
over `draws` draws and its std (ddof=0, so one draw gives 0).

big_vision appends a constant feature of 100 for the bias, which puts l2 / 100^2 on it; this is the limit of
that with no penalty, computed exactly: z has mean 0 over the drawn rows, so b = mean_i t_i and W is the ridge
solution of the centred problem, (z^T z + l2 I)^-1 z^T t, or z^T (z z^T + l2 I)^-1 t when n * K < dim (the same
matrix, the smaller system). The draws take n rows of every class, so b is the same for every class and
{0, 1} targets would only scale W by 1/2: neither changes a prediction.

l2 defaults to big_vision's 2^10 (its common_fewshot config) with its objective, a sum over rows on
standardised features: the reference numbers for 768- to 2048-dim representations use it. In that objective
the penalty weighs less as n grows (the data term sums n * K rows); that is big_vision's choice, kept so the
numbers compare.

Draw d samples with numpy's default_rng((seed, d)): the same seed gives the same rows and the same numbers, and
draw d does not depend on how many draws there are. Within a draw the n-shot rows are the first n of one random
order per class, so the 1-shot rows are among the 5-shot rows (as in big_vision). A class with fewer labelled
training rows than the largest n is an error naming it; skipping would report a number not comparable to
anyone else's.

Rows with a label < 0 are padding: never drawn, not counted in the test accuracy.

    fewshot.run(train_x, train_y, test_x, test_y, 1000)    # {"1shot": ..., "1shot_std": ..., "5shot": ...}
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from xsample_jax.evals.linear_probe import Probe, _check_xy, _put, _scores, _standardise

SHOTS = (1, 5, 10, 25)
DRAWS = 5
L2 = 2.0 ** 10
# Full f32 matmuls: bf16 passes (TPU default) or TF32 (GPU) in the Gram matrix would cost the solve digits.
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------------------
# Public entry points.


SETTINGS = dict(shots=SHOTS, draws=DRAWS, seed=0, l2=L2)


def evaluator(data, settings) -> dict:
  """The evaluator entry: n-shot classifiers drawn from data.train's rows, scored on data.eval's; settings shots
  ((1, 5, 10, 25)), draws (5), seed (0), l2 (2**10), label ("label")."""
  tr, te, label, n = data.classification(settings)
  return run(tr["features"], tr[label], te["features"], te[label], n, shots=tuple(settings.shots),
             draws=settings.draws, seed=settings.seed, l2=settings.l2,
             mesh=data.mesh)


def run(train_x, train_y, test_x, test_y, num_classes: int, *, shots=SHOTS, draws: int = DRAWS, seed: int = 0,
        l2: float = L2, mesh: Mesh | None = None) -> dict:
  """{"{n}shot": mean top-1, "{n}shot_std": its std over the draws} for each n in `shots`.

  With a mesh, the test rows are split over its 'data' axis (each fit is small and replicated).
  """
  x, y = _check_xy(train_x, train_y, num_classes, "train")
  tx, ty = _check_xy(test_x, test_y, num_classes, "test")
  if tx.shape[1] != x.shape[1]:
    raise ValueError(f"test features have dim {tx.shape[1]} but the train features have dim {x.shape[1]}")
  l2 = _check_l2(l2)
  if not (ty >= 0).any():
    raise ValueError("the test set is empty: no rows with a label >= 0")
  shots = _check_shots(shots)
  idx = sample(y, num_classes, shots=shots, draws=draws, seed=seed)

  txd, tyd, _, rep = _put(tx, ty, mesh)
  if int(_nonfinite(txd, tyd >= 0)):
    raise ValueError("the test features contain NaN or inf")
  n_test = int(np.sum(ty >= 0))
  correct = {n: [] for n in shots}
  for d in range(draws):
    for n in shots:
      rows = idx[d, :, :n].reshape(-1)
      xs = x[rows].astype(np.float32)
      if not np.all(np.isfinite(xs)):
        raise ValueError(f"the train features contain NaN or inf (in the rows of draw {d}, {n} shots)")
      xs, ys = jax.device_put((xs, y[rows]), rep)
      mean, std, w, b = _fit(xs, ys, jnp.float32(l2), num_classes)
      correct[n].append(_correct(mean, std, w, b, txd, tyd))  # left on device until every fit is queued
  out = {}
  for n in shots:
    acc = np.array([int(c) for c in correct[n]]) / n_test
    out[f"{n}shot"], out[f"{n}shot_std"] = float(acc.mean()), float(acc.std())
  return out


def sample(train_y, num_classes: int, *, shots=SHOTS, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
  """[draws, num_classes, max(shots)] training row indices: draw d's n-shot rows are [d, :, :n]."""
  y = np.asarray(train_y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.max() >= num_classes):
    raise ValueError(f"train labels must be [N] ints < num_classes={num_classes}")
  shots = _check_shots(shots)
  if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 1:
    raise ValueError(f"draws must be an int >= 1, got {draws!r}")
  counts = np.bincount(y[y >= 0], minlength=num_classes)
  short = int(np.argmin(counts))
  if counts[short] < shots[-1]:
    n = min(s for s in shots if s > counts[short])
    raise ValueError(f"class {short} has {counts[short]} labelled training rows, fewer than {n} shots; "
                     f"pass shots= with at most {counts[short]}")
  order = np.argsort(y, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)]) + np.sum(y < 0)
  out = np.empty((draws, num_classes, shots[-1]), np.int64)
  for d in range(draws):
    rng = np.random.default_rng((seed, d))
    for c in range(num_classes):
      out[d, c] = rng.choice(order[starts[c]:starts[c + 1]], shots[-1], replace=False)
  return out


def fit(x, y, num_classes: int, *, l2: float = L2) -> Probe:
  """The ridge fit of one draw: x [n * K, D] and y [n * K] are the drawn rows (every label in [0, K)); a linear
  classifier on standardised features like the probe's, scored as ((x - mean) / std) @ w + b."""
  x, y = _check_xy(x, y, num_classes, "train")
  if np.any(y < 0):
    raise ValueError("fit takes the drawn rows only: got labels < 0")
  mean, std, w, b = _fit(jnp.asarray(x, jnp.float32), jnp.asarray(y), jnp.float32(_check_l2(l2)), num_classes)
  return Probe(mean=np.asarray(mean), std=np.asarray(std), w=np.asarray(w), b=np.asarray(b), l2=float(l2))


# ------------------------------------------------------------------------------------------------------------
# Host side: checks.


def _check_l2(l2):
  l2 = float(l2)
  # > 0, not >= 0: with fewer rows than features the unpenalised system is singular.
  if not (l2 > 0 and math.isfinite(l2)):
    raise ValueError(f"l2 must be a finite value > 0, got {l2}")
  return l2


def _check_shots(shots):
  shots = tuple(shots)
  if not shots or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shots):
    raise ValueError(f"shots must be a non-empty sequence of ints >= 1, got {shots!r}")
  return tuple(sorted({int(n) for n in shots}))


# ------------------------------------------------------------------------------------------------------------
# Device side (jit).


@functools.partial(jax.jit, static_argnums=(3,))
def _fit(x, y, l2, num_classes):
  # Shifted by one drawn row: a constant feature then has exactly 0 variance (std 1), not rounding noise.
  d = x - x[0]
  mean_d = jnp.mean(d, axis=0)
  std = jnp.sqrt(jnp.mean(jnp.square(d - mean_d), axis=0))
  std = jnp.where(std > 0, std, 1.0)
  z = (d - mean_d) / std
  t = 2.0 * jax.nn.one_hot(y, num_classes, dtype=jnp.float32) - 1.0
  b = jnp.mean(t, axis=0)
  tc = t - b
  rows, dim = z.shape
  # Positive definite for l2 > 0: a Cholesky solve of whichever system is smaller.
  if rows >= dim:
    gram = jnp.dot(z.T, z, precision=_HIGHEST) + l2 * jnp.eye(dim, dtype=z.dtype)
    w = jax.scipy.linalg.solve(gram, jnp.dot(z.T, tc, precision=_HIGHEST), assume_a="pos")
  else:
    gram = jnp.dot(z, z.T, precision=_HIGHEST) + l2 * jnp.eye(rows, dtype=z.dtype)
    w = jnp.dot(z.T, jax.scipy.linalg.solve(gram, tc, assume_a="pos"), precision=_HIGHEST)
  return x[0] + mean_d, std, w, b


@jax.jit
def _correct(mean, std, w, b, x, y):
  """Test rows whose label scores strictly above every other class (the probe's own counting)."""
  valid = y >= 0
  return _scores({"w": w, "b": b}, _standardise(x, valid, mean, std), y, valid.astype(jnp.float32))[0]


@jax.jit
def _nonfinite(x, valid):
  return jnp.sum(valid & ~jnp.all(jnp.isfinite(x), axis=1))

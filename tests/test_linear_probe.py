"""Linear probe against a float64 NumPy reference, on separable and random data, sharded = unsharded, bad input.

Every fit here has N = 403 training rows of dim 16 and 10 classes (403 is not a multiple of 8, so the sharded
fits pad), so the jitted L-BFGS compiles once per layout.
"""
import numpy as np
import pytest

from xsample_jax import evals
from xsample_jax.evals import linear_probe

N, D, K = 403, 16, 10


def blobs(n, seed, noise=1.0, centers_seed=0):
  """K Gaussian blobs around fixed centres, off-centre and unevenly scaled so standardisation matters."""
  centers = np.random.default_rng(centers_seed).normal(size=(K, D)) * 3
  rng = np.random.default_rng(seed)
  y = rng.integers(0, K, n)
  x = centers[y] + noise * rng.normal(size=(n, D))
  return (x * np.linspace(0.5, 4, D) + 5).astype(np.float32), y


# ------------------------------------------------------------------------------------------------------------
# The reference: float64 NumPy, from the formula (not from linear_probe.py).


def ref_objective_and_grad(w, b, z, y, l2):
  logits = z @ w + b
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=1, keepdims=True)
  n = len(y)
  ce = -np.mean(np.log(p[np.arange(n), y]))
  p[np.arange(n), y] -= 1
  return ce + l2 * np.sum(w * w), z.T @ p / n + 2 * l2 * w, p.sum(axis=0) / n


def ref_gradient_descent(z, y, l2, iters=6000):
  """Nesterov-accelerated gradient descent with step 1/L, L a bound on the Hessian's largest eigenvalue."""
  lip = 0.5 * np.linalg.norm(np.c_[z, np.ones(len(z))], 2) ** 2 / len(z) + 2 * l2
  w, b = np.zeros((z.shape[1], K)), np.zeros(K)
  w_prev, b_prev = w, b
  for t in range(iters):
    vw, vb = w + t / (t + 3) * (w - w_prev), b + t / (t + 3) * (b - b_prev)
    _, gw, gb = ref_objective_and_grad(vw, vb, z, y, l2)
    w_prev, b_prev = w, b
    w, b = vw - gw / lip, vb - gb / lip
  return w, b


def test_fit_is_the_float64_optimum():
  x, y = blobs(N, seed=1, noise=3.0)  # overlapping classes: a finite, well-defined optimum
  l2 = 1e-3
  probe = linear_probe.fit(x, y, K, l2=l2)

  x64 = x.astype(np.float64)
  # float32 statistics: rounding on the scale of the features' magnitude.
  np.testing.assert_allclose(probe.mean, x64.mean(axis=0), rtol=1e-6, atol=1e-6 * np.abs(x64).max())
  np.testing.assert_allclose(probe.std, x64.std(axis=0), rtol=1e-5)
  z = (x64 - x64.mean(axis=0)) / x64.std(axis=0)

  # The float64 gradient at the float32 solution is ~0 relative to its size at W = 0, b = 0.
  f, gw, gb = ref_objective_and_grad(probe.w.astype(np.float64), probe.b.astype(np.float64), z, y, l2)
  _, gw0, gb0 = ref_objective_and_grad(np.zeros((D, K)), np.zeros(K), z, y, l2)
  g, g0 = np.sqrt(np.sum(gw ** 2) + np.sum(gb ** 2)), np.sqrt(np.sum(gw0 ** 2) + np.sum(gb0 ** 2))
  assert g < 1e-6 * g0, (g, g0)
  assert abs(probe.objective - f) < 1e-5 * f

  # ... and no worse than a float64 first-order solver run to convergence, whose W, b it matches.
  w_ref, b_ref = ref_gradient_descent(z, y, l2)
  f_ref, gw_ref, gb_ref = ref_objective_and_grad(w_ref, b_ref, z, y, l2)
  assert np.sqrt(np.sum(gw_ref ** 2) + np.sum(gb_ref ** 2)) < 1e-8 * g0  # the reference itself converged
  assert f <= f_ref + 1e-7 * f_ref, (f, f_ref)
  np.testing.assert_allclose(probe.w, w_ref, atol=1e-5 * np.abs(w_ref).max())
  # b is defined up to a constant (softmax): compare centred.
  np.testing.assert_allclose(probe.b - probe.b.mean(), b_ref - b_ref.mean(), atol=1e-5 * np.abs(b_ref).max())


def test_separable_blobs_are_learned():
  x, y = blobs(N, seed=1)
  tx, ty = blobs(2000, seed=2)
  out = linear_probe.run(x, y, tx, ty, K)
  assert set(out) == {"top1", "top5", "l2"}
  assert all(isinstance(v, float) for v in out.values())
  assert out["top1"] > 0.95 and out["top5"] >= out["top1"]
  assert out["l2"] in linear_probe.L2_GRID


def test_a_linearly_separable_set_is_solved():
  # Labels are the argmax of a fixed linear map of the features (a margin keeps it strict): separable by design.
  rng = np.random.default_rng(3)
  w = rng.normal(size=(16, K))
  def draw(n):
    x = rng.normal(size=(40 * n, 16)).astype(np.float32)
    s = np.sort(x @ w, axis=1)
    keep = (s[:, -1] - s[:, -2]) > 2.0
    return x[keep][:n], np.argmax(x[keep][:n] @ w, axis=1)
  (x, y), (tx, ty) = draw(N), draw(2000)
  assert linear_probe.run(x, y, tx, ty, K)["top1"] >= 0.99


def test_random_labels_give_chance_on_the_test_set():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(N, D)).astype(np.float32), rng.integers(0, K, N)
  tx, ty = rng.normal(size=(2000, D)).astype(np.float32), rng.integers(0, K, 2000)
  probe = linear_probe.fit(x, y, K, l2=1e-6)
  # It memorises part of the training set (a 170-parameter model on 403 rows) but learns nothing that transfers.
  assert linear_probe.evaluate(probe, x, y)["top1"] > 0.2
  test = linear_probe.evaluate(probe, tx, ty)
  assert abs(test["top1"] - 0.1) < 0.03 and abs(test["top5"] - 0.5) < 0.05, test


def test_test_features_are_standardised_with_train_statistics():
  x, y = blobs(N, seed=1)
  x[:, 3] = 7.0  # a constant feature: std 0 must not divide by zero
  tx, ty = blobs(2000, seed=2)
  probe = linear_probe.fit(x, y, K, l2=1e-3)
  assert probe.std[3] == 1 and np.all(np.isfinite(probe.w))

  def expected(test_x):
    logits = ((test_x - probe.mean) / probe.std) @ probe.w + probe.b
    return float(np.mean(np.argmax(logits, axis=1) == ty))

  base = linear_probe.evaluate(probe, tx, ty)["top1"]
  assert base == pytest.approx(expected(tx), abs=1e-6)
  # A constant shift of the test set moves it relative to the *train* statistics, so the accuracy must change
  # (and be exactly what the stored mean/std predict). Standardising with the test set's own mean would undo the
  # shift and give `base` again.
  shift = 3 * x.std(axis=0)
  shifted = linear_probe.evaluate(probe, tx + shift, ty)["top1"]
  assert shifted == pytest.approx(expected(tx + shift), abs=1e-6)
  assert shifted < base - 0.2, (base, shifted)


def test_sharded_equals_unsharded_and_ignores_negative_labels(mesh):
  x, y = blobs(N, seed=1, noise=3.0)
  tx, ty = blobs(2000, seed=2, noise=3.0)
  one = linear_probe.fit(x, y, K, l2=1e-3)
  sharded = linear_probe.fit(x, y, K, l2=1e-3, mesh=mesh)
  # Rows labelled -1 (padding), whatever their features, change nothing: 403 + 3 rows still pad to 408.
  junk = np.full((3, D), np.nan, np.float32)
  xj, yj = np.concatenate([x[:200], junk, x[200:]]), np.concatenate([y[:200], [-1, -1, -5], y[200:]])
  padded = linear_probe.fit(xj, yj, K, l2=1e-3, mesh=mesh)
  for p in (sharded, padded):
    np.testing.assert_allclose(p.mean, one.mean, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    np.testing.assert_allclose(p.std, one.std, rtol=1e-6)
    np.testing.assert_allclose(p.w, one.w, atol=1e-5 * np.abs(one.w).max())
    np.testing.assert_allclose(p.b - p.b.mean(), one.b - one.b.mean(), atol=1e-5 * np.abs(one.b).max())

  acc = linear_probe.evaluate(one, tx, ty)
  assert linear_probe.evaluate(sharded, tx, ty, mesh=mesh) == pytest.approx(acc, abs=1e-5)
  txj, tyj = np.concatenate([junk, tx]), np.concatenate([[-1, -2, -1], ty])
  assert linear_probe.evaluate(one, txj, tyj, mesh=mesh) == pytest.approx(acc, abs=1e-5)


def test_l2_is_chosen_on_a_seeded_holdout():
  x, y = blobs(N, seed=4, noise=6.0)
  a = linear_probe.fit(x, y, K, seed=0)
  b = linear_probe.fit(x, y, K, seed=0)
  c = linear_probe.fit(x, y, K, seed=1)
  assert a.l2 == b.l2 and a.holdout_top1 == b.holdout_top1
  assert a.holdout_top1 != c.holdout_top1  # another seed holds out other rows
  assert set(a.holdout_top1) == set(linear_probe.L2_GRID)
  best = max(a.holdout_top1.values())
  assert a.l2 == max(v for v, s in a.holdout_top1.items() if s == best)  # ties go to the larger l2
  # The final probe is the refit on all rows with the chosen l2.
  refit = linear_probe.fit(x, y, K, l2=a.l2)
  np.testing.assert_array_equal(a.w, refit.w)
  assert evals.REGISTRY["linear_probe"] is linear_probe


def test_bad_input_names_the_problem():
  x, y = blobs(N, seed=1)
  with pytest.raises(ValueError, match="different lengths"):
    linear_probe.fit(x, y[:-1], K)
  with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
    linear_probe.fit(x, np.zeros(N, int), 1)
  with pytest.raises(ValueError, match="labels must be < num_classes=10, got a label 10"):
    linear_probe.fit(x, np.where(y == 0, 10, y), K)
  with pytest.raises(ValueError, match="train set is empty: 0 rows"):
    linear_probe.fit(np.zeros((0, D), np.float32), np.zeros(0, int), K)
  with pytest.raises(ValueError, match="train set is empty: no rows with a label >= 0"):
    linear_probe.fit(x, np.full(N, -1), K)
  with pytest.raises(ValueError, match="labels must be integers"):
    linear_probe.fit(x, y.astype(np.float32), K)
  with pytest.raises(ValueError, match=r"features must be \[N, D\]"):
    linear_probe.fit(x[:, 0], y, K)
  with pytest.raises(ValueError, match="leaves an empty fit or held-out part"):
    linear_probe.fit(x[:2], y[:2], K)
  with pytest.raises(ValueError, match="NaN or inf"):
    linear_probe.fit(np.where(np.arange(D) == 2, np.inf, x).astype(np.float32), y, K, l2=1e-3)
  probe = linear_probe.fit(x, y, K, l2=1e-3)
  with pytest.raises(ValueError, match="dim 8 but the probe was fitted on dim 16"):
    linear_probe.evaluate(probe, x[:, :8], y)
  with pytest.raises(ValueError, match="test set is empty"):
    linear_probe.evaluate(probe, x, np.full(N, -1))

"""k-NN and few-shot evaluators against float64 NumPy references, sharded = unsharded, padding, bad input.

The random sets have N = 403 training rows (not a multiple of 8, so the sharded runs pad) of dim 16, 10 classes.
"""
import math

import numpy as np
import pytest

from xsample_jax.evals import fewshot, knn

N, D, K = 403, 16, 10


def blobs(n, seed, noise=1.0):
  """K Gaussian blobs around fixed centres, off-centre and unevenly scaled so standardisation matters."""
  centers = np.random.default_rng(0).normal(size=(K, D)) * 3
  rng = np.random.default_rng(seed)
  y = rng.integers(0, K, n)
  x = centers[y] + noise * rng.normal(size=(n, D))
  return (x * np.linspace(0.5, 4, D) + 5).astype(np.float32), y


# ------------------------------------------------------------------------------------------------------------
# k-NN. The reference: float64 NumPy, from the formula (not from knn.py).


def ref_votes(x, y, tx, k, t, num_classes):
  """[n_test, num_classes] weighted votes of each test row's k most similar (cosine) labelled training rows."""
  keep = y >= 0
  x, y = x[keep].astype(np.float64), y[keep]
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  tx = tx.astype(np.float64) / np.linalg.norm(tx, axis=1, keepdims=True)
  s = tx @ x.T
  votes = np.zeros((len(tx), num_classes))
  for i in range(len(tx)):
    for j in np.argsort(-s[i])[:k]:
      votes[i, y[j]] += math.exp(s[i, j] / t)
  return votes


def ref_knn(x, y, tx, ty, k, t, num_classes):
  keep = ty >= 0
  votes = ref_votes(x, y, tx[keep], k, t, num_classes)
  true = votes[np.arange(len(votes)), ty[keep]]
  rank = np.sum(votes >= true[:, None], axis=1) - 1  # ties count against the row
  out = {"top1": float(np.mean(rank < 1))}
  if num_classes > 5:
    out["top5"] = float(np.mean(rank < 5))
  return out


def at(deg, norm=1.0):
  return [norm * math.cos(math.radians(deg)), norm * math.sin(math.radians(deg))]


def test_knn_hand_placed_points(mesh):
  # Directions matter, lengths do not: c is the longest vector but 30 degrees off q1.
  x = np.array([at(10, 2.0), at(20, 0.5), at(-30, 3.0), at(80), at(180), at(105)], np.float32)
  y = np.array([0, 1, 1, 0, 2, 2])
  tx = np.array([at(0), at(90), at(175, 4.0)], np.float32)
  ty = np.array([0, 2, 2])
  cos = lambda deg: math.cos(math.radians(deg))

  # q1's 3 nearest: a (10 deg, class 0), b (20 deg, class 1), c (30 deg, class 1).
  for t in (0.07, 0.5):
    np.testing.assert_allclose(ref_votes(x, y, tx[:1], 3, t, 3)[0],
                               [math.exp(cos(10) / t), math.exp(cos(20) / t) + math.exp(cos(30) / t), 0])
  # At T = 0.07 the single closest neighbour outweighs the two others (e^14.07 > e^13.42 + e^12.37); at T = 0.5
  # the two class-1 neighbours win (e^1.97 < e^1.88 + e^1.73). q2 (90 deg): d (10 deg, class 0) beats f (15 deg,
  # class 2) at any T. q3 (175 deg): e and f, both class 2, are its nearest.
  assert knn.run(x, y, tx, ty, 3, k=3, temperature=0.07) == pytest.approx({"top1": 2 / 3})
  assert knn.run(x, y, tx, ty, 3, k=3, temperature=0.5) == pytest.approx({"top1": 1 / 3})
  assert knn.run(x, y, tx, ty, 3, k=3, temperature=0.5) == pytest.approx(ref_knn(x, y, tx, ty, 3, 0.5, 3))
  # k may be every labelled row, but not more: it is not clamped.
  assert knn.run(x, y, tx, ty, 3, k=6) == pytest.approx(ref_knn(x, y, tx, ty, 6, 0.07, 3))
  with pytest.raises(ValueError, match="k=7 is more than the 6 labelled training rows"):
    knn.run(x, y, tx, ty, 3, k=7)
  yj = np.concatenate([y, [-1]])
  with pytest.raises(ValueError, match="k=7 is more than the 6 labelled training rows"):
    knn.run(np.concatenate([x, tx[:1]]), yj, tx, ty, 3, k=7)

  # Neighbours with a negative similarity still vote: q at 0 deg has a (0 deg, class 0) and b, c (180 and 170
  # deg, class 1) as its 3 neighbours; at T = 100 all weigh ~1, so class 1 wins 2 to 1. A padding row (its own
  # copy here, or the sharded run's fill rows, similarity 0) that displaced b or c would hand the vote to class 0.
  x = np.array([at(0), at(180), at(170), at(0)], np.float32)
  y, q = np.array([0, 1, 1, -1]), np.array([at(0)], np.float32)
  assert ref_votes(x, y, q, 3, 100.0, 2)[0, 1] > ref_votes(x, y, q, 3, 100.0, 2)[0, 0]
  for m in (None, mesh):
    assert knn.run(x, y, q, np.array([1]), 2, k=3, temperature=100.0, mesh=m) == {"top1": 1.0}


def test_knn_sharded_equals_unsharded_and_the_reference(mesh):
  x, y = blobs(N, seed=1, noise=4.0)  # overlapping classes: accuracies well inside (0, 1)
  tx, ty = blobs(301, seed=2, noise=4.0)
  ref = ref_knn(x, y, tx, ty, 20, 0.07, K)
  assert 0.3 < ref["top1"] < 0.9 and ref["top5"] > ref["top1"]
  # 301 test rows in blocks of 64: the last block is padded.
  one = knn.run(x, y, tx, ty, K, batch_size=64)
  assert set(one) == {"top1", "top5"} and all(isinstance(v, float) for v in one.values())
  assert one == pytest.approx(ref, abs=1e-9)
  assert knn.run(x, y, tx, ty, K, mesh=mesh, batch_size=64) == pytest.approx(ref, abs=1e-9)
  # k = 60 is more than the 51 rows a device holds (403 -> 408 / 8): the candidates come from several devices.
  assert knn.run(x, y, tx, ty, K, k=60, temperature=0.2, mesh=mesh, batch_size=64) == pytest.approx(
      ref_knn(x, y, tx, ty, 60, 0.2, K), abs=1e-9)


def test_knn_ignores_padding_rows(mesh):
  x, y = blobs(N, seed=1, noise=4.0)
  tx, ty = blobs(301, seed=2, noise=4.0)
  ref = knn.run(x, y, tx, ty, K, mesh=mesh, batch_size=64)
  # Padding training rows that would be every test row's nearest neighbour (its own copy), and one NaN row.
  junk_x = np.concatenate([tx[:40] * 3, np.full((1, D), np.nan, np.float32)])
  xj = np.concatenate([x[:100], junk_x, x[100:]])
  yj = np.concatenate([y[:100], np.full(41, -1), y[100:]])
  # Padding test rows: NaN features and any negative label.
  txj = np.concatenate([np.full((5, D), np.nan, np.float32), tx])
  tyj = np.concatenate([[-1, -2, -1, -1, -7], ty])
  assert knn.run(xj, yj, txj, tyj, K, mesh=mesh, batch_size=64) == pytest.approx(ref, abs=1e-9)
  assert knn.run(xj, yj, txj, tyj, K, batch_size=64) == pytest.approx(ref, abs=1e-9)
  with pytest.raises(ValueError, match="train features contain NaN"):
    knn.run(xj, np.where(yj < 0, 0, yj), tx, ty, K, batch_size=64)
  # Labelled, the copies are found: each of those 40 test rows is then its own nearest neighbour.
  xl, yl = np.concatenate([x, tx[:40] * 3]), np.concatenate([y, ty[:40]])
  assert knn.run(xl, yl, tx[:40], ty[:40], K, k=1) == pytest.approx({"top1": 1.0, "top5": 1.0})


def test_knn_bad_input_names_the_problem():
  x, y = blobs(50, seed=1)
  with pytest.raises(ValueError, match="temperature must be a finite value > 0"):
    knn.run(x, y, x, y, K, temperature=0)
  with pytest.raises(ValueError, match="k must be an int >= 1"):
    knn.run(x, y, x, y, K, k=0)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    knn.run(x, y, x, y, K, k=5, batch_size=0)
  with pytest.raises(ValueError, match="test features have dim 8 but the train features have dim 16"):
    knn.run(x, y, x[:, :8], y, K, k=5)
  with pytest.raises(ValueError, match="test set is empty"):
    knn.run(x, y, x, np.full(50, -1), K, k=5)
  with pytest.raises(ValueError, match=r"test features contain NaN or inf \(1 labelled rows\)"):
    knn.run(x, y, np.where(np.arange(50)[:, None] == 3, np.inf, x), y, K, k=5)


# ------------------------------------------------------------------------------------------------------------
# Few-shot. The reference: float64 NumPy with an explicit, unpenalised bias column (not fewshot.py's centring).


def ref_ridge(xs, ys, num_classes, l2):
  x = xs.astype(np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  a = np.c_[(x - mean) / std, np.ones(len(x))]
  t = 2.0 * np.eye(num_classes)[ys] - 1.0
  penalty = np.diag(np.r_[np.full(x.shape[1], l2), 0.0])
  wb = np.linalg.solve(a.T @ a + penalty, a.T @ t)
  return mean, std, wb[:-1], wb[-1]


def ref_accuracy(ridge, tx, ty):
  mean, std, w, b = ridge
  scores = ((tx.astype(np.float64) - mean) / std) @ w + b
  return float(np.mean(np.argmax(scores, axis=1) == ty))


@pytest.mark.parametrize("shots", [1, 5])  # 10 rows < 16 features (the dual system), 50 rows (the primal)
def test_fewshot_ridge_is_the_float64_solution(shots):
  x, y = blobs(N, seed=1, noise=3.0)
  idx = fewshot.sample(y, K, shots=(shots,), draws=1, seed=3)[0].reshape(-1)
  xs, ys = x[idx], y[idx]
  xs[:, 5] = 2.5  # constant over the drawn rows: std 1, weight 0
  for l2 in (1.0, fewshot.L2):
    mean, std, w, b = ref_ridge(xs, ys, K, l2)
    r = fewshot.fit(xs, ys, K, l2=l2)
    np.testing.assert_allclose(r.mean, mean, rtol=1e-6, atol=1e-6 * np.abs(xs).max())
    np.testing.assert_allclose(r.std, std, rtol=1e-5)
    assert r.std[5] == 1 and np.all(r.w[5] == 0)
    np.testing.assert_allclose(r.w, w, atol=2e-5 * np.abs(w).max())
    np.testing.assert_allclose(r.b, b, atol=2e-5 * np.abs(b).max())


def test_fewshot_learns_blobs_and_nothing_from_random_labels():
  x, y = blobs(N, seed=1)
  tx, ty = blobs(2000, seed=2)
  out = fewshot.run(x, y, tx, ty, K, shots=(1, 5, 10), draws=3)
  assert set(out) == {f"{n}shot{s}" for n in (1, 5, 10) for s in ("", "_std")}
  assert all(isinstance(v, float) for v in out.values())
  assert out["5shot"] >= 0.95 and out["10shot"] >= 0.95, out

  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(N, D)).astype(np.float32), rng.integers(0, K, N)
  tx, ty = rng.normal(size=(2000, D)).astype(np.float32), rng.integers(0, K, 2000)
  out = fewshot.run(x, y, tx, ty, K, shots=(5, 25))
  assert abs(out["5shot"] - 0.1) < 0.03 and abs(out["25shot"] - 0.1) < 0.03, out


def test_fewshot_draws_are_seeded(mesh):
  x, y = blobs(N, seed=1, noise=6.0)  # hard enough that different rows give different accuracies
  tx, ty = blobs(1000, seed=2, noise=6.0)
  a = fewshot.run(x, y, tx, ty, K, shots=(1, 5))
  assert a == fewshot.run(x, y, tx, ty, K, shots=(1, 5))
  assert a != fewshot.run(x, y, tx, ty, K, shots=(1, 5), seed=1)
  assert a["1shot_std"] > 0
  assert fewshot.run(x, y, tx, ty, K, shots=(1, 5), mesh=mesh) == pytest.approx(a, abs=1e-9)

  idx = fewshot.sample(y, K, shots=(1, 5), draws=5, seed=0)
  assert idx.shape == (5, K, 5)
  assert np.all(y[idx] == np.arange(K)[None, :, None])  # draw d, class c: rows of class c
  assert all(len(set(idx[d, c])) == 5 for d in range(5) for c in range(K))  # without replacement
  assert not np.array_equal(idx[0], idx[1])
  # Draw d depends on (seed, d) only, not on how many draws there are.
  np.testing.assert_array_equal(fewshot.sample(y, K, shots=(1, 5), draws=2, seed=0), idx[:2])


def test_fewshot_standardises_with_the_drawn_rows_only():
  x, y = blobs(N, seed=1, noise=2.0)
  tx, ty = blobs(2000, seed=2, noise=2.0)
  # Padding rows, never drawn; in the statistics they would move every feature by ~1e5.
  xj = np.concatenate([x, np.full((20, D), 1e6, np.float32)])
  yj = np.concatenate([y, np.full(20, -1)])
  idx = fewshot.sample(yj, K, shots=(5,), draws=1)[0].reshape(-1)
  ridge = ref_ridge(xj[idx], yj[idx], K, fewshot.L2)

  base = fewshot.run(xj, yj, tx, ty, K, shots=(5,), draws=1)["5shot"]
  assert base == pytest.approx(ref_accuracy(ridge, tx, ty), abs=1 / 2000)
  # A constant shift of the test set moves it relative to the drawn rows' statistics, so the accuracy must
  # change (to what those statistics predict). Standardising with the test set's own would undo the shift.
  shift = 2 * x.std(axis=0)
  shifted = fewshot.run(xj, yj, tx + shift, ty, K, shots=(5,), draws=1)["5shot"]
  assert shifted == pytest.approx(ref_accuracy(ridge, tx + shift, ty), abs=1 / 2000)
  assert shifted < base - 0.2, (base, shifted)


def test_fewshot_bad_input_names_the_problem():
  x, y = blobs(N, seed=1)
  y[np.flatnonzero(y == 3)[2:]] = 4  # class 3 keeps 2 rows; padding rows do not count towards it
  x, y = np.concatenate([x, x[:5]]), np.concatenate([y, np.full(5, -1)])
  with pytest.raises(ValueError, match="class 3 has 2 labelled training rows, fewer than 5 shots"):
    fewshot.run(x, y, x, y, K, shots=(1, 5, 10))
  assert set(fewshot.run(x, y, x, y, K, shots=(1, 2), draws=1)) == {"1shot", "1shot_std", "2shot", "2shot_std"}
  with pytest.raises(ValueError, match="l2 must be a finite value > 0"):
    fewshot.run(x, y, x, y, K, shots=(1,), l2=0)
  with pytest.raises(ValueError, match="shots must be a non-empty sequence of ints >= 1"):
    fewshot.run(x, y, x, y, K, shots=(0, 1))
  with pytest.raises(ValueError, match="draws must be an int >= 1"):
    fewshot.run(x, y, x, y, K, shots=(1,), draws=0)
  with pytest.raises(ValueError, match="test features contain NaN or inf"):
    fewshot.run(x, y, np.where(np.arange(N + 5)[:, None] == 7, np.nan, x), y, K, shots=(1,))

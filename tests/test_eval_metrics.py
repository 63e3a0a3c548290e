"""Graph alignment against float64 references; background gaps and attribute probes on constructed features.

Every linear probe here is fitted on N = 400 rows of dim D = 16 with K = 8 classes, sharded over the 8-device
mesh, so the jitted L-BFGS compiles once for the whole file.
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from xsample_jax.evals import attributes, background, graph_alignment, linear_probe

N, D, K = 400, 16, 8


# ------------------------------------------------------------------------------------------------------------
# Graph alignment. The references are written from the definitions, not from graph_alignment.py.


def captions(n, seed, num_captions=12, dim=24):
  """c = T[ids] for a small caption table T: rows repeat, so s has large ties. Returns (c, ids, T)."""
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(num_captions, dim)).astype(np.float32)
  ids = rng.integers(0, num_captions, n)
  return table[ids], ids, table


def ref_average_ranks(a):
  """rank(v) = #(values < v) + (#(values == v) + 1) / 2."""
  s = np.sort(a)
  return (np.searchsorted(s, a, "left") + np.searchsorted(s, a, "right") + 1) / 2


def ref_batch(z, ids, table, tau, tau_s):
  """(spearman, kl) of one batch over all pairs i != j, with s looked up in the caption table's own Gram."""
  t = table.astype(np.float64)
  t /= np.linalg.norm(t, axis=1, keepdims=True)
  s = np.where(ids[:, None] == ids[None, :], 1.0, (t @ t.T)[ids][:, ids])  # cos(x, x) = 1, not 1 +- an ulp
  zn = z.astype(np.float64) / np.linalg.norm(z.astype(np.float64), axis=1, keepdims=True)
  l = zn @ zn.T
  m = len(z)
  off = ~np.eye(m, dtype=bool)
  rho = np.corrcoef(ref_average_ranks(l[off]), ref_average_ranks(s[off]))[0, 1]
  kl = 0.0
  for i in range(m):
    g = np.exp(np.delete(s[i], i) / tau_s)
    p = np.exp(np.delete(l[i], i) / tau)
    g, p = g / g.sum(), p / p.sum()
    kl += np.sum(g * np.log(g / p)) / m
  return rho, kl


def test_embeddings_that_reproduce_the_graph_score_perfectly():
  c, _, _ = captions(512, seed=0)
  out = graph_alignment.run(c, c)
  assert set(out) == {"spearman", "kl"} and all(isinstance(v, float) for v in out.values())
  assert out["spearman"] == pytest.approx(1.0, abs=1e-12)
  assert abs(out["kl"]) < 1e-12
  # Device arrays in bfloat16, as a bf16 model hands them over.
  zb = jnp.asarray(c, jnp.bfloat16)
  assert graph_alignment.run(zb, zb) == {"spearman": 1.0, "kl": 0.0}
  # A rotated, rescaled copy has the same cosines up to float32 rounding, which splits the learned side's ties
  # (repeated captions no longer give bit-equal rows): near 1, not exactly.
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(c.shape[1], c.shape[1])))
  rotated = (c @ q * np.random.default_rng(1).uniform(0.5, 3, size=(len(c), 1))).astype(np.float32)
  out = graph_alignment.run(rotated, c, temperature=0.05, target_temperature=0.05)
  assert out["spearman"] > 0.999 and abs(out["kl"]) < 1e-6, out
  # The same ranking at another temperature: still spearman 1, but the distributions differ.
  out = graph_alignment.run(c, c, temperature=0.05, target_temperature=0.1)
  assert out["spearman"] == pytest.approx(1.0, abs=1e-12) and out["kl"] > 0.01


def test_random_embeddings_are_uncorrelated_with_the_graph():
  c, _, _ = captions(512, seed=0)
  z = np.random.default_rng(2).normal(size=(512, 32)).astype(np.float32)
  out = graph_alignment.run(z, c)
  assert abs(out["spearman"]) < 0.05 and out["kl"] > 0.1, out


def test_matches_the_float64_reference_with_ties_and_a_tail():
  c, ids, table = captions(64 * 3 + 10, seed=3)
  rng = np.random.default_rng(4)
  z = np.concatenate([c, np.zeros_like(c)], axis=1) + rng.normal(size=(len(c), 48)).astype(np.float32)
  out = graph_alignment.run(z, c, batch_size=64, temperature=0.2, target_temperature=0.1)
  # Batches of 64, 64, 64 and a tail of 10, weighted by their rows.
  refs = [ref_batch(z[a:a + 64], ids[a:a + 64], table, 0.2, 0.1) for a in range(0, len(z), 64)]
  w = np.array([64, 64, 64, 10])
  assert out["spearman"] == pytest.approx(np.dot(w, [r[0] for r in refs]) / w.sum(), abs=1e-12)
  assert out["kl"] == pytest.approx(np.dot(w, [r[1] for r in refs]) / w.sum(), rel=1e-10)
  assert 0.2 < out["spearman"] < 0.9  # a noisy copy: correlated, not perfectly
  # A one-row tail is dropped.
  one = graph_alignment.run(z[:193], c[:193], batch_size=64, temperature=0.2, target_temperature=0.1)
  assert one == graph_alignment.run(z[:192], c[:192], batch_size=64, temperature=0.2, target_temperature=0.1)


def test_less_noise_aligns_better():
  c, _, _ = captions(512, seed=5)
  noise = np.random.default_rng(6).normal(size=c.shape).astype(np.float32)
  close, far = (graph_alignment.run(c + a * noise, c) for a in (0.2, 1.0))
  assert close["spearman"] > far["spearman"] + 0.1 and close["kl"] < far["kl"]


def test_constant_graph_has_no_spearman():
  # Every row has the same caption: s is constant, there is no ranking to correlate; the KL is still defined.
  c = np.ones((20, 4), np.float32)
  z = np.random.default_rng(7).normal(size=(20, 4)).astype(np.float32)
  out = graph_alignment.run(z, c, batch_size=10)
  assert math.isnan(out["spearman"]) and out["kl"] > 0


def test_graph_alignment_bad_input_names_the_problem():
  c, _, _ = captions(32, seed=0)
  with pytest.raises(ValueError, match="different lengths: 32 vs 31 rows"):
    graph_alignment.run(c, c[:31])
  with pytest.raises(ValueError, match="at least 2 rows"):
    graph_alignment.run(c[:1], c[:1])
  with pytest.raises(ValueError, match="batch_size must be an int >= 2"):
    graph_alignment.run(c, c, batch_size=1)
  with pytest.raises(ValueError, match="target_temperature must be a finite value > 0"):
    graph_alignment.run(c, c, target_temperature=0.0)
  with pytest.raises(ValueError, match="zero row \\(row 3\\)"):
    graph_alignment.run(np.where(np.arange(32)[:, None] == 3, 0, c), c)
  with pytest.raises(ValueError, match="c contains NaN"):
    graph_alignment.run(c, np.where(c > 1, np.nan, c))
  with pytest.raises(ValueError, match="c must be numeric"):
    graph_alignment.run(c, c.astype(complex))
  with pytest.raises(ValueError, match=r"z must be \[n, D\]"):
    graph_alignment.run(c[:, 0], c)


# ------------------------------------------------------------------------------------------------------------
# Background gaps. Features = [object part (8 dims), background part (8 dims)]; background class k is the
# preferred background of object class k, shown with probability `corr` in training and in "original".


OBJ = np.random.default_rng(10).normal(size=(K, 8)) * 3
BG = np.random.default_rng(11).normal(size=(K, 8)) * 3


def scenes(n, seed, split, *, see_object, see_background, corr=0.9):
  """Features of n images: each part holds its class centre plus noise when the encoder sees it, noise alone
  when it does not."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, K, n)
  if split == "mixed_same":
    bg = y
  elif split == "mixed_rand":
    bg = rng.integers(0, K, n)
  else:  # train, original
    bg = np.where(rng.random(n) < corr, y, rng.integers(0, K, n))
  obj_part = OBJ[y] * see_object + rng.normal(size=(n, 8))
  bg_part = BG[bg] * see_background + rng.normal(size=(n, 8))
  return np.concatenate([obj_part, bg_part], axis=1).astype(np.float32), y


def imagenet9(seed, **kw):
  return {s: scenes(2000, seed + i, s, **kw) for i, s in enumerate(("original", "mixed_same", "mixed_rand"))}


def test_a_background_reliant_encoder_has_a_large_bg_gap(mesh):
  # The encoder sees only the background: the probe can only learn background -> class.
  kw = dict(see_object=False, see_background=True)
  x, y = scenes(N, 0, "train", **kw)
  out = background.run(x, y, imagenet9(100, **kw), K, mesh=mesh)
  assert set(out) == {"original/top1", "mixed_same/top1", "mixed_rand/top1", "bg_gap", "shift_gap", "l2"}
  assert all(isinstance(v, float) for v in out.values())
  # Right exactly when the background is the class's: corr + (1 - corr) / K on original, always on
  # mixed_same, at chance on mixed_rand.
  assert out["original/top1"] == pytest.approx(0.9 + 0.1 / K, abs=0.03), out
  assert out["mixed_same/top1"] > 0.98, out
  assert out["mixed_rand/top1"] == pytest.approx(1 / K, abs=0.03), out
  assert out["bg_gap"] == pytest.approx(1 - 1 / K, abs=0.04)
  assert out["shift_gap"] == pytest.approx(0.9 + 0.1 / K - 1 / K, abs=0.04)
  # The gaps are exactly the differences of the reported accuracies.
  assert out["bg_gap"] == out["mixed_same/top1"] - out["mixed_rand/top1"]
  assert out["shift_gap"] == out["original/top1"] - out["mixed_rand/top1"]


def test_an_object_centric_encoder_has_no_bg_gap(mesh):
  kw = dict(see_object=True, see_background=False)
  x, y = scenes(N, 0, "train", **kw)
  out = background.run(x, y, imagenet9(100, **kw), K, mesh=mesh, l2=1e-3)
  assert out["l2"] == 1e-3
  for s in ("original", "mixed_same", "mixed_rand"):
    assert out[f"{s}/top1"] > 0.97, out
  assert abs(out["bg_gap"]) < 0.02 and abs(out["shift_gap"]) < 0.02, out


def test_gaps_need_both_of_their_splits(mesh):
  kw = dict(see_object=True, see_background=True)
  x, y = scenes(N, 0, "train", **kw)
  splits = imagenet9(100, **kw)
  # Any split name is scored; with mixed_rand missing neither gap can be formed.
  out = background.run(x, y, {"original": splits["original"], "mixed_same": splits["mixed_same"],
                              "only_fg": splits["mixed_rand"]}, K, mesh=mesh, l2=1e-3)
  assert set(out) == {"original/top1", "mixed_same/top1", "only_fg/top1", "l2"}
  # One probe scores every split: the same accuracy as linear_probe on its own.
  probe = linear_probe.fit(x, y, K, mesh=mesh, l2=1e-3)
  assert out["only_fg/top1"] == linear_probe.evaluate(probe, *splits["mixed_rand"], mesh=mesh)["top1"]


def test_background_bad_input_names_the_problem(mesh):
  x, y = scenes(N, 0, "train", see_object=True, see_background=True)
  with pytest.raises(ValueError, match="non-empty dict"):
    background.run(x, y, {}, K)
  with pytest.raises(ValueError, match="without '/'"):
    background.run(x, y, {"a/b": (x, y)}, K)
  with pytest.raises(ValueError, match="'original' must be a \\(features, labels\\) pair"):
    background.run(x, y, {"original": x}, K)
  with pytest.raises(ValueError, match="split 'mixed_rand': test features have dim 8"):
    background.run(x, y, {"original": (x, y), "mixed_rand": (x[:, :8], y)}, K, mesh=mesh, l2=1e-3)


# ------------------------------------------------------------------------------------------------------------
# Objects and attributes: 2N rows, so each half is N rows.


def objects_and_attributes(seed, *, attribute_linear, noise=1.0):
  """Object class centres in the first 8 dims. The attribute is the norm of the last 8 dims (a random direction
  times 1 + a): present in the features, but with mean 0 for every class, so no linear probe can read it --
  unless `attribute_linear`, when the last 8 dims are class centres like the objects'."""
  rng = np.random.default_rng(seed)
  obj, attr = rng.integers(0, K, 2 * N), rng.integers(0, K, 2 * N)
  if attribute_linear:
    attr_part = BG[attr] + noise * rng.normal(size=(2 * N, 8))
  else:
    u = rng.normal(size=(2 * N, 8))
    attr_part = (1 + attr)[:, None] * u / np.linalg.norm(u, axis=1, keepdims=True)
  x = np.concatenate([OBJ[obj] + noise * rng.normal(size=(2 * N, 8)), attr_part], axis=1)
  return x.astype(np.float32), obj, attr


def test_split_halves_is_a_seeded_partition():
  a, b = attributes.split_halves(11, seed=0)
  assert len(a) == 5 and len(b) == 6
  np.testing.assert_array_equal(np.sort(np.r_[a, b]), np.arange(11))
  np.testing.assert_array_equal(attributes.split_halves(11, seed=0)[0], a)
  assert not np.array_equal(attributes.split_halves(11, seed=1)[0], a)


def test_separable_objects_and_attributes(mesh):
  x, obj, attr = objects_and_attributes(0, attribute_linear=True)
  out = attributes.run(x, obj, attr, mesh=mesh, l2=1e-3)
  assert set(out) == {"object_top1", "attribute_top1"} and all(isinstance(v, float) for v in out.values())
  assert out["object_top1"] > 0.95 and out["attribute_top1"] > 0.95, out


def test_an_attribute_that_is_not_linear_is_at_chance(mesh):
  x, obj, attr = objects_and_attributes(1, attribute_linear=False)
  out = attributes.run(x, obj, attr, mesh=mesh, l2=1e-3)
  assert out["object_top1"] > 0.95, out
  assert out["attribute_top1"] == pytest.approx(1 / K, abs=0.05), out


def test_attributes_are_seeded_and_share_one_split(mesh):
  x, obj, attr = objects_and_attributes(2, attribute_linear=True, noise=4.0)  # overlapping: not all 1.0
  attr[::7] = -1  # rows without an attribute still count for the object probe
  a = attributes.run(x, obj, attr, seed=0, mesh=mesh, l2=1e-3)
  assert a == attributes.run(x, obj, attr, seed=0, mesh=mesh, l2=1e-3)
  assert a != attributes.run(x, obj, attr, seed=1, mesh=mesh, l2=1e-3)
  # The same as two linear probes on the halves of split_halves(seed), labels < 0 ignored.
  tr, te = attributes.split_halves(len(x), seed=0)
  for name, y in (("object", obj), ("attribute", attr)):
    ref = linear_probe.run(x[tr], y[tr], x[te], y[te], K, mesh=mesh, l2=1e-3)
    assert a[f"{name}_top1"] == ref["top1"]
  assert 0.3 < a["attribute_top1"] < 0.95, a


def test_attributes_bad_input_names_the_problem():
  x, obj, attr = objects_and_attributes(0, attribute_linear=True)
  with pytest.raises(ValueError, match="attribute_y must be \\[n\\] with n = 800"):
    attributes.run(x, obj, attr[:-1])
  with pytest.raises(ValueError, match="object_y needs at least 2 classes"):
    attributes.run(x, np.zeros(len(x), int), attr)
  with pytest.raises(ValueError, match="attribute_y must be integers"):
    attributes.run(x, obj, attr.astype(np.float32))
  with pytest.raises(ValueError, match="at least 2 rows"):
    attributes.run(x[:1], np.ones(1, int), np.ones(1, int))

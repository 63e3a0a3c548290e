"""Losses against independent NumPy float64 references, across devices, dense vs blockwise, limits, bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xsample_jax import losses

# ------------------------------------------------------------------------------------------------------------
# NumPy float64 references, written from the papers' formulas (not from losses.py), and finite differences.


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _lse(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def ref_xsample(z, s, tau, tau_s, mask_self=True):
  """s: the raw N x N graph (cosines or labels-equality)."""
  z = _unit(z)
  n = len(z)
  total = 0.0
  for i in range(n):
    js = [j for j in range(n) if j != i or not mask_self]
    l = np.array([z[i] @ z[j] / tau for j in js])
    t = np.array([s[i, j] / tau_s for j in js])
    g = np.exp(t - _lse(t))
    total += _lse(l) - g @ l
  return total / n


def ref_supcon(z, labels, tau):
  z = _unit(z)
  n, total, anchors = len(z), 0.0, 0
  for i in range(n):
    others = [a for a in range(n) if a != i]
    pos = [p for p in others if labels[p] == labels[i]]
    if not pos:
      continue
    denom = _lse(np.array([z[i] @ z[a] / tau for a in others]))
    total += -np.mean([z[i] @ z[p] / tau - denom for p in pos])
    anchors += 1
  return total / anchors


def ref_ntxent(z, tau):
  """SimCLR with the two views of image k at rows k and k + B."""
  z = _unit(z)
  n = len(z)
  b = n // 2
  total = 0.0
  for i in range(n):
    pos = (i + b) % n
    logits = np.array([z[i] @ z[k] / tau for k in range(n) if k != i])
    total += -(z[i] @ z[pos] / tau - _lse(logits))
  return total / n


def ref_clip(u, v, log_scale, max_scale=100.0):
  u, v = _unit(u), _unit(v)
  logits = min(np.exp(log_scale), max_scale) * u @ v.T
  n = len(u)
  i2t = np.mean([_lse(logits[i]) - logits[i, i] for i in range(n)])
  t2i = np.mean([_lse(logits[:, i]) - logits[i, i] for i in range(n)])
  return 0.5 * (i2t + t2i)


def ref_siglip(u, v, log_scale, bias):
  u, v = _unit(u), _unit(v)
  logits = np.exp(log_scale) * u @ v.T + bias
  y = 2 * np.eye(len(u)) - 1
  return -np.sum(np.log(1.0 / (1.0 + np.exp(-y * logits)))) / len(u)


def ref_cross_modal(u, v, c, tau, tau_s):
  u, v, c = _unit(u), _unit(v), _unit(c)
  s = c @ c.T / tau_s
  n = len(u)
  out = 0.0
  for a, b in ((u, v), (v, u)):
    for i in range(n):
      l = a[i] @ b.T / tau
      g = np.exp(s[i] - _lse(s[i]))
      out += (_lse(l) - g @ l) / (2 * n)
  return out


def fd_grad(f, x, h=1e-6):
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g


def assert_close(actual, expected, rtol=1e-5, what=""):
  """Relative to the largest magnitude of `expected` (gradients have near-zero entries)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.max(np.abs(expected)), 1e-12)
  err = np.max(np.abs(actual - expected)) / scale
  assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:.3g}"


def f32(x):
  return jnp.asarray(x, jnp.float32)


def random_inputs(seed, n, d, e, dup_captions=False):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, d))
  c = rng.normal(size=(n, e))
  if dup_captions:  # rows sharing identical captions (e.g. the two views of an image, or one class name)
    c[1::3] = c[0::3][: len(c[1::3])]
  return z, c


IMPLS = [("dense", None), ("blockwise", None), ("blockwise", (4, 5))]

# ------------------------------------------------------------------------------------------------------------
# Values and gradients against NumPy.


@pytest.mark.parametrize("impl,tile", IMPLS)
@pytest.mark.parametrize("n,d,e,tau,tau_s,mask_self,dup", [
    (9, 4, 3, 0.1, 0.1, True, False),
    (13, 6, 5, 0.05, 0.5, True, True),
    (11, 3, 7, 0.5, 0.02, False, True),
    (7, 8, 2, 1.0, 1.0, False, False),
])
def test_xsample_matches_numpy(n, d, e, tau, tau_s, mask_self, dup, impl, tile):
  z, c = random_inputs(n * 7 + d, n, d, e, dup)
  s = _unit(c) @ _unit(c).T
  f = lambda zz: losses.xsample_loss(zz, f32(c), temperature=tau, target_temperature=tau_s,
                                     mask_self=mask_self, impl=impl, tile=tile)
  value, grad = jax.value_and_grad(f)(f32(z))
  ref = functools.partial(ref_xsample, s=s, tau=tau, tau_s=tau_s, mask_self=mask_self)
  assert_close(value, ref(z), what="value")
  assert_close(grad, fd_grad(ref, z), what="grad")


@pytest.mark.parametrize("impl,tile", IMPLS)
def test_xsample_class_table_and_label_graphs_match_numpy(impl, tile):
  rng = np.random.default_rng(1)
  n, k = 15, 4
  z = rng.normal(size=(n, 5))
  labels = rng.integers(0, k, size=n)
  names = rng.normal(size=(k, 6))  # class-name embeddings
  table = _unit(names) @ _unit(names).T
  for kwargs, s in [(dict(class_similarity=f32(table)), table[labels][:, labels]),
                    ({}, (labels[:, None] == labels[None, :]).astype(np.float64))]:
    f = lambda zz: losses.xsample_loss(zz, jnp.asarray(labels), temperature=0.2, target_temperature=0.3,
                                       impl=impl, tile=tile, **kwargs)
    value, grad = jax.value_and_grad(f)(f32(z))
    ref = functools.partial(ref_xsample, s=s, tau=0.2, tau_s=0.3)
    assert_close(value, ref(z), what=f"value {list(kwargs)}")
    assert_close(grad, fd_grad(ref, z), what=f"grad {list(kwargs)}")
  # The table lookup equals the N^2 E matmul on the rows' class-name embeddings.
  np.testing.assert_allclose(
      losses.xsample_loss(f32(z), jnp.asarray(labels), class_similarity=f32(table), impl=impl, tile=tile),
      losses.xsample_loss(f32(z), f32(names[labels]), impl=impl, tile=tile), rtol=1e-6)


@pytest.mark.parametrize("impl,tile", IMPLS)
def test_supcon_and_simclr_match_numpy(impl, tile):
  rng = np.random.default_rng(2)
  z = rng.normal(size=(14, 5))
  labels = np.array([0, 1, 2, 0, 1, 3, 0, 2, 4, 4, 1, 2, 0, 5])  # label 3 and 5: anchors without positives
  f = lambda zz: losses.supcon_loss(zz, jnp.asarray(labels), temperature=0.2, impl=impl, tile=tile)
  value, grad = jax.value_and_grad(f)(f32(z))
  ref = functools.partial(ref_supcon, labels=labels, tau=0.2)
  assert_close(value, ref(z), what="supcon value")
  assert_close(grad, fd_grad(ref, z), what="supcon grad")

  ids = np.concatenate([np.arange(7), np.arange(7)])  # view-major: rows k and k + 7 are views of image k
  f = lambda zz: losses.simclr_loss(zz, jnp.asarray(ids), temperature=0.3, impl=impl, tile=tile)
  value, grad = jax.value_and_grad(f)(f32(z))
  ref = functools.partial(ref_ntxent, tau=0.3)
  assert_close(value, ref(z), what="simclr value")
  assert_close(grad, fd_grad(ref, z), what="simclr grad")


@pytest.mark.parametrize("impl,tile", IMPLS)
def test_clip_matches_numpy(impl, tile):
  rng = np.random.default_rng(3)
  u, v = rng.normal(size=(2, 9, 6))
  log_scale = np.log(1 / 0.07)
  f = lambda uu, vv, ls: losses.clip_loss(uu, vv, ls, impl=impl, tile=tile)
  value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(f32(u), f32(v), f32(log_scale))
  assert_close(value, ref_clip(u, v, log_scale), what="value")
  assert_close(grads[0], fd_grad(lambda x: ref_clip(x, v, log_scale), u), what="grad u")
  assert_close(grads[1], fd_grad(lambda x: ref_clip(u, x, log_scale), v), what="grad v")
  assert_close(grads[2], fd_grad(lambda x: ref_clip(u, v, x), log_scale), rtol=1e-4, what="grad log_scale")
  # Above max_scale the scale is clipped: no gradient to log_scale.
  assert jax.grad(f, argnums=2)(f32(u), f32(v), f32(np.log(200.0))) == 0.0


def test_siglip_matches_numpy():
  rng = np.random.default_rng(4)
  u, v = rng.normal(size=(2, 11, 5))
  log_scale, bias = np.log(10.0), -10.0
  f = lambda uu, vv, ls, b: losses.siglip_loss(uu, vv, ls, b)
  value, grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(f32(u), f32(v), f32(log_scale), f32(bias))
  assert_close(value, ref_siglip(u, v, log_scale, bias), what="value")
  assert_close(grads[0], fd_grad(lambda x: ref_siglip(x, v, log_scale, bias), u), what="grad u")
  assert_close(grads[1], fd_grad(lambda x: ref_siglip(u, x, log_scale, bias), v), what="grad v")
  assert_close(grads[2], fd_grad(lambda x: ref_siglip(u, v, x, bias), log_scale), rtol=1e-4, what="grad scale")
  assert_close(grads[3], fd_grad(lambda x: ref_siglip(u, v, log_scale, x), bias), rtol=1e-4, what="grad bias")


@pytest.mark.parametrize("impl,tile", IMPLS)
def test_cross_modal_matches_numpy(impl, tile):
  rng = np.random.default_rng(5)
  u, v = rng.normal(size=(2, 10, 4))
  c = rng.normal(size=(10, 3))
  c[5:] = c[:5]
  f = lambda uu, vv: losses.xsample_cross_modal_loss(uu, vv, f32(c), temperature=0.2, target_temperature=0.1,
                                                     impl=impl, tile=tile)
  value, grads = jax.value_and_grad(f, argnums=(0, 1))(f32(u), f32(v))
  assert_close(value, ref_cross_modal(u, v, c, 0.2, 0.1), what="value")
  assert_close(grads[0], fd_grad(lambda x: ref_cross_modal(x, v, c, 0.2, 0.1), u), what="grad u")
  assert_close(grads[1], fd_grad(lambda x: ref_cross_modal(u, x, c, 0.2, 0.1), v), what="grad v")


def test_learned_temperature_gets_the_right_gradient():
  z, c = random_inputs(6, 9, 4, 3)
  s = _unit(c) @ _unit(c).T
  for impl in ("dense", "blockwise"):
    g = jax.grad(lambda tau: losses.xsample_loss(f32(z), f32(c), temperature=tau, impl=impl))(f32(0.3))
    assert_close(g, fd_grad(lambda t: ref_xsample(z, s, t, 0.1), np.float64(0.3)), rtol=1e-4, what=impl)


# ------------------------------------------------------------------------------------------------------------
# Limits of the target temperature.


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_class_name_graph_tau_s_to_zero_is_supcon(impl):
  rng = np.random.default_rng(7)
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 1, 2])
  z = f32(rng.normal(size=(12, 6)))
  names = rng.normal(size=(4, 8))
  captions = f32(names[labels])  # identical captions within a class, s = 1
  grad = functools.partial(jax.value_and_grad, argnums=0)
  x_val, x_grad = grad(lambda zz: losses.xsample_loss(zz, captions, target_temperature=1e-3, impl=impl))(z)
  s_val, s_grad = grad(lambda zz: losses.supcon_loss(zz, jnp.asarray(labels), impl=impl))(z)
  np.testing.assert_allclose(x_val, s_val, rtol=1e-6)
  np.testing.assert_allclose(x_grad, s_grad, rtol=1e-5, atol=1e-7)
  # The same through the K x K table and through the plain label graph.
  for kw in (dict(class_similarity=f32(_unit(names) @ _unit(names).T)), {}):
    np.testing.assert_allclose(
        losses.xsample_loss(z, jnp.asarray(labels), target_temperature=1e-3, impl=impl, **kw), s_val, rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_instance_graph_tau_s_to_zero_is_simclr(impl):
  rng = np.random.default_rng(8)
  b = 6
  ids = np.concatenate([np.arange(b), np.arange(b)])
  z = f32(rng.normal(size=(2 * b, 5)))
  one_hot = f32(np.eye(b)[ids])  # an instance-identity "caption" embedding
  simclr = losses.simclr_loss(z, jnp.asarray(ids), impl=impl)
  np.testing.assert_allclose(simclr, ref_ntxent(np.asarray(z, np.float64), 0.1), rtol=1e-5)
  np.testing.assert_allclose(losses.xsample_loss(z, one_hot, target_temperature=1e-3, impl=impl), simclr, rtol=1e-6)
  np.testing.assert_allclose(losses.xsample_loss(z, jnp.asarray(ids), target_temperature=1e-3, impl=impl),
                             simclr, rtol=1e-6)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_tau_s_to_infinity_is_uniform_target(impl):
  z, c = random_inputs(9, 10, 4, 6)
  zu = _unit(z)
  l = zu @ zu.T / 0.1
  uniform = np.mean([_lse(np.delete(l[i], i)) - np.mean(np.delete(l[i], i)) for i in range(10)])
  np.testing.assert_allclose(losses.xsample_loss(f32(z), f32(c), target_temperature=1e7, impl=impl), uniform,
                             rtol=1e-5)


def test_rows_of_dloss_dlogits_sum_to_zero():
  rng = np.random.default_rng(10)
  logits = f32(rng.normal(size=(7, 9)) * 5)
  targets = np.array(rng.normal(size=(7, 9)), np.float32)
  targets[2, :4] = -np.inf  # excluded pairs
  dl = jax.grad(lambda x: jnp.sum(losses.soft_cross_entropy(x, targets)))(logits)
  np.testing.assert_allclose(np.sum(dl, axis=1), 0.0, atol=1e-6)
  # and dL/dl = P - G
  p = jax.nn.softmax(logits, axis=1)
  g = jax.nn.softmax(targets, axis=1)
  np.testing.assert_allclose(dl, p - g, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Across devices: shard_map over the 8-device 'data' axis equals the single-device loss.


def _float_argnums(args):
  return tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))


def _sharded(mesh, loss_fn, n_row_args, n_rep_args, argnums):
  """shard_map of loss_fn(rows..., replicated...) -> global scalar, with grads w.r.t. argnums."""
  specs = (P("data"),) * n_row_args + (P(),) * n_rep_args
  return jax.jit(jax.value_and_grad(
      jax.shard_map(loss_fn, mesh=mesh, in_specs=specs, out_specs=P()), argnums=argnums))


SHARDED_CASES = {
    "xsample": (lambda impl, ax: lambda z, c: losses.xsample_loss(z, c, impl=impl, axis_name=ax, tile=(3, 10)), 2, 0),
    "xsample_nomask": (lambda impl, ax: lambda z, c: losses.xsample_loss(
        z, c, mask_self=False, temperature=0.05, impl=impl, axis_name=ax), 2, 0),
    "supcon": (lambda impl, ax: lambda z, y: losses.supcon_loss(z, y, impl=impl, axis_name=ax, tile=(5, 16)), 2, 0),
    "table": (lambda impl, ax: lambda z, y, t: losses.xsample_loss(
        z, y, class_similarity=t, impl=impl, axis_name=ax), 2, 1),
    "clip": (lambda impl, ax: lambda u, v, s: losses.clip_loss(u, v, s, impl=impl, axis_name=ax, tile=(4, 9)), 2, 1),
    "cross_modal": (lambda impl, ax: lambda u, v, c: losses.xsample_cross_modal_loss(
        u, v, c, impl=impl, axis_name=ax), 3, 0),
    "siglip": (lambda impl, ax: lambda u, v, s, b: losses.siglip_loss(u, v, s, b, axis_name=ax), 2, 2),
}


def _case_inputs(name, n=40):
  rng = np.random.default_rng(11)
  z, v = f32(rng.normal(size=(n, 6))), f32(rng.normal(size=(n, 6)))
  c = f32(rng.normal(size=(n, 5)))
  labels = jnp.asarray(rng.integers(0, 6, size=n), jnp.int32)
  table = f32(np.corrcoef(rng.normal(size=(6, 9))))
  return {"xsample": (z, c), "xsample_nomask": (z, c), "supcon": (z, labels), "table": (z, labels, table),
          "clip": (z, v, f32(2.5)), "cross_modal": (z, v, c), "siglip": (z, v, f32(2.3), f32(-5.0))}[name]


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("name", list(SHARDED_CASES))
def test_sharded_equals_unsharded(mesh, name, impl):
  make, n_rows, n_rep = SHARDED_CASES[name]
  args = _case_inputs(name)
  argnums = _float_argnums(args)
  value, grads = _sharded(mesh, make(impl, "data"), n_rows, n_rep, argnums)(*args)
  ref_value, ref_grads = jax.value_and_grad(make(impl, None), argnums=argnums)(*args)
  np.testing.assert_allclose(value, ref_value, rtol=2e-6)
  for i, g, rg in zip(argnums, grads, ref_grads):
    assert_close(g, rg, rtol=2e-6, what=f"grad {i}")


def test_gradient_taken_inside_shard_map_is_the_global_gradient(mesh):
  """A train step that runs entirely inside shard_map differentiates there; each device gets its rows' grads."""
  z, c = _case_inputs("xsample")
  for impl in ("dense", "blockwise"):
    def local(zz, cc):
      return jax.value_and_grad(lambda x: losses.xsample_loss(x, cc, axis_name="data", impl=impl))(zz)
    value, grad = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                                        out_specs=(P(), P("data"))))(z, c)
    ref_value, ref_grad = jax.value_and_grad(lambda x: losses.xsample_loss(x, c, impl=impl))(z)
    np.testing.assert_allclose(value, ref_value, rtol=2e-6)
    assert_close(grad, ref_grad, rtol=2e-6, what=impl)


def test_blockwise_column_gradients_are_reduce_scattered(mesh):
  z, c = _case_inputs("xsample")
  step = _sharded(mesh, SHARDED_CASES["xsample"][0]("blockwise", "data"), 2, 0, (0,))
  hlo = step.lower(z, c).compile().as_text()
  assert "reduce-scatter" in hlo and "all-gather" in hlo


# ------------------------------------------------------------------------------------------------------------
# Blockwise vs dense in the hard cases.


@pytest.mark.parametrize("tile", [(8, 16), (7, 13), (64, 1000), None])
@pytest.mark.parametrize("tau", [0.1, 0.01])
def test_blockwise_equals_dense(tile, tau):
  z, c = random_inputs(12, 53, 16, 12, dup_captions=True)  # 53: divisible by no tile
  f = lambda impl: jax.value_and_grad(
      lambda zz: losses.xsample_loss(zz, f32(c), temperature=tau, impl=impl, tile=tile))(f32(z))
  (dv, dg), (bv, bg) = f("dense"), f("blockwise")
  np.testing.assert_allclose(bv, dv, rtol=1e-6)
  assert_close(bg, dg, rtol=1e-5, what="grad")
  assert np.isfinite(dv) and dv > 1.0  # tau = 0.01: logits up to 100, still finite


@pytest.mark.parametrize("tile,sym_block", [((4, 4), None), ((5, 16), None), (None, None), (None, 6)])
def test_self_similarity_sweep_matches_numpy_and_the_general_sweep(tile, sym_block, monkeypatch):
  """xsample_loss(z, c) forms only the blocks I <= J (l and t are symmetric); given the columns as another array
  the general sweep forms them all. Both against NumPy: value, and gradients for z and the temperature."""
  if sym_block:  # the default blocks: 13 rows in at most 6 a block -> 3 blocks of 5 -> 2 of 8 (multiples of 8)
    monkeypatch.setattr(losses, "SYM_BLOCK", sym_block)
  n = 13  # 4, 5 or 8 rows a block: ragged, with padding rows that must not count as columns either
  z, c = random_inputs(21, n, 5, 4, dup_captions=True)
  graph = losses._graph_from_c(f32(c), n, None, 0.2, hard=False)
  sym = lambda zz, tau: losses.xsample_loss(zz, f32(c), temperature=tau, target_temperature=0.2, impl="blockwise",
                                            tile=tile)
  general = lambda zz, tau: losses._mean_soft_ce(zz, zz + 0.0, graph, 1.0 / tau, mask_self=True, axis_name=None,
                                                 impl="blockwise", tile=tile)
  s = _unit(c) @ _unit(c).T
  for f, kernel in ((sym, "_sym_sum"), (general, "_blockwise_sum")):
    assert kernel in str(jax.make_jaxpr(f)(f32(z), f32(0.3)))
    value, (gz, gtau) = jax.value_and_grad(f, argnums=(0, 1))(f32(z), f32(0.3))
    assert_close(value, ref_xsample(z, s, 0.3, 0.2), what=f"{kernel} value")
    assert_close(gz, fd_grad(lambda x: ref_xsample(x, s, 0.3, 0.2), z), what=f"{kernel} grad z")
    assert_close(gtau, fd_grad(lambda t: ref_xsample(z, s, t, 0.2), np.float64(0.3)), rtol=1e-4,
                 what=f"{kernel} grad tau")


def test_fixed_softmax_shifts_equal_online_maxima():
  """Python-float temperatures let the self-similarity sweep shift exps by the bounds 1 / tau (no maxima); array
  temperatures take the online maxima. Same value and gradient; and a too small tau falls back to the maxima."""
  z, c = random_inputs(22, 21, 6, 5, dup_captions=True)
  f = lambda tau, tau_s: jax.value_and_grad(lambda zz: losses.xsample_loss(
      zz, f32(c), temperature=tau, target_temperature=tau_s, impl="blockwise", tile=(8, 8)))(f32(z))
  (fv, fg), (ov, og) = f(0.05, 0.1), f(f32(0.05), f32(0.1))
  np.testing.assert_allclose(fv, ov, rtol=1e-6)
  assert_close(fg, og, rtol=1e-5, what="grad")
  assert losses._fixed_shift(0.05) == 20.0 and losses._fixed_shift(0.02) is None and losses._fixed_shift(f32(0.1)) is None


def test_blockwise_equals_dense_in_bfloat16():
  """bf16 embeddings, f32 accumulation: values agree to 1e-5, gradients (returned in bf16) to 1e-2."""
  z, c = random_inputs(13, 61, 32, 24)
  zb, cb = jnp.asarray(z, jnp.bfloat16), jnp.asarray(c, jnp.bfloat16)
  for tile in [(8, 16), None]:
    f = lambda impl: jax.value_and_grad(lambda zz: losses.xsample_loss(zz, cb, impl=impl, tile=tile))(zb)
    (dv, dg), (bv, bg) = f("dense"), f("blockwise")
    assert dv.dtype == jnp.float32 and bg.dtype == jnp.bfloat16
    np.testing.assert_allclose(bv, dv, rtol=1e-5)
    assert_close(bg, dg, rtol=1e-2, what="bf16 grad")
    # and both are close to the f32 loss of the same inputs
    np.testing.assert_allclose(dv, losses.xsample_loss(f32(z), f32(c)), rtol=2e-2)


def test_auto_impl_picks_blockwise_for_large_batches(monkeypatch):
  z, c = random_inputs(14, 33, 8, 8)
  dense = losses.xsample_loss(f32(z), f32(c), impl="dense")
  monkeypatch.setattr(losses, "AUTO_BLOCKWISE_ELEMENTS", 16)
  jaxpr = str(jax.make_jaxpr(lambda zz: losses.xsample_loss(zz, f32(c), impl="auto"))(f32(z)))
  assert "custom_vjp" in jaxpr
  np.testing.assert_allclose(losses.xsample_loss(f32(z), f32(c), impl="auto"), dense, rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Bad input: clear errors at trace time.


@pytest.mark.parametrize("call,match", [
    (lambda z, c: losses.xsample_loss(z, c[:-1]), "z has 8 rows but c has 7"),
    (lambda z, c: losses.xsample_loss(z[0], c), r"z must be \[rows, dim\]"),
    (lambda z, c: losses.xsample_loss(z, c[:, :, None]), "must be"),
    (lambda z, c: losses.xsample_loss(z, c, temperature=0.0), "temperature must be > 0"),
    (lambda z, c: losses.xsample_loss(z, c, target_temperature=-1.0), "target_temperature must be > 0"),
    (lambda z, c: losses.xsample_loss(z, c, impl="flash"), "unknown impl 'flash'"),
    (lambda z, c: losses.xsample_loss(z, c, class_similarity=jnp.eye(3)), "class_similarity needs integer"),
    (lambda z, c: losses.xsample_loss(z, jnp.zeros(8, jnp.int32), class_similarity=jnp.ones(3)), "square"),
    (lambda z, c: losses.supcon_loss(z, jnp.zeros(6, jnp.int32)), "z has 8 rows but labels has 6"),
    (lambda z, c: losses.clip_loss(z, c, 1.0), "must have the same shape"),
    (lambda z, c: losses.siglip_loss(z, z[:4], 1.0, 0.0), "must have the same shape"),
    (lambda z, c: losses.xsample_loss(z, c, impl="blockwise", tile=(0, 4)), "tile must be two positive"),
])
def test_bad_input_raises_at_trace_time(call, match):
  z, c = jnp.ones((8, 4)), jnp.ones((8, 3))
  with pytest.raises((ValueError, TypeError), match=match):
    jax.eval_shape(call, z, c)

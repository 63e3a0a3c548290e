"""ResNet convs on small feature maps run as a patches-matmul (models/resnet.py, issue 11): the same values and
gradients as `jax.lax.conv_general_dilated` (float64), no convolution left in the compiled gradient, and a
ResNet-18 at 64 px (stage 4 is 2x2) unchanged against the plain-conv path with the same parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xsample_jax import models
from xsample_jax.models import resnet

NHWC = ("NHWC", "HWIO", "NHWC")

# (input H, W, kernel, stride, does the ResNet's conv switch to patches)
SHAPES = [
    ((2, 2), 3, 1, True),  # ResNet-18 stage 4 at 64 px
    ((2, 2), 3, 2, True),
    ((4, 4), 3, 2, True),  # into stage 4: the 2x2 output gradient is the input-gradient conv's input
    ((4, 4), 1, 2, True),  # stage 4's shortcut
    ((4, 4), 3, 1, False),  # stage 3: XLA's own conv is fine there
    ((1, 1), 3, 1, True),  # only the centre tap sees data: the others are dropped
    ((3, 5), 3, 2, True),  # odd, non-square
    ((8, 8), 3, 1, False),
]


def _plain(x, w, stride, k):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((k // 2, k // 2),) * 2, dimension_numbers=NHWC)


def _ours(x, w, stride, k):
  return resnet.conv_general_dilated(x, w, (stride, stride), ((k // 2, k // 2),) * 2,
                                     dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC))


def _value_and_grads(conv, x, w, t):
  loss = lambda x, w: jnp.sum(conv(x, w) * t)
  return conv(x, w), *jax.grad(loss, argnums=(0, 1))(x, w)


@pytest.mark.parametrize("hw,k,stride,switches", SHAPES)
def test_patches_conv_equals_lax_conv_float64(hw, k, stride, switches):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (3, *hw, 5), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (k, k, 5, 7), jnp.float64)
    out = _plain(x, w, stride, k)
    t = jax.random.normal(jax.random.key(2), out.shape, jnp.float64)  # a cotangent that weighs every output
    want = _value_and_grads(lambda x, w: _plain(x, w, stride, k), x, w, t)
    direct = _value_and_grads(lambda x, w: resnet.patches_conv(x, w, (stride, stride), ((k // 2, k // 2),) * 2), x, w, t)
    dispatched = _value_and_grads(lambda x, w: _ours(x, w, stride, k), x, w, t)
    for got in (direct, dispatched):
      for a, b, name in zip(got, want, ("out", "d_input", "d_kernel")):
        assert a.dtype == jnp.float64 and a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)
  out_hw = out.shape[1:3]
  assert resnet.use_patches(hw, out_hw, (k, k), (stride, stride)) == switches


def test_patches_conv_float32_and_bfloat16():
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 32)) * 0.1
  t = jax.random.normal(jax.random.key(2), (4, 2, 2, 32))
  want = _value_and_grads(lambda x, w: _plain(x, w, 1, 3), x, w, t)
  got = _value_and_grads(lambda x, w: _ours(x, w, 1, 3), x, w, t)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  got_bf16 = _ours(xb, wb, 1, 3)
  assert got_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(got_bf16.astype(jnp.float32), _plain(xb, wb, 1, 3).astype(jnp.float32), rtol=2e-2,
                             atol=5e-2)


def test_no_convolution_left_in_the_small_conv_gradient():
  """The root cause: XLA:CPU rewrites these convs (operands swapped, rhs_reversal) into a slow loop."""
  x, w = jnp.zeros((8, 2, 2, 16)), jnp.zeros((3, 3, 16, 16))
  step = jax.jit(jax.grad(lambda x, w: jnp.sum(_ours(x, w, 1, 3) ** 2), argnums=(0, 1)))
  assert "convolution(" not in step.lower(x, w).compile().as_text()
  plain = jax.jit(jax.grad(lambda x, w: jnp.sum(_plain(x, w, 1, 3) ** 2), argnums=(0, 1)))
  assert "convolution(" in plain.lower(x, w).compile().as_text()


# (input H, W, kernel, stride, padding) of kernel gradients as a matmul: ResNet's stem and stage-1 forms, odd sizes,
# a 1x1, and a 1x1 input where only the centre tap sees data (the others get a zero gradient).
WGRAD_SHAPES = [((16, 16), 3, 1, 1), ((17, 15), 3, 2, 1), ((32, 32), 7, 2, 3), ((16, 16), 1, 1, 0),
                ((1, 1), 3, 1, 1)]


@pytest.mark.parametrize("hw,k,stride,pad", WGRAD_SHAPES)
def test_matmul_wgrad_conv_equals_lax_conv_float64(hw, k, stride, pad):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, *hw, 3), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 4), jnp.float64)
    pads = ((pad, pad),) * 2
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=NHWC)
    t = jax.random.normal(jax.random.key(2), plain(x, w).shape, jnp.float64)
    want = _value_and_grads(plain, x, w, t)
    got = _value_and_grads(lambda x, w: resnet.matmul_wgrad_conv(x, w, (stride, stride), pads), x, w, t)
    for a, b, name in zip(got, want, ("out", "d_input", "d_kernel")):
      assert a.dtype == jnp.float64 and a.shape == b.shape, name
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)


def test_large_wide_maps_take_the_kernel_gradient_as_a_matmul():
  """From 8 x 8 outputs and 64 channels up the compiled gradient keeps XLA's forward and input-gradient convs, and no
  third conv (the kernel gradient, a conv over the whole map that XLA:CPU runs at ~20-35 GFLOP/s); on smaller maps,
  or narrower convs (whose patches cost more to build than XLA's kernel-gradient conv), all three stay."""
  grad = lambda hw, cout: jax.jit(jax.grad(lambda x, w: jnp.sum(_ours(x, w, 1, 3) ** 2), argnums=(0, 1))).lower(
      jnp.zeros((2, *hw, 8)), jnp.zeros((3, 3, 8, cout))).compile().as_text().count(" convolution(")
  assert resnet.use_matmul_wgrad((8, 8), 64)
  assert not resnet.use_matmul_wgrad((4, 4), 64) and not resnet.use_matmul_wgrad((8, 8), 32)
  assert grad((8, 8), 64) == 2
  assert grad((4, 4), 64) == 3
  assert grad((8, 8), 16) == 3


@pytest.mark.parametrize("shape,window,stride,pad", [((2, 8, 8, 3), 3, 2, 1), ((2, 7, 9, 2), 3, 2, 1),
                                                     ((1, 2, 2, 1), 3, 2, 1), ((2, 6, 6, 2), 2, 2, 0),
                                                     ((1, 5, 5, 2), 3, 1, 1)])
def test_max_pool_equals_nnx_max_pool_with_ties_float64(shape, window, stride, pad):
  """Values in {0, 1, 2}: most windows hold their maximum more than once, and the gradient must go where
  nnx.max_pool's goes (the first maximum in row-major order), not to every maximum."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), jnp.float64)
    args = (window, window), (stride, stride), ((pad, pad),) * 2
    ref = lambda x: nnx.max_pool(x, args[0], strides=args[1], padding=args[2])
    ours = lambda x: resnet.max_pool(x, *args)
    t = jnp.asarray(np.random.default_rng(1).normal(size=ref(x).shape))
    np.testing.assert_array_equal(ours(x), ref(x))
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(ours(x) * t))(x),
                               jax.grad(lambda x: jnp.sum(ref(x) * t))(x), rtol=1e-12, atol=1e-12)


def test_resnet_convs_keep_nnx_conv_parameters():
  tower = nnx.eval_shape(lambda: models.make_image_tower("resnet18", rngs=nnx.Rngs(0)))
  state = nnx.to_pure_dict(nnx.state(tower, nnx.Param))
  assert state["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
  assert state["blocks"][7]["conv2"]["kernel"].shape == (3, 3, 512, 512)
  assert state["blocks"][6]["shortcut"]["conv"]["kernel"].shape == (1, 1, 256, 512)
  convs = [m for _, m in nnx.iter_graph(tower) if isinstance(m, nnx.Conv)]
  assert len(convs) == 20 and all(c.conv_general_dilated is resnet.conv_general_dilated for c in convs)


def _resnet18_features_and_grads(dtype, patches, monkeypatch):
  """ResNet-18 (imagenet stem) at 64 px, parameters of seed 0: features and parameter gradients, train-mode BN."""
  monkeypatch.setattr(resnet, "PATCHES_CONV", patches)  # read at trace time: each call's nnx.jit traces afresh
  model = models.make_image_tower("resnet18", stem="imagenet", dtype=dtype, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))

  @nnx.jit
  def features_and_grads(model, x):
    def loss(model):
      feats = model(x.astype(dtype))
      return jnp.sum(feats.astype(jnp.float32) ** 2), feats
    (_, feats), grads = nnx.value_and_grad(loss, has_aux=True)(model)  # w.r.t. the Params
    return feats.astype(jnp.float32), grads

  feats, grads = features_and_grads(model, x)
  return np.asarray(feats), jax.tree.map(lambda g: np.asarray(g, np.float32), nnx.to_pure_dict(grads))


def test_resnet18_64px_unchanged_against_plain_convs(monkeypatch):
  """Same parameters, same images: features and every parameter gradient with the patches path on and off."""
  f_on, g_on = _resnet18_features_and_grads(jnp.float32, True, monkeypatch)
  f_off, g_off = _resnet18_features_and_grads(jnp.float32, False, monkeypatch)
  assert f_on.shape == (4, 512)
  np.testing.assert_allclose(f_on, f_off, rtol=1e-5, atol=1e-5)
  # float32 sums run in another order through 20 convs and BNs: compare at 1e-5 of each tensor's scale
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()), g_on, g_off)


def test_resnet18_64px_bfloat16_as_accurate_as_plain_convs(monkeypatch):
  """bfloat16 compute rounds differently along the two paths: each is compared with the float32 model, and the
  patches path must be as close to it as the plain convs are (features, the stage-4 and stem kernel gradients)."""
  f_ref, g_ref = _resnet18_features_and_grads(jnp.float32, False, monkeypatch)
  f_on, g_on = _resnet18_features_and_grads(jnp.bfloat16, True, monkeypatch)
  f_off, g_off = _resnet18_features_and_grads(jnp.bfloat16, False, monkeypatch)
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  picks = {"features": lambda f, g: f, "stage4_conv2": lambda f, g: g["blocks"][7]["conv2"]["kernel"],
           "stage4_conv1": lambda f, g: g["blocks"][6]["conv1"]["kernel"], "stem": lambda f, g: g["stem_conv"]["kernel"]}
  for name, pick in picks.items():
    ref = pick(f_ref, g_ref)
    assert rel(pick(f_on, g_on), ref) <= 1.2 * rel(pick(f_off, g_off), ref) + 1e-3, name

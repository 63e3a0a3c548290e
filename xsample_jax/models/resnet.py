"""ResNet v1.5 (stride in the 3x3 conv of a bottleneck, as torchvision), without the classifier.

Output: globally average-pooled features [B, width] (512 for ResNet-18, 2048 for ResNet-50).

BatchNorm uses the statistics of the whole batch the model sees. Under the sharded train step (the model called in
`jax.jit` on a batch split over 'data') that is already the global batch: the mean over the batch axis of a sharded
array is a global reduction, XLA inserts the all-reduce. Inside `jax.shard_map` each device sees only its rows, so
build the model with `bn_axis_name='data'` to pmean the statistics across devices (SimCLR's global BN either way).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from xsample_jax.models.partitioning import axes

STEMS = ("imagenet", "cifar")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  block: str  # "basic" | "bottleneck"
  stage_sizes: tuple[int, ...]
  width: int  # channels of the first stage; doubles every stage
  stem: str  # "imagenet": 7x7/2 conv + 3x3/2 max-pool; "cifar": 3x3/1 conv, for 32-64 px images


VARIANTS = {
    "resnet_tiny": ResNetConfig("basic", (1, 1, 1), 16, "cifar"),
    "resnet18": ResNetConfig("basic", (2, 2, 2, 2), 64, "imagenet"),
    "resnet50": ResNetConfig("bottleneck", (3, 4, 6, 3), 64, "imagenet"),
}


# False: every conv is a plain XLA conv, forward and gradients, and the stem's max-pool is `nnx.max_pool` (read at
# trace time; benchmarks/conv_bench.py compares the two).
PATCHES_CONV = True
# Kernel gradients as a matmul (`matmul_wgrad_conv`) from this many output positions (Ho * Wo) up, on CPU. The ResNet-18
# 64 px X-CLR step (batch 128 x 2, 2 cores): 2.50 s with none, 2.05 s from 256 up (the stem and stage 1), 2.01 s from
# 64 up (and stage 2), 1.98 s from 16 up, measured interleaved in one process.
MATMUL_WGRAD_MIN_POSITIONS = 64
# ... and for convs of this many output channels or more: the matmul does 2 * Cout FLOPs per patch element it reads,
# and with few channels building the patches costs more than XLA's kernel-gradient conv. The smoke step (resnet_tiny,
# 16-64 channels at 32 px, 128 rows): 0.241 s with every conv from 64 positions up, 0.197 s from 64 channels up (its
# last stage), 0.193 s with none; ResNet-18's convs all have 64 or more.
MATMUL_WGRAD_MIN_CHANNELS = 64
_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _taps(x, kh, kw, strides, padding, pad_value=0.0):
  """The k*k shifted, strided windows of x (NHWC) padded with `pad_value`: ([B, Ho, Wo, C] per tap, taps (i, j)),
  leaving out taps that only ever see padding."""
  (b, h, wd, c) = x.shape
  (ph, pw), (sh, sw) = padding, strides
  ho, wo = (h + sum(ph) - kh) // sh + 1, (wd + sum(pw) - kw) // sw + 1
  touches = lambda i, lo, size, s, n: any(lo <= i + s * t < lo + size for t in range(n))
  taps = [(i, j) for i in range(kh) for j in range(kw)
          if touches(i, ph[0], h, sh, ho) and touches(j, pw[0], wd, sw, wo)]
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=pad_value)
  return [jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
          for i, j in taps], taps


def _patches(x, kh, kw, strides, padding):
  """[B, Ho, Wo, taps*C]: the taps' windows (`_taps`) concatenated on channels, and the taps."""
  cols, taps = _taps(x, kh, kw, strides, padding)
  return (cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)), taps


def patches_conv(x, w, strides, padding, *, precision=None, preferred_element_type=None):
  """NHWC x HWIO convolution as one matmul over the k*k shifted windows (im2col), concatenated on channels.

  Pads x, takes each kernel tap's window with a static strided slice, drops taps that only ever see padding, and
  contracts [B, Ho, Wo, taps*C] with the kernel reshaped to [taps*C, O]. Its autodiff is matmuls, slices and pads:
  no convolution, so nothing for XLA to rewrite.
  """
  patches, taps = _patches(x, w.shape[0], w.shape[1], strides, padding)
  kernel = jnp.concatenate([w[i, j] for i, j in taps], axis=0) if len(taps) > 1 else w[taps[0]]
  return jax.lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def matmul_wgrad_conv(x, w, strides, padding, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` (NHWC x HWIO) whose kernel gradient is one matmul, patches^T @ dy.

  XLA:CPU computes a kernel gradient as a convolution whose window is the whole feature map, at 20-35 GFLOP/s on
  ResNet-18's stem and stage 1 at 64 px, against ~140 for the forward conv (benchmarks/conv_bench.py). The value and
  the input gradient stay XLA's convs.
  """
  return _xla_conv(x, w, strides, padding, precision, preferred_element_type)


def _xla_conv(x, w, strides, padding, precision, preferred_element_type):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision,
                                      preferred_element_type=preferred_element_type)


def _matmul_wgrad_fwd(x, w, strides, padding, precision, preferred_element_type):
  return matmul_wgrad_conv(x, w, strides, padding, precision, preferred_element_type), (x, w)


def _matmul_wgrad_bwd(strides, padding, precision, preferred_element_type, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, w, strides, padding, precision, preferred_element_type), x)
  (dx,) = input_vjp(dy)
  kh, kw, c, o = w.shape
  patches, taps = _patches(x, kh, kw, strides, padding)
  # Positions flattened: a plain 2-D [taps*C, P] x [P, O] matmul (1.3-1.6x the 4-D contraction, measured).
  dw = jax.lax.dot_general(patches.reshape(-1, patches.shape[-1]), dy.astype(x.dtype).reshape(-1, o),
                           (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
  dw = dw.reshape(len(taps), c, o)
  if len(taps) < kh * kw:  # taps that only see padding get no gradient
    full = jnp.zeros((kh * kw, c, o), dw.dtype)
    dw = full.at[jnp.array([i * kw + j for i, j in taps])].set(dw)
  return dx, dw.reshape(kh, kw, c, o).astype(w.dtype)


matmul_wgrad_conv.defvjp(_matmul_wgrad_fwd, _matmul_wgrad_bwd)


def use_patches(in_hw, out_hw, kernel_hw, strides) -> bool:
  """Whether a conv of these static sizes runs as `patches_conv`: its window is larger than its input or its output
  in some dimension (XLA:CPU then swaps the operands of the forward or of the input-gradient conv), or it is a
  strided 1x1 conv (a strided slice and a matmul: 1.3-1.6x the plain conv on CPU at ResNet-18's shortcuts)."""
  if not PATCHES_CONV:
    return False
  if any(k > min(i, o) for i, o, k in zip(in_hw, out_hw, kernel_hw)):
    return True
  return tuple(kernel_hw) == (1, 1) and any(s > 1 for s in strides)


def use_matmul_wgrad(out_hw, out_channels: int) -> bool:
  """Whether a plain-layout conv with this output size and width gets its kernel gradient as a matmul (CPU only:
  elsewhere XLA's own kernel-gradient conv is fast, and the patches would cost k*k times the input's memory)."""
  return (PATCHES_CONV and jax.default_backend() == "cpu" and out_hw[0] * out_hw[1] >= MATMUL_WGRAD_MIN_POSITIONS
          and out_channels >= MATMUL_WGRAD_MIN_CHANNELS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, out_sharding=None,
                         preferred_element_type=None, **kwargs):
  """`jax.lax.conv_general_dilated`, but a patches-matmul (`patches_conv`) where `use_patches` says so, and with its
  kernel gradient as a matmul (`matmul_wgrad_conv`) where `use_matmul_wgrad` says so.

  Chosen at trace time from the static shapes, for NHWC/HWIO convs without dilation or groups. XLA:CPU's algebraic
  simplifier swaps the operands of a conv whose input is smaller than its window (the kernel becomes the lhs, with
  rhs_reversal) and the swapped form compiles to a naive loop. At 64 px, ResNet-18's stage 4 (2x2x512) hit it in
  the forward and input-gradient convs of its 3x3 convs (and in the input gradient of the 3x3/2 conv into it, whose
  2x2 output gradient is the input there): ~2-6 GFLOP/s against ~100 as a matmul (benchmarks/conv_bench.py).
  """
  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  pads = (jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
          if isinstance(padding, str) else padding)
  plain_layout = (lhs.ndim == 4 and dn == _NHWC and feature_group_count == 1 and out_sharding is None and not kwargs
                  and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation)))
  if plain_layout:
    strides, pads = tuple(window_strides), tuple(tuple(p) for p in pads)
    out_hw = [(i + lo + hi - k) // s + 1 for i, (lo, hi), k, s in zip(lhs.shape[1:3], pads, rhs.shape[:2], strides)]
    if use_patches(lhs.shape[1:3], out_hw, rhs.shape[:2], strides):
      return patches_conv(lhs, rhs, strides, pads, precision=precision, preferred_element_type=preferred_element_type)
    if use_matmul_wgrad(out_hw, rhs.shape[3]):
      return matmul_wgrad_conv(lhs, rhs, strides, pads, precision, preferred_element_type)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, precision=precision,
                                      preferred_element_type=preferred_element_type, out_sharding=out_sharding,
                                      **kwargs)


def max_pool(x, window, strides, padding):
  """NHWC max-pool as the max of the window's shifted slices, with the gradient of `nnx.max_pool`: each output's
  gradient goes to the first maximum of its window in row-major order.

  XLA:CPU's gradient of a reduce-window max (select-and-scatter, expanded with iotas over the padded input) took
  ~390 ms of the 2.4 s ResNet-18 64 px step; this one is a few elementwise passes. Equal to nnx.max_pool, value and
  gradient, including ties (tests/test_resnet_conv.py).
  """
  if not PATCHES_CONV:
    return nnx.max_pool(x, window, strides=strides, padding=padding)
  return _max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  cols, _ = _taps(x, *window, strides, padding, pad_value=-jnp.inf)
  return functools.reduce(jnp.maximum, cols)


def _max_pool_fwd(x, window, strides, padding):
  out = _max_pool(x, window, strides, padding)
  return out, (x, out)


def _max_pool_bwd(window, strides, padding, residuals, g):
  x, out = residuals
  cols, taps = _taps(x, *window, strides, padding, pad_value=-jnp.inf)
  (ph, pw), (sh, sw) = padding, strides
  b, h, w, c = x.shape
  hp, wp = h + sum(ph), w + sum(pw)
  ho, wo = out.shape[1:3]
  dxp, free = jnp.zeros((b, hp, wp, c), g.dtype), jnp.ones(out.shape, bool)
  for col, (i, j) in zip(cols, taps):
    hit = free & (col == out)  # the first tap holding the maximum takes the gradient
    free = free & ~hit
    # Back to the padded input's positions: interior padding undoes the stride.
    dxp = dxp + jax.lax.pad(jnp.where(hit, g, 0), jnp.zeros((), g.dtype),
                            ((0, 0, 0), (i, hp - i - (ho - 1) * sh - 1, sh - 1),
                             (j, wp - j - (wo - 1) * sw - 1, sw - 1), (0, 0, 0)))
  return (dxp[:, ph[0]:ph[0] + h, pw[0]:pw[0] + w],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Makes the convs and BNs of one network, all with the same dtype, init and BatchNorm settings."""
  rngs: nnx.Rngs
  dtype: object = None
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9

  def conv(self, cin: int, cout: int, k: int, stride: int = 1) -> nnx.Conv:
    # Explicit symmetric padding as torchvision ('SAME' pads stride-2 convs asymmetrically).
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((k // 2, k // 2),) * 2, use_bias=False,
                    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), dtype=self.dtype,
                    rngs=self.rngs, kernel_metadata=axes(None, None, "conv_in", "conv_out"),
                    conv_general_dilated=conv_general_dilated)

  def bn(self, c: int, zero_scale: bool = False) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=self.bn_momentum, epsilon=1e-5, axis_name=self.bn_axis_name, dtype=self.dtype,
                         scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
                         scale_metadata=axes("norm"), bias_metadata=axes("norm"), rngs=self.rngs)


class _Shortcut(nnx.Module):
  def __init__(self, make: Layers, cin: int, cout: int, stride: int):
    self.conv = make.conv(cin, cout, 1, stride)
    self.bn = make.bn(cout)

  def __call__(self, x):
    return self.bn(self.conv(x))


def _shortcut(make: Layers, cin: int, cout: int, stride: int):
  return _Shortcut(make, cin, cout, stride) if (stride != 1 or cin != cout) else None


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, make: Layers, cin: int, width: int, stride: int, zero_init_last: bool):
    self.conv1, self.bn1 = make.conv(cin, width, 3, stride), make.bn(width)
    self.conv2, self.bn2 = make.conv(width, width, 3), make.bn(width, zero_init_last)
    self.shortcut = _shortcut(make, cin, width, stride)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, make: Layers, cin: int, width: int, stride: int, zero_init_last: bool):
    cout = width * self.expansion
    self.conv1, self.bn1 = make.conv(cin, width, 1), make.bn(width)
    self.conv2, self.bn2 = make.conv(width, width, 3, stride), make.bn(width)
    self.conv3, self.bn3 = make.conv(width, cout, 1), make.bn(cout, zero_init_last)
    self.shortcut = _shortcut(make, cin, cout, stride)

  def __call__(self, x):
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):

  def __init__(self, cfg: ResNetConfig, *, in_channels: int = 3, zero_init_residual: bool = False,
               bn_axis_name: str | None = None, bn_momentum: float = 0.9, stem: str | None = None, dtype=None,
               rngs: nnx.Rngs):
    """`stem` overrides the variant's (e.g. "cifar" for a ResNet-18 on 32 px images)."""
    stem = stem or cfg.stem
    if stem not in STEMS:
      raise ValueError(f"unknown stem {stem!r}; valid: {STEMS}")
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg.block]
    make = Layers(rngs, dtype, bn_axis_name, bn_momentum)
    self.stem = stem
    self.stem_conv = make.conv(in_channels, cfg.width, 7 if stem == "imagenet" else 3, 2 if stem == "imagenet" else 1)
    self.stem_bn = make.bn(cfg.width)
    blocks, cin = [], cfg.width
    for i, n in enumerate(cfg.stage_sizes):
      width = cfg.width * 2**i
      for j in range(n):
        blocks.append(block(make, cin, width, 2 if (i > 0 and j == 0) else 1, zero_init_residual))
        cin = width * block.expansion
    self.blocks = nnx.List(blocks)
    self.width = cin

  def __call__(self, images):
    x = jax.nn.relu(self.stem_bn(self.stem_conv(images)))
    if self.stem == "imagenet":
      x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

"""ResNet v1.5 (stride in the 3x3 conv of a bottleneck, as torchvision), without the classifier.

Output: globally average-pooled features [B, width] (512 for ResNet-18, 2048 for ResNet-50).

BatchNorm uses the statistics of the whole batch the model sees. Under the sharded train step (the model called in
`jax.jit` on a batch split over 'data') that is already the global batch: the mean over the batch axis of a sharded
array is a global reduction, XLA inserts the all-reduce. Inside `jax.shard_map` each device sees only its rows, so
build the model with `bn_axis_name='data'` to pmean the statistics across devices (SimCLR's global BN either way).
"""
from __future__ import annotations

import dataclasses

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
                    rngs=self.rngs, kernel_metadata=axes(None, None, "conv_in", "conv_out"))

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
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x)
    return jnp.mean(x, axis=(1, 2))

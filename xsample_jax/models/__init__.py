"""Models by variant string: image towers, projection heads, text towers (Flax NNX).

  tower = make_image_tower("resnet50", rngs=nnx.Rngs(0))            # [B, H, W, 3] -> [B, tower.width]
  model = make_image_encoder("resnet50", (2048, 2048, 128), rngs=nnx.Rngs(0))   # -> (features, projections)
  text = make_text_tower("text_b", out_dim=512, rngs=nnx.Rngs(0))   # ids, mask [B, L] -> [B, 512]

Train / eval mode: `model.train()` / `model.eval()` (BatchNorm batch statistics vs running averages), or
`nnx.view(model, use_running_average=True)` for an eval view sharing the same arrays.
The sentence encoder for the similarity graph lives in `sentence_encoder.py` and is imported from there.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from xsample_jax.models import resnet, text, vit
from xsample_jax.models.heads import ProjectionHead
from xsample_jax.models.partitioning import RULES, state_shardings

IMAGE_TOWERS = tuple(resnet.VARIANTS) + tuple(vit.VARIANTS)
TEXT_TOWERS = tuple(text.VARIANTS)


def make_image_tower(variant: str, *, rngs: nnx.Rngs, dtype=None, **kwargs) -> resnet.ResNet | vit.ViT:
  """A backbone returning pooled features [B, tower.width].

  ResNet kwargs: zero_init_residual, bn_axis_name, bn_momentum, stem ('imagenet' | 'cifar'), in_channels.
  ViT kwargs: image_size (default 224), pool ('gap' | 'cls'), posemb ('learn' | 'sincos2d'), in_channels.
  """
  if variant in resnet.VARIANTS:
    return resnet.ResNet(resnet.VARIANTS[variant], dtype=dtype, rngs=rngs, **kwargs)
  if variant in vit.VARIANTS:
    return vit.ViT(vit.VARIANTS[variant], dtype=dtype, rngs=rngs, **kwargs)
  raise ValueError(f"unknown image tower {variant!r}; valid: {', '.join(IMAGE_TOWERS)}")


def make_head(in_dim: int, widths: Sequence[int], *, rngs: nnx.Rngs, use_bn: bool = True,
              bn_axis_name: str | None = None, bn_momentum: float = 0.9, dtype=None) -> ProjectionHead:
  return ProjectionHead(in_dim, widths, use_bn=use_bn, bn_axis_name=bn_axis_name, bn_momentum=bn_momentum,
                        dtype=dtype, rngs=rngs)


def make_text_tower(variant: str, *, out_dim: int, rngs: nnx.Rngs, dtype=None, **kwargs) -> text.TextTower:
  """kwargs: vocab_size (30522), max_len (64), pool ('last' | 'mean'), causal (False)."""
  if variant not in text.VARIANTS:
    raise ValueError(f"unknown text tower {variant!r}; valid: {', '.join(TEXT_TOWERS)}")
  return text.TextTower(text.VARIANTS[variant], out_dim=out_dim, dtype=dtype, rngs=rngs, **kwargs)


class ImageEncoder(nnx.Module):
  """Backbone + projection head: images -> (features [B, tower.width], projections [B, head widths[-1]]).

  Features feed linear probes, projections feed the loss.
  """

  def __init__(self, tower: nnx.Module, head: ProjectionHead):
    self.tower = tower
    self.head = head

  def __call__(self, images):
    h = self.tower(images)
    return h, self.head(h)


def make_image_encoder(variant: str, head_widths: Sequence[int], *, rngs: nnx.Rngs, head_bn: bool = True,
                       bn_axis_name: str | None = None, bn_momentum: float = 0.9, dtype=None,
                       **tower_kwargs) -> ImageEncoder:
  """`bn_axis_name` (for calls inside shard_map) and `bn_momentum` go to every BatchNorm: the head's and a
  ResNet's (a ViT has none)."""
  if variant in resnet.VARIANTS:
    tower_kwargs["bn_momentum"] = bn_momentum
    if bn_axis_name is not None:
      tower_kwargs["bn_axis_name"] = bn_axis_name
  tower = make_image_tower(variant, rngs=rngs, dtype=dtype, **tower_kwargs)
  head = make_head(tower.width, head_widths, rngs=rngs, use_bn=head_bn, bn_axis_name=bn_axis_name,
                   bn_momentum=bn_momentum, dtype=dtype)
  return ImageEncoder(tower, head)


__all__ = ["IMAGE_TOWERS", "TEXT_TOWERS", "RULES", "ImageEncoder", "ProjectionHead", "make_head",
           "make_image_encoder", "make_image_tower", "make_text_tower", "state_shardings"]

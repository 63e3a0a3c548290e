"""Vision Transformer (Dosovitskiy et al. 2021), classic pre-LN, as in big_vision's vit.py.

Output: pooled features [B, width] after the final LayerNorm ('gap': mean over patch tokens; 'cls': the class token).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from xsample_jax.models.partitioning import axes
from xsample_jax.models.transformer import Encoder, EncoderConfig


@dataclasses.dataclass(frozen=True)
class ViTConfig(EncoderConfig):
  patch: int


VARIANTS = {
    "vit_tiny": ViTConfig(patch=4, width=64, depth=2, num_heads=2, mlp_dim=128),
    "vit_s16": ViTConfig(patch=16, width=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_b16": ViTConfig(patch=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
}
POOLS = ("gap", "cls")
POSEMBS = ("learn", "sincos2d")


def sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding [h * w, width] (MoCo v3 / big_vision `posemb_sincos_2d`)."""
  if width % 4:
    raise ValueError(f"width {width} must be divisible by 4 for the sincos2d position embedding")
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 if width > 4 else 1))
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class ViT(nnx.Module):

  def __init__(self, cfg: ViTConfig, *, image_size: int = 224, pool: str = "gap", posemb: str = "learn",
               in_channels: int = 3, dtype=None, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f"unknown pool {pool!r}; valid: {POOLS}")
    if posemb not in POSEMBS:
      raise ValueError(f"unknown posemb {posemb!r}; valid: {POSEMBS}")
    if image_size % cfg.patch:
      raise ValueError(f"image_size {image_size} is not a multiple of the patch size {cfg.patch}")
    self.grid = image_size // cfg.patch
    self.width = cfg.width
    self.pool = pool
    self.patch_embed = nnx.Conv(in_channels, cfg.width, (cfg.patch, cfg.patch), strides=cfg.patch, padding="VALID",
                                dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.lecun_normal(),
                                kernel_metadata=axes(None, None, "conv_in", "embed"), bias_metadata=axes("embed"))
    n = self.grid * self.grid
    # sincos2d is a constant made at trace time: neither trained nor checkpointed.
    self.posemb = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (n, cfg.width)), **axes(None, "embed"))
                   if posemb == "learn" else None)
    self.cls = nnx.Param(jnp.zeros((1, 1, cfg.width)), **axes(None, None, "embed")) if pool == "cls" else None
    self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, images):
    x = self.patch_embed(images)
    b, h, w, d = x.shape
    if (h, w) != (self.grid, self.grid):
      raise ValueError(f"images give a {h}x{w} patch grid, the model was built for {self.grid}x{self.grid}")
    posemb = self.posemb[...] if self.posemb is not None else sincos_2d(h, w, d)
    x = x.reshape(b, h * w, d) + jnp.asarray(posemb, x.dtype)
    if self.pool == "cls":
      x = jnp.concatenate([jnp.broadcast_to(self.cls[...].astype(x.dtype), (b, 1, d)), x], axis=1)
    x = self.encoder(x)
    return x[:, 0] if self.pool == "cls" else x.mean(axis=1)

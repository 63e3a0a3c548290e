"""The pre-LN transformer encoder shared by the ViT and the text tower."""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from xsample_jax.models.partitioning import axes

_dense_init = nnx.initializers.xavier_uniform()


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int


class SelfAttention(nnx.Module):
  """Multi-head self-attention; `mask` [B, S] marks the keys that may be attended to."""

  def __init__(self, width: int, num_heads: int, *, dtype=None, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    proj = lambda k_axes, b_axes: nnx.Linear(width, width, kernel_init=_dense_init, dtype=dtype, rngs=rngs,
                                             kernel_metadata=axes(*k_axes), bias_metadata=axes(*b_axes))
    self.query = proj(("embed", "heads"), ("heads",))
    self.key = proj(("embed", "heads"), ("heads",))
    self.value = proj(("embed", "heads"), ("heads",))
    self.out = proj(("heads", "embed"), ("embed",))

  def __call__(self, x, mask=None, *, causal: bool = False):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    if mask is not None:
      mask = mask.astype(bool)[:, None, None, :]  # [B, heads, queries, keys]
    # XLA on CPU, a fused kernel (cuDNN) on GPU where the shapes allow.
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    return self.out(y.reshape(b, t, d))


class MlpBlock(nnx.Module):
  def __init__(self, width: int, mlp_dim: int, *, dtype=None, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(width, mlp_dim, kernel_init=_dense_init, dtype=dtype, rngs=rngs,
                          kernel_metadata=axes("embed", "mlp"), bias_metadata=axes("mlp"))
    self.fc2 = nnx.Linear(mlp_dim, width, kernel_init=_dense_init, dtype=dtype, rngs=rngs,
                          kernel_metadata=axes("mlp", "embed"), bias_metadata=axes("embed"))

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def layer_norm(width: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=1e-6, dtype=dtype, rngs=rngs,
                       scale_metadata=axes("norm"), bias_metadata=axes("norm"))


class EncoderBlock(nnx.Module):
  """x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype=None, rngs: nnx.Rngs):
    self.ln1 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.attn = SelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
    self.ln2 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = MlpBlock(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None, *, causal: bool = False):
    x = x + self.attn(self.ln1(x), mask, causal=causal)
    return x + self.mlp(self.ln2(x))


class Encoder(nnx.Module):
  """`depth` pre-LN blocks and the final LayerNorm."""

  def __init__(self, cfg: EncoderConfig, *, dtype=None, rngs: nnx.Rngs):
    self.blocks = nnx.List([EncoderBlock(cfg.width, cfg.num_heads, cfg.mlp_dim, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.depth)])
    self.norm = layer_norm(cfg.width, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask=None, *, causal: bool = False):
    for block in self.blocks:
      x = block(x, mask, causal=causal)
    return self.norm(x)

"""Projection head: an MLP from backbone features to the loss's embedding space. The output is not normalised
(every loss normalises its inputs)."""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from xsample_jax.models.partitioning import axes


class ProjectionHead(nnx.Module):
  """in_dim -> widths[0] -> ... -> widths[-1]; hidden layers are Linear [-> BN] -> ReLU, the last is Linear only.

  With BN the hidden Linears drop their bias (BN's shift replaces it), as in SimCLR.
  """

  def __init__(self, in_dim: int, widths: Sequence[int], *, use_bn: bool = True, bn_axis_name: str | None = None,
               bn_momentum: float = 0.9, dtype=None, rngs: nnx.Rngs):
    widths = tuple(int(w) for w in widths)
    if not widths or min(widths) < 1:
      raise ValueError(f"head widths must be a non-empty sequence of positive ints, got {widths}")
    dims = (in_dim,) + widths
    layers, norms = [], []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      hidden = i < len(widths) - 1
      layers.append(nnx.Linear(din, dout, use_bias=not (hidden and use_bn), dtype=dtype, rngs=rngs,
                               kernel_metadata=axes("head_in", "head_out"), bias_metadata=axes("head_out")))
      if hidden and use_bn:
        norms.append(nnx.BatchNorm(dout, momentum=bn_momentum, epsilon=1e-5, axis_name=bn_axis_name, dtype=dtype,
                                   scale_metadata=axes("norm"), bias_metadata=axes("norm"), rngs=rngs))
    self.layers = nnx.List(layers)
    self.norms = nnx.List(norms)
    self.out_dim = widths[-1]

  def __call__(self, x):
    for i, layer in enumerate(self.layers[:-1]):
      x = layer(x)
      if self.norms:
        x = self.norms[i](x)
      x = jax.nn.relu(x)
    return self.layers[-1](x)

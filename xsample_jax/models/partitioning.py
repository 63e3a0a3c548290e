"""Logical axis names on parameters, and the rules that place them on the ('data', 'model') mesh.

Every parameter carries flax's standard `out_sharding` metadata holding *logical* names (one per dimension, None
for "never shard"). Eager sharding is off for these annotations, so models build anywhere (CPU, no mesh); the trainer
asks `state_shardings` for concrete NamedShardings and creates the parameters with `jit(init, out_shardings=...)`.

Logical names used by the models:
  conv_in, conv_out   convolution kernel input / output channels (spatial dims are None)
  embed               transformer residual width
  mlp                 transformer MLP hidden width
  heads               flattened heads x head_dim of q, k, v (and the output projection's input)
  head_in, head_out   projection-head kernels
  vocab               token-embedding rows
  norm                BatchNorm / LayerNorm scale and bias (never sharded)

A rule set maps logical names to mesh axes. For each mesh axis, among the dimensions whose names map to it and
whose size divides evenly, the *largest* one is sharded; so "fsdp" splits the largest dimension of each big
parameter over 'data', whatever layer it belongs to. Parameters under `min_size` elements stay replicated:
all-gathering them would cost more than storing them.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xsample_jax.sharding import DATA

LogicalRules = tuple[tuple[str, str], ...]

_SHARDABLE = ("embed", "mlp", "heads", "vocab", "conv_in", "conv_out", "head_in", "head_out")

RULES: dict[str, LogicalRules] = {
    "replicate": (),
    "fsdp": tuple((name, DATA) for name in _SHARDABLE),
}

# 2**16 floats = 256 KiB: below this a parameter is cheaper to keep whole on every device.
DEFAULT_MIN_SIZE = 2**16


def axes(*names: str | None) -> dict[str, Any]:
  """Metadata for a parameter with these logical axis names (pass as `kernel_metadata=` etc.)."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


def logical_to_spec(names, shape, rules: LogicalRules, mesh: Mesh, *, min_size: int = DEFAULT_MIN_SIZE) -> P:
  """PartitionSpec for one parameter: per mesh axis, the largest evenly divisible dimension named in `rules`."""
  if names is None or math.prod(shape) < min_size:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match the parameter's shape {shape}")
  spec: list[str | None] = [None] * len(shape)
  for mesh_axis in dict.fromkeys(axis for _, axis in rules):  # mesh axes in rule order, each once
    candidates = {name for name, axis in rules if axis == mesh_axis}
    n = mesh.shape[mesh_axis]
    eligible = [i for i, name in enumerate(names)
                if name in candidates and spec[i] is None and shape[i] % n == 0]
    if eligible and n > 1:
      best = max(eligible, key=lambda i: shape[i])  # max() keeps the first of equal sizes
      spec[best] = mesh_axis
  return P(*spec) if any(spec) else P()


def state_shardings(state, mesh: Mesh, mode: str = "replicate", *, min_size: int = DEFAULT_MIN_SIZE):
  """NamedShardings for an (abstract or concrete) nnx state, in the same tree structure.

  Use as `jax.jit(init_fn, out_shardings=state_shardings(nnx.state(nnx.eval_shape(build)), mesh, "fsdp"))`.
  Variables without annotations (BatchNorm statistics, RNG state) are replicated.
  """
  if mode not in RULES:
    raise ValueError(f"unknown partitioning mode {mode!r}; valid modes: {sorted(RULES)}")
  rules = RULES[mode]

  def one(v):
    if not isinstance(v, nnx.Variable):
      return NamedSharding(mesh, P())
    names = v.get_metadata().get("out_sharding")
    return v.replace(NamedSharding(mesh, logical_to_spec(names, v.shape, rules, mesh, min_size=min_size)))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

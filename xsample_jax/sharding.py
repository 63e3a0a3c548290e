"""The device mesh and the one device order used everywhere.

The batch is split over the 'data' axis; 'model' is for parameters that are too large to replicate
(FSDP / tensor-parallel rules) and defaults to size 1. Axis types are Auto: jit propagates shardings
and shard_map regions (the losses) say explicitly what is local and what is global.
"""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
MODEL = "model"


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
  """A ('data', 'model') mesh over `devices` (default: all), data = n_devices // model."""
  devices = list(jax.devices() if devices is None else devices)
  if data is None:
    if len(devices) % model:
      raise ValueError(f"model={model} does not divide the {len(devices)} devices")
    data = len(devices) // model
  if data * model != len(devices):
    raise ValueError(f"mesh data={data} x model={model} != {len(devices)} devices")
  # jax.make_mesh picks a physical order that keeps neighbouring data shards on neighbouring chips.
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', everything else replicated."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full copy on every device (e.g. parameters under the 'replicate' rules)."""
  return NamedSharding(mesh, P())

"""The mesh every module shares."""
import jax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from xsample_jax.sharding import DATA, MODEL, batch_sharding, make_mesh, replicated


def test_default_mesh_puts_every_device_on_data(mesh):
  assert mesh.axis_names == (DATA, MODEL) and dict(mesh.shape) == {DATA: 8, MODEL: 1}
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert batch_sharding(mesh).spec == P(DATA)


def test_model_axis_and_bad_shapes():
  assert dict(make_mesh(model=2).shape) == {DATA: 4, MODEL: 2}
  assert dict(make_mesh(devices=jax.devices()[:2]).shape) == {DATA: 2, MODEL: 1}
  with pytest.raises(ValueError, match="model=3 does not divide the 8 devices"):
    make_mesh(model=3)
  with pytest.raises(ValueError, match="data=3 x model=2 != 8 devices"):
    make_mesh(data=3, model=2)


def test_replicated_sharding(mesh):
  assert replicated(mesh).spec == P() and replicated(mesh).is_fully_replicated

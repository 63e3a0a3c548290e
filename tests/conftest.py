"""Every test runs on CPU with 8 fake devices, so the sharded paths are always exercised."""
import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  on_accelerator = jax.default_backend() != "cpu"
  skip = pytest.mark.skip(reason="needs an accelerator (GPU/TPU)")
  for item in items:
    if "accelerator" in item.keywords and not on_accelerator:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def mesh():
  from xsample_jax.sharding import make_mesh
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices (XLA_FLAGS set in conftest.py)"
  return make_mesh()

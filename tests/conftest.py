"""Every test runs on CPU with 8 fake devices, so the sharded paths are always exercised."""
import atexit
import os
import shutil
import tempfile

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's persistent compilation cache, one per test session: the training runs the tests start as subprocesses (which
# inherit this environment) compile the same few programs again and again; with the cache only the first compiles.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xsample_test_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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

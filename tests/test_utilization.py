"""What the logs' and benchmarks' utilisation figures stand on: XLA's FLOP count and the chips' peak table."""
import types

import jax
import jax.numpy as jnp

from xsample_jax import utilization


def test_compiled_flops_counts_a_matmul():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
  flops = utilization.compiled_flops(jax.jit(jnp.dot).lower(a, b))
  assert flops == 2 * 64 * 32 * 48


def test_peak_tflops_by_device_kind():
  chip = lambda kind, platform: types.SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
  assert utilization.peak_tflops(chip("NVIDIA H200", "gpu")) == 989.0
  assert utilization.peak_tflops(chip("NVIDIA H200", "gpu"), "float32") == 989.0 / 2  # TF32
  assert utilization.peak_tflops(chip("TPU v5 lite", "tpu"), "float32") == 197.0
  assert utilization.peak_tflops(chip("TPU v4", "tpu")) == 275.0
  assert utilization.peak_tflops(jax.devices()[0]) is None  # a CPU has no entry
  assert utilization.peak_tflops(jax.devices()[0], override=3.5) == 3.5

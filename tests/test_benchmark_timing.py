"""The helpers the benchmarks' utilisation figures stand on: XLA's FLOP count and the chips' peak table."""
import types

import jax
import jax.numpy as jnp

from benchmarks import timing


def test_compiled_flops_counts_a_matmul():
  a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
  flops = timing.compiled_flops(jax.jit(jnp.dot).lower(a, b))
  assert flops == 2 * 64 * 32 * 48


def test_peak_tflops_by_device_kind():
  chip = lambda kind, platform: types.SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
  assert timing.peak_tflops(chip("NVIDIA H200", "gpu")) == 989.0
  assert timing.peak_tflops(chip("NVIDIA H200", "gpu"), "float32") == 989.0 / 2  # TF32
  assert timing.peak_tflops(chip("TPU v5 lite", "tpu"), "float32") == 197.0
  assert timing.peak_tflops(chip("TPU v4", "tpu")) == 275.0
  assert timing.peak_tflops(jax.devices()[0]) is None  # a CPU has no entry
  assert timing.peak_tflops(jax.devices()[0], override=3.5) == 3.5


def test_switch_warmup_runs_each_fn_before_its_timed_call():
  calls = []
  fns = [lambda: calls.append("a"), lambda: calls.append("b")]
  medians = timing.interleaved_medians(fns, repeats=2, switch_warmup=1)
  assert len(medians) == 2
  assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2

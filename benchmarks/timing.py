"""What the benchmarks share: timing variants against each other in one run, interleaved, as medians; the chips'
peak rates and XLA's FLOP count, for utilisation figures on accelerators."""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns, repeats, switch_warmup=0):
  """Runs each fn once to warm up, then `repeats` rounds of all of them interleaved; median seconds per fn.

  switch_warmup: untimed calls of each fn at its turn, before its timed one, so it is timed in its own steady state
  rather than in what the previous fn left behind (caches, the allocator's pages, spinning thread pools). On the
  2-core host a JAX ResNet-18 train step timed right after a PyTorch one took 2.5 s, against 2.0-2.1 s after itself.
  """
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for t, fn in zip(times, fns):
      for _ in range(switch_warmup):
        fn()
      t0 = time.perf_counter()
      fn()
      t.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


# Dense peak matmul throughput per chip in TFLOP/s for bfloat16 (float32 inputs count at the same rate on TPUs,
# whose MXUs take bf16 passes; on GPUs float32 runs as TF32 at half the bf16 rate), from the vendors' data sheets.
# Matched as substrings of `jax.Device.device_kind`, first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0),
    ("TPU v4", 275.0), ("TPU v3", 123.0),
)


def peak_tflops(device, dtype: str = "bfloat16", override: float | None = None) -> float | None:
  """The chip's dense matmul peak for `dtype`, or `override`; None where unknown (a CPU: there the benchmarks give
  the rate of the run's own best matmul instead)."""
  if override:
    return override
  kind = getattr(device, "device_kind", "")
  for name, bf16 in PEAK_BF16_TFLOPS:
    if name in kind:
      return bf16 / 2 if dtype == "float32" and device.platform == "gpu" else bf16
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled jax function, as XLA counts them (`cost_analysis`); None if not reported."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None

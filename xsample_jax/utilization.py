"""How much of the chip a step uses: XLA's FLOP count of a compiled program, and the chips' peak matmul rates.

The trainer logs each interval's achieved TFLOP/s per device and, on a chip of known peak, its model FLOP
utilisation (`mfu`); the benchmarks report the same figures.
"""
from __future__ import annotations

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
  """FLOPs of one call of a lowered or compiled jax function, as XLA counts them (`cost_analysis`); None if not
  reported. A lowered program is counted whole (all devices together, before partitioning); a compiled one per
  device (what one device runs after partitioning)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None

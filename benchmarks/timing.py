"""What the benchmarks share: timing variants against each other in one run, interleaved, as medians. (The chips'
peak rates and XLA's FLOP count, for utilisation figures, are in `xsample_jax.utilization`: the trainer logs them.)"""
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


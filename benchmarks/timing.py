"""What the benchmarks share: timing variants against each other in one run, interleaved, as medians."""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns, repeats):
  """Runs each fn once to warm up, then `repeats` rounds of all of them interleaved; median seconds per fn."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for t, fn in zip(times, fns):
      t0 = time.perf_counter()
      fn()
      t.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]

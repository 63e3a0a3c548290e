"""What does work on the cores the train step leaves idle cost the step? The smoke step on one in-memory batch,
alone and beside a busy thread under SCHED_IDLE (the prefetch thread's default priority), in alternating phases.

    python -m benchmarks.spare_cpu_bench                          # python, hashlib and numpy busy threads
    python -m benchmarks.spare_cpu_bench --kinds python --rounds 24

A SCHED_IDLE thread runs only on a core no other thread wants, so on an ideal host it would cost the step nothing
and the fed step of benchmarks/pipeline_bench.py could match the in-memory one whatever the pipeline's CPU. This
measures how far a host is from that, with work of known kinds instead of the pipeline:
  python:  a pure-Python loop (holds the GIL, as most of the pipeline's Python does);
  hashlib: SHA-256 of a 64 KB buffer (compute-bound C code, the GIL released);
  numpy:   in-place scaling of a 4 MB float32 array (memory-bound, the GIL released).
Each round runs --steps steps alone, then --steps with the busy thread (started at the phase's start, stopped at its
end). One JSON line per kind: medians of the per-step times, their ratio (busy / alone) with a 90% bootstrap
interval over rounds, and the cores' worth of work the busy thread got (its work rate beside the step over its rate
alone). Like the trainer, the benchmark restarts itself with glibc's malloc on transparent huge pages.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import threading
import time

import jax
import numpy as np

from benchmarks.pipeline_bench import _bootstrap_ratio, _chunks, smoke_case, step_and_state
from xsample_jax import cli, train


def _python():
  return lambda: sum(range(2000))


def _hashlib():
  buf = bytes(65536)
  return lambda: hashlib.sha256(buf).digest()


def _numpy():
  a = np.ones(1 << 20, np.float32)
  return lambda: np.multiply(a, 1.0, out=a)


# Each kind: a factory of a function doing one unit of that work a call.
KINDS = {"python": _python, "hashlib": _hashlib, "numpy": _numpy}


class Busy:
  """A SCHED_IDLE thread doing `kind` work units until stopped; `units` counts them."""

  def __init__(self, kind: str):
    self._unit, self.units = KINDS[kind](), 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    while not self._stop.is_set():
      self._unit()
      self.units += 1

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return self.units


def rate_alone(kind: str, seconds: float = 3.0) -> float:
  busy = Busy(kind)
  time.sleep(seconds)
  return busy.stop() / seconds


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
  ap.add_argument("--rounds", type=int, default=16)
  ap.add_argument("--steps", type=int, default=6, help="steps per phase")
  ap.add_argument("--note", default="")
  args = ap.parse_args()

  config, source = smoke_case(None, None)
  mesh = train.make_mesh(config)
  step, state = step_and_state(config, mesh, source)
  it = train.train_iterator(config, source, mesh)
  batch = next(it)
  it.close()

  def phase(n):
    nonlocal state
    t0 = time.perf_counter()
    for _ in range(n):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - t0) / n

  phase(3)  # compiles
  for kind in args.kinds:
    alone_rate = rate_alone(kind)
    plain, beside, cores = [], [], []
    for _ in range(args.rounds):
      plain += [phase(args.steps)] * args.steps
      busy, t0 = Busy(kind), time.perf_counter()
      beside += [phase(args.steps)] * args.steps
      cores.append(busy.stop() / (time.perf_counter() - t0) / alone_rate)
    m_plain, m_beside = statistics.median(plain), statistics.median(beside)
    row = {"bench": "spare_cpu", "kind": kind, "config": "smoke", "cpus": os.cpu_count(), "rounds": args.rounds,
           "steps_per_phase": args.steps, "step_time_alone": round(m_plain, 4),
           "step_time_beside_busy": round(m_beside, 4), "ratio": round(m_beside / m_plain, 3),
           "ratio_ci90": _bootstrap_ratio(_chunks(beside, args.steps), _chunks(plain, args.steps)),
           "busy_thread_cores": round(statistics.median(cores), 3),
           "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), **({"note": args.note} if args.note else {})}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  cli.use_huge_pages()  # as the trainer's entry point runs
  main()

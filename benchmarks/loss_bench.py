"""X-Sample loss: wall time and peak memory of a jitted forward+backward, dense vs blockwise.

    python -m benchmarks.loss_bench                       # N = 4096 .. 65536, both impls
    python -m benchmarks.loss_bench --n 16384 32768 --impl blockwise --dtype bfloat16
    python -m benchmarks.loss_bench --n 4096 8192 16384 --impl plain   # plain JAX vs the dense path, one process
    python -m benchmarks.loss_bench --n 262144 --d 512 --impl blockwise --dtype bfloat16 --repeats 3
                                                                        # on a GPU/TPU: fraction_of_peak

One JSON line per (impl, N). Each measurement runs in a fresh subprocess so that its peak RSS
(ru_maxrss, the whole process: runtime + inputs + loss) is its own. The matmul floor is the time that
the dense FLOPs (6 N^2 D + 2 N^2 E) take at the matmul rate measured in this run by plain jnp.dot's of
comparable shapes ([rows, K] @ [K, cols] for K = D and K = E in the benchmark's dtype, the best over FLOOR_SHAPES
and 7 runs each).
Wall times are medians of --repeats runs after a warm-up (none with --repeats 1). The worker also measures the
floor itself, before each timed call (best rate over those measurements): ratio_to_floor_alongside is the same
ratio with the floor taken while the machine was in the state the loss ran in (other jobs on a shared machine). "plain" is the same loss written plainly
(plain_loss); its worker also times the library's dense path, interleaved in that process (dense_over_plain).
On a chip with a known peak (`xsample_jax.utilization`, or --peak-tflops) each line also has fraction_of_peak: the dense
FLOPs over the wall time, against that peak.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.timing import interleaved_medians
from xsample_jax.utilization import peak_tflops

GIB = 1 << 30


def _peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def _times(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


# (rows, cols) of the plain matmuls [rows, K] @ [K, cols] whose best rate sets the floor: a wide panel, a squarer
# block, a square one, and one of the self-similarity sweep's (cache-sized) blocks.
FLOOR_SHAPES = ((512, 32768), (4096, 8192), (2048, 2048), (1024, 1024))


def matmul_rates(d, e, dtype, repeats=7):
  """For K = d and K = e: the best FLOP/s of plain jnp.dot's [rows, K] @ [K, cols] over FLOOR_SHAPES.

  The fastest shape and the fastest of the repeats, not the median: a floor is what the machine can do at best.
  """
  import jax
  import jax.numpy as jnp
  rates = {}
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  for k in (d, e):
    best = 0.0
    for rows, cols in FLOOR_SHAPES:
      a = jax.random.normal(jax.random.key(0), (rows, k), dtype)
      b = jax.random.normal(jax.random.key(1), (k, cols), dtype)
      f(a, b).block_until_ready()
      best = max(best, 2 * rows * cols * k / min(_times(lambda: f(a, b).block_until_ready(), repeats)))
    rates[k] = best
  return rates


def plain_loss(z, c, temperature=0.1, target_temperature=0.1):
  """The same maths as xsample_loss written plainly: logits masked on the diagonal, log_softmax, target softmax,
  soft cross-entropy, autodiff. The reference the library's dense path must not be slower than."""
  import jax
  import jax.numpy as jnp
  unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  z, c = unit(z), unit(jax.lax.stop_gradient(c))
  eye = jnp.eye(z.shape[0], dtype=bool)
  logp = jax.nn.log_softmax(jnp.where(eye, -jnp.inf, z @ z.T / temperature), axis=1)
  g = jax.nn.softmax(jnp.where(eye, -jnp.inf, c @ c.T / target_temperature), axis=1)
  return -jnp.sum(g * jnp.where(eye, 0.0, logp)) / z.shape[0]


def worker(args):
  import jax
  import jax.numpy as jnp
  from xsample_jax import losses
  dtype = jnp.dtype(args.dtype)
  n = args.n[0]
  z = jax.random.normal(jax.random.key(0), (n, args.d), dtype)
  c = jax.random.normal(jax.random.key(1), (n, args.e), dtype)
  jax.block_until_ready((z, c))
  rss_inputs = _peak_rss_gib()
  impl = args.impl[0]
  loss = plain_loss if impl == "plain" else lambda z, c: losses.xsample_loss(z, c, impl=impl)
  step = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  compiled = step.lower(z, c).compile()
  compile_s = time.perf_counter() - t0
  if args.repeats > 1:  # with one repeat (the largest N, minutes a call) the timed call is the first after compile
    jax.block_until_ready(compiled(z, c))
  out = {"compile_s": compile_s}
  if impl == "plain":  # and the library's dense path in the same process, interleaved: their ratio is fair
    dense = jax.jit(jax.value_and_grad(lambda z, c: losses.xsample_loss(z, c, impl="dense"))).lower(z, c).compile()
    walls = interleaved_medians([lambda f=f: jax.block_until_ready(f(z, c)) for f in (compiled, dense)],
                                args.repeats)
    out.update(wall_s=walls[0], dense_wall_s=walls[1], dense_over_plain=walls[1] / walls[0])
  else:  # each timed call right after a floor measurement, so both see the machine in the same state
    walls, rates = [], {}
    for _ in range(args.repeats):
      rates = {k: max(v, rates.get(k, 0.0)) for k, v in matmul_rates(args.d, args.e, dtype, repeats=3).items()}
      walls += _times(lambda: jax.block_until_ready(compiled(z, c)), 1)
    floor_s = 6 * n * n * args.d / rates[args.d] + 2 * n * n * args.e / rates[args.e]
    out.update(wall_s=statistics.median(walls), matmul_floor_alongside_s=floor_s,
               matmul_tflops_alongside={str(k): v / 1e12 for k, v in rates.items()},
               ratio_to_floor_alongside=statistics.median(walls) / floor_s)
  print(json.dumps({**out, "peak_rss_gib": _peak_rss_gib(), "rss_after_inputs_gib": rss_inputs}))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
  p.add_argument("--d", type=int, default=128)
  p.add_argument("--e", type=int, default=384)
  p.add_argument("--impl", nargs="+", default=["dense", "blockwise"], choices=["dense", "blockwise", "auto", "plain"])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the chip's dense matmul peak for --dtype (default: benchmarks.timing's table by device kind; "
                      "none on a CPU)")
  p.add_argument("--dense-max-gib", type=float, default=4.0,
                 help="skip dense when one N x N f32 buffer is larger than this")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    return worker(args)

  import jax
  import jax.numpy as jnp
  rates = matmul_rates(args.d, args.e, jnp.dtype(args.dtype))
  backend = jax.default_backend()
  peak = peak_tflops(jax.devices()[0], args.dtype, args.peak_tflops)
  for n in args.n:
    flops = 6 * n * n * args.d + 2 * n * n * args.e
    floor_s = 6 * n * n * args.d / rates[args.d] + 2 * n * n * args.e / rates[args.e]
    for impl in args.impl:
      row = {"impl": impl, "n": n, "d": args.d, "e": args.e, "dtype": args.dtype, "backend": backend,
             "dense_flops": flops, "matmul_floor_s": floor_s,
             "matmul_tflops": {str(k): v / 1e12 for k, v in rates.items()}}
      if impl in ("dense", "plain") and n * n * 4 > args.dense_max_gib * GIB:
        row["skipped"] = f"one N x N f32 buffer is {n * n * 4 / GIB:.0f} GiB"
        print(json.dumps(row), flush=True)
        continue
      cmd = [sys.executable, "-m", "benchmarks.loss_bench", "--worker", "--n", str(n), "--d", str(args.d),
             "--e", str(args.e), "--impl", impl, "--dtype", args.dtype, "--repeats", str(args.repeats)]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
      else:
        row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        row["ratio_to_matmul_floor"] = row["wall_s"] / floor_s
        if peak:  # the dense FLOPs over the wall time, against the chip's matmul peak
          row.update(peak_tflops=peak, fraction_of_peak=flops / row["wall_s"] / (peak * 1e12))
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()

"""XLA:CPU's matmul rates at the ViT's projection shapes: the forward product and the kernel gradient, per kernel library.

    python -m benchmarks.matmul_bench                    # ViT-S/16 at 64 px, batch 128 x 2 views: 4,096 token rows
    python -m benchmarks.matmul_bench --rows 8192 --width 768 --repeats 20

A Dense layer's step runs three products: the forward x @ W, the input gradient dy @ W^T, and the kernel gradient
x^T @ dy, which contracts over the token rows (dot_general with lhs_contracting_dims={0}). For each projection of a
transformer block (qkv D -> 3D, out D -> D, MLP D -> 4D and 4D -> D) this times, under each of XLA:CPU's kernel
settings (`train.compiler_options`: 'ynnpack', XLA's default; 'eigen', Eigen for dots), the forward product, the
kernel gradient as XLA gets it, and the kernel gradient from an explicitly transposed copy of x (a row-major
[D, rows] operand). Everything interleaved in one process; medians of --repeats after a warm-up.

One JSON line per (projection, kernels): GFLOP/s of each form. On the 2-core AMD EPYC host (AVX2, no AVX-512), two
runs (benchmarks/results/matmul_bench_cpu_2core.jsonl): the kernel gradients ran at 113-141 GFLOP/s in either library,
the transposed copy within 5% of them either way (so XLA's contraction over the rows costs no hidden transpose
there); the forward products ran 5-20% faster in Eigen (131-159) than in YNNPACK (98-138). On an AVX-512 host, where
`cpu_matmuls='auto'` keeps YNNPACK, this says whether the kernel gradients lag its forward products.
"""
from __future__ import annotations

import argparse
import json

from benchmarks.timing import interleaved_medians


KERNELS = ("ynnpack", "eigen")  # config.cpu_matmuls settings: XLA's default, Eigen for dots


def projections(width: int, mlp: int) -> list[tuple[str, int, int]]:
  return [("qkv", width, 3 * width), ("out", width, width), ("mlp_in", width, mlp), ("mlp_out", mlp, width)]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", type=int, default=4096, help="token rows: images x views x tokens (ViT-S/16, 64 px: "
                                                         "128 x 2 x 16)")
  ap.add_argument("--width", type=int, default=384)
  ap.add_argument("--mlp", type=int, default=1536)
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp

  from xsample_jax import train

  forms = {
      "forward": lambda x, dy, w: x @ w,
      "kernel_grad": lambda x, dy, w: jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ()))),
      "kernel_grad_transposed_copy": lambda x, dy, w: jnp.transpose(x).copy() @ dy,
  }
  for name, d_in, d_out in projections(args.width, args.mlp):
    x = jax.random.normal(jax.random.key(0), (args.rows, d_in))
    dy = jax.random.normal(jax.random.key(1), (args.rows, d_out))
    w = jax.random.normal(jax.random.key(2), (d_in, d_out))
    fns = [jax.jit(f, compiler_options=train.compiler_options(k)) for k in KERNELS for f in forms.values()]
    times = interleaved_medians([lambda f=f: jax.block_until_ready(f(x, dy, w)) for f in fns], args.repeats)
    flops = 2 * args.rows * d_in * d_out
    for i, k in enumerate(KERNELS):
      row = {"bench": "matmul", "projection": name, "rows": args.rows, "d_in": d_in, "d_out": d_out, "kernels": k,
             "device": jax.devices()[0].device_kind}
      row.update({f"{form}_gflops": round(flops / t / 1e9, 1)
                  for form, t in zip(forms, times[i * len(forms):(i + 1) * len(forms)])})
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()

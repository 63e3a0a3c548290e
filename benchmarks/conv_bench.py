"""ResNet convolutions on small feature maps: plain XLA conv vs the patches-matmul of `models.resnet`.

    python -m benchmarks.conv_bench                      # per-conv rates at ResNet-18 / 64 px shapes, then the step
    python -m benchmarks.conv_bench --no-step --repeats 5
    python -m benchmarks.conv_bench --batch-size 128 --image-size 64 --steps 3

XLA:CPU's algebraic simplifier swaps the operands of a convolution whose input is smaller than its window (the
kernel becomes the lhs, with rhs_reversal); the swapped form compiles to a naive loop. `models.resnet` runs the convs
that `resnet.use_patches` picks (window larger than the input or output, or strided 1x1) as a patches-matmul.

One JSON line per conv shape: GFLOP/s of a jitted forward+backward (gradients w.r.t. input and kernel, 3x the
forward FLOPs) for both forms, and their ratio. Then one line for the X-CLR train step (model.variant resnet18,
stem imagenet, sgd, one device) with the CPU rewrites off (resnet.PATCHES_CONV = False: plain XLA convs and
nnx.max_pool) and on (patches-matmul convs, kernel gradients as matmuls, the slice max-pool). Variants are measured
interleaved in this one process; times are medians of --repeats (--steps for the train step) after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.timing import interleaved_medians


def resnet18_convs(batch, image_size):
  """(name, input shape, cout, k, stride) of ResNet-18's stage convs (imagenet stem: the stages see size / 4 ..)."""
  s = image_size // 4
  out = [("stage1_3x3", (batch, s, s, 64), 64, 3, 1)]
  cin = 64
  for i, c in enumerate((128, 256, 512), start=2):
    out += [(f"stage{i}_3x3_s2", (batch, s, s, cin), c, 3, 2), (f"stage{i}_1x1_s2", (batch, s, s, cin), c, 1, 2),
            (f"stage{i}_3x3", (batch, s // 2, s // 2, c), c, 3, 1)]
    s, cin = s // 2, c
  return out


def bench_convs(args):
  import jax
  import jax.numpy as jnp

  from xsample_jax.models import resnet

  dtype = jnp.dtype(args.dtype)
  for name, shape, cout, k, stride in resnet18_convs(2 * args.batch_size, args.image_size):
    x = jax.random.normal(jax.random.key(0), shape, dtype)
    w = (jax.random.normal(jax.random.key(1), (k, k, shape[-1], cout)) * 0.05).astype(dtype)
    pads = ((k // 2, k // 2),) * 2
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    patches = lambda x, w: resnet.patches_conv(x, w, (stride, stride), pads)
    steps = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w).astype(jnp.float32) ** 2), argnums=(0, 1)))
             for f in (plain, patches)]
    t_plain, t_patches = interleaved_medians([lambda f=f: jax.block_until_ready(f(x, w)) for f in steps], args.repeats)
    ho = (shape[1] + 2 * (k // 2) - k) // stride + 1
    flops = 3 * 2 * shape[0] * ho * ho * k * k * shape[-1] * cout
    print(json.dumps(dict(conv=name, input=list(shape), cout=cout, k=k, stride=stride, dtype=args.dtype,
                          switched=resnet.use_patches(shape[1:3], (ho, ho), (k, k), (stride, stride)),
                          plain_gflops=round(flops / t_plain / 1e9, 2),
                          patches_gflops=round(flops / t_patches / 1e9, 2),
                          plain_s=round(t_plain, 5), patches_s=round(t_patches, 5),
                          speedup=round(t_plain / t_patches, 2))), flush=True)


def bench_step(args):
  import jax
  import numpy as np

  from configs import common
  from xsample_jax import train
  from xsample_jax.models import resnet

  config = common.base()
  config.model.variant = "resnet18"
  config.model.stem = "imagenet"
  config.model.head = (512, 512, 128)
  config.model.dtype = args.dtype
  config.image_size = args.image_size
  config.batch_size = args.batch_size
  config.optimizer.name = "sgd"
  config.loss.name = "xclr"
  config.loss.graph = "class"
  config.mesh.data = 1
  mesh = train.make_mesh(config)
  n, classes = 2 * args.batch_size, 100
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (n, args.image_size, args.image_size, 3), dtype=np.uint8),
           "label": np.repeat(rng.integers(0, classes, args.batch_size), 2).astype(np.int32)}
  emb = rng.normal(size=(classes, 32))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  table = jax.device_put((emb @ emb.T).astype(np.float32), jax.sharding.NamedSharding(mesh, jax.P()))
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.P("data")))

  runs = {}
  for label, on in (("plain", False), ("patches", True)):
    resnet.PATCHES_CONV = on  # read when the step is traced: each variant gets its own jit and trace
    graphdef, _, shardings = train.abstract_state(config, mesh)
    step = train.make_train_step(config, graphdef, shardings, mesh, train.make_loss_fn(config, mesh, table))
    state = train.init_state(config, shardings)
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()
    runs[label] = {"step": step, "compile_s": time.perf_counter() - t0, "state": state}
  resnet.PATCHES_CONV = True

  def one(run):
    run["state"], metrics = run["step"](run["state"], batch)
    jax.block_until_ready(metrics)

  t_plain, t_patches = interleaved_medians([lambda r=r: one(r) for r in runs.values()], args.steps)
  print(json.dumps(dict(step="xclr_resnet18", image_size=args.image_size, batch_size=args.batch_size,
                        dtype=args.dtype, plain_s=round(t_plain, 3), patches_s=round(t_patches, 3),
                        speedup=round(t_plain / t_patches, 2),
                        compile_s={k: round(r["compile_s"], 1) for k, r in runs.items()})), flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch-size", type=int, default=128, help="global images; the convs see 2 views of each")
  ap.add_argument("--image-size", type=int, default=64)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=3, help="timed rounds per conv shape")
  ap.add_argument("--steps", type=int, default=3, help="timed train steps per variant")
  ap.add_argument("--no-convs", action="store_true")
  ap.add_argument("--no-step", action="store_true")
  args = ap.parse_args()
  if not args.no_convs:
    bench_convs(args)
  if not args.no_step:
    bench_step(args)


if __name__ == "__main__":
  main()

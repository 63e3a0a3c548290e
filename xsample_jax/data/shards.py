"""The caption-shard record format (ArrayRecord) and its reader/writer.

One record = one captioned image:
  b"XSR1" | u32 key_len | u32 caption_len | u32 image_len | u32 emb_dim | u8 emb_dtype (0 f32, 1 f16) | i64 id
  | key (utf-8) | caption (utf-8) | image (encoded bytes, as stored: JPEG/PNG/WebP) | embedding (little-endian)
Fixed-width little-endian header, no pickle: readable from any language, safe to read untrusted data.

Ids are stored as int64 (make_shards numbers items 0, 1, ...: past 2^31 at LAION scale), but batches carry int32 ids
and only their equality within a batch matters, so `decode_record` gives "id" = `batch_id(stored id)`: ids in
[0, 2^31 - 1) unchanged (no collisions below 2.1e9 items), others hashed into that range (two given ids collide with
probability ~2^-31); the stored value is "stored_id".

A shard directory holds `data-00000.array_record`, ... and `manifest.json` (written by `tools/make_shards.py`):
{"shards": [...], "written": int, "skipped": int, "skipped_items": [{"key", "reason"}], "embed_dim": int, ...}.
"""
from __future__ import annotations

import io
import json
import logging
import os
import struct

import cv2
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from PIL import Image

MAGIC = b"XSR1"
_HEADER = struct.Struct("<4sIIIIBq")
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_DTYPE_CODES = {np.dtype("<f4"): 0, np.dtype("<f2"): 1}
SHARD_PATTERN = "data-{:05d}.array_record"
PARTIAL_SUFFIX = ".partial"  # a shard being written; renamed to its final name only once closed


class BadRecordError(ValueError):
  """A record that cannot be used (undecodable image, empty caption, wrong embedding); the message names it."""


def encode_record(*, key: str | bytes, caption: str | bytes, image: bytes, embedding: np.ndarray,
                  id: int, dtype=np.float32) -> bytes:  # noqa: A002
  """One record; key and caption as text (UTF-8), or as bytes written as they are (records as scraped, which
  decode_record may then refuse)."""
  emb = np.asarray(embedding).astype(np.dtype(dtype).newbyteorder("<")).reshape(-1)
  k, c = (x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in (key, caption))
  header = _HEADER.pack(MAGIC, len(k), len(c), len(image), emb.size, _DTYPE_CODES[emb.dtype], id)
  return b"".join((header, k, c, bytes(image), emb.tobytes()))


def decode_record(data: bytes) -> dict:
  """-> {"key", "caption", "image" (bytes), "caption_emb" float32 [emb_dim], "id" (int32-safe: `batch_id`),
  "stored_id"}; BadRecordError if malformed."""
  if len(data) < _HEADER.size:
    raise BadRecordError(f"record of {len(data)} bytes is shorter than the header")
  magic, nk, nc, ni, dim, code, rid = _HEADER.unpack_from(data)
  if magic != MAGIC or code not in _DTYPES:
    raise BadRecordError(f"not an {MAGIC.decode()} record (magic {magic!r}, dtype code {code})")
  dt = _DTYPES[code]
  if len(data) != _HEADER.size + nk + nc + ni + dim * dt.itemsize:
    raise BadRecordError(f"record length {len(data)} does not match its header")
  o = _HEADER.size
  key = _text(data[o:o + nk], "key")
  o += nk
  try:
    caption = _text(data[o:o + nc], "caption")
  except BadRecordError as e:  # the key is readable: name the record by it
    raise BadRecordError(f"record {key!r}: {e}") from None
  o += nc
  image = data[o:o + ni]
  o += ni
  emb = np.frombuffer(data, dt, count=dim, offset=o).astype(np.float32)
  return {"key": key, "caption": caption, "image": image, "caption_emb": emb, "id": batch_id(rid), "stored_id": rid}


ID_RANGE = 2**31 - 1  # batch ids lie in [0, ID_RANGE): int32, and never the -1 of padding rows


def batch_id(rid: int) -> int:
  """An int64 id as an int32 batch id: itself if in [0, ID_RANGE), else a 64-bit mix (splitmix64's finaliser)
  folded into that range, so ids that differ only in their high bits (or by a multiple of ID_RANGE) still differ."""
  if 0 <= rid < ID_RANGE:
    return rid
  x = rid & 0xFFFFFFFFFFFFFFFF
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  return (x ^ (x >> 31)) % ID_RANGE


def _text(raw: bytes, field: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:  # a bad record like any other: the pipeline counts and skips it
    raise BadRecordError(f"{field} is not valid UTF-8 ({e.reason} at byte {e.start}: {raw[:40]!r})") from None


MAX_PIXELS = 2**26  # 64 megapixels: a larger image is refused before it is decoded (a decompression bomb)


def image_size(data: bytes) -> tuple[int, int] | None:
  """(width, height) from the image's header alone (PIL reads no pixels), or None if PIL cannot tell."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.size
  except Image.DecompressionBombError:
    raise
  except Exception:  # noqa: BLE001 (not an image PIL knows: OpenCV gets to try, and to refuse)
    return None


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB [H, W, 3]; BadRecordError if OpenCV cannot decode them or the header claims
  more than max_pixels pixels (checked before decoding, so a decompression bomb costs a grain worker no memory)."""
  try:
    size = image_size(data) if len(data) else None
  except Image.DecompressionBombError as e:  # beyond PIL's own limit (~179 megapixels), which is above ours
    raise BadRecordError(f"image exceeds the cap of {max_pixels} pixels ({e})") from None
  if size is not None and size[0] * size[1] > max_pixels:
    raise BadRecordError(f"image of {size[0]} x {size[1]} pixels exceeds the cap of {max_pixels}")
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if len(data) else None
  if img is None or img.size == 0:
    raise BadRecordError(f"undecodable image ({len(data)} bytes)")
  return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def record_problem(caption: str, embedding: np.ndarray, embed_dim: int) -> str | None:
  """Why a caption/embedding pair is unusable, or None if it is fine."""
  if not caption.strip():
    return "empty caption"
  emb = np.asarray(embedding)
  if emb.ndim != 1 or emb.shape[0] != embed_dim:
    return f"caption embedding has shape {emb.shape}, expected ({embed_dim},)"
  if not np.isfinite(emb).all():
    return "caption embedding is not finite"
  return None


class ShardWriter:
  """Writes records into numbered ArrayRecord shards of `records_per_shard` records each.

  A shard is written as NAME.partial and renamed to NAME when closed, so a crash never leaves a truncated file
  under a shard's final name (where an older manifest may still list it).
  """

  def __init__(self, directory: str, records_per_shard: int, first_shard: int = 0):
    if records_per_shard <= 0:
      raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
    self.directory, self.records_per_shard = directory, records_per_shard
    self.shard_index, self.in_shard = first_shard, 0
    self._writer = None
    os.makedirs(directory, exist_ok=True)

  def write(self, record: bytes) -> str | None:
    """Appends one record; returns the file name of the shard this call completed, else None."""
    if self._writer is None:
      # group_size:1 keeps random access cheap (one record per chunk read), which grain's shuffling needs.
      self._writer = ArrayRecordWriter(self._path() + PARTIAL_SUFFIX, "group_size:1")
    self._writer.write(record)
    self.in_shard += 1
    return self._finish() if self.in_shard == self.records_per_shard else None

  def _path(self) -> str:
    return os.path.join(self.directory, SHARD_PATTERN.format(self.shard_index))

  def _finish(self) -> str:
    self._writer.close()
    self._writer = None
    os.replace(self._path() + PARTIAL_SUFFIX, self._path())
    name = SHARD_PATTERN.format(self.shard_index)
    self.shard_index += 1
    self.in_shard = 0
    return name

  def close(self) -> str | None:
    """Finishes the partial last shard; returns its file name, or None if there was none."""
    return self._finish() if self._writer is not None else None


def read_manifest(directory: str) -> dict:
  path = epath.Path(directory) / "manifest.json"  # local, a gcsfuse mount, or gs://
  if not path.exists():
    raise FileNotFoundError(f"{directory} has no manifest.json; write shards with `python -m xsample_jax.tools.make_shards`")
  return json.loads(path.read_text())


def shard_paths(directory: str, allow_incomplete: bool = False) -> list[str]:
  """The shards a directory's manifest lists. One that make_shards has not finished (`complete: false`: it died or
  is still running) is refused, unless allow_incomplete (in a run: config.data.allow_incomplete_shards), and then
  warned about."""
  manifest = read_manifest(directory)
  paths = [os.path.join(directory, name) for name in manifest["shards"]]
  if manifest.get("complete", True) is False:  # no flag: a hand-written or older manifest, read as before
    what = (f"caption shards {directory} are INCOMPLETE (manifest.json says complete: false; "
            f"{manifest.get('written', '?')} records in {len(paths)} shards so far)")
    if not allow_incomplete:
      raise ValueError(f"{what}: finish them by rerunning make_shards with the same command, or read them anyway "
                       "with allow_incomplete=True (--config.data.allow_incomplete_shards=true)")
    logging.warning("%s: reading only those", what)
  return paths


def iter_records(directory: str, allow_incomplete: bool = False):
  """Every decoded record of a shard directory, in order (for inspection and tests; training uses sources.py)."""
  paths = shard_paths(directory, allow_incomplete)
  if not paths:
    return
  src = ArrayRecordDataSource(paths)
  for i in range(len(src)):
    yield decode_record(src[i])

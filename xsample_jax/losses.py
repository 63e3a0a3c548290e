"""Contrastive objectives on the global batch: X-Sample (X-CLR) and its baselines.

Every loss is a pure function of arrays. Called plainly, its rows are the whole batch. Called inside
`jax.shard_map` with `axis_name`, its rows are this device's shard: the rows' *inputs* (embeddings, caption
embeddings, labels) are all-gathered (tiled) over the axis -- never an N x N matrix -- each device computes its
rows against all N global columns, and the value returned is the global mean, identical on every device.
Autodiff through the tiled all_gather reduce-scatters the column gradients, so the gradient w.r.t. the local
rows is that of the global loss.

The softmax losses share one kernel, a row-wise soft-target cross-entropy (docs/method.md, "Notation and the
loss"):

    L_i = LSE_j(l_ij) - sum_j G_ij l_ij,    G_i = softmax_j(t_ij),    dL_i/dl_ij = P_ij - G_ij,

with logits l = scale * z_r . z_c (unit rows) and target logits t from a *graph*:

  ==========  =====================================  =========================================
  graph        t_ij                                   used by
  ==========  =====================================  =========================================
  "embed"      (c_i . c_j) / tau_s  (unit rows)        X-Sample with captions (the paper)
  "table"      S[y_i, y_j] / tau_s                     X-Sample with class names: a K x K lookup
                                                       instead of an N^2 E matmul
  "label"      [y_i == y_j] / tau_s                    label / instance graph at finite tau_s
  "hard"       0 if y_i == y_j else -inf               the tau_s -> 0 limit: SupCon, SimCLR, CLIP
  ==========  =====================================  =========================================

Pairs excluded by the self-mask get l = t = -inf. A row whose targets are all -inf (a SupCon anchor without a
positive) contributes nothing and is not counted in the mean.

Two implementations of the kernel give the same value and gradient:
  * "dense": the n x N logits and targets are formed whole and autodiff does the rest. Simple; O(n N) memory.
  * "blockwise": a `jax.custom_vjp` whose forward pass, under differentiation, also forms P - G tile by tile and
    accumulates dL/dz, as fused linear cross-entropy kernels do, so the backward pass only scales the stored
    gradient. Two sweeps:
    - The self-similarity sweep (xsample_loss, supcon_loss, simclr_loss on one device: the columns are the rows
      and the graph is symmetric, so l and t are symmetric). Square blocks of SYM_BLOCK rows, small enough to
      stay in cache; only the blocks I <= J are formed, each serving rows I along its rows and rows J along its
      columns. Pass 1 folds every block into online statistics (max and sum of exp for l and t, and the
      rescaled sum_j exp(t_ij) l_ij, docs/method.md "Blockwise sweep"); pass 2 recomputes each block, forms
      S = A_IJ + A_JI^T (A = P - G) and accumulates S z_J into rows I and S^T z_I into rows J. With a number
      (not array) temperature >= 1/40, the bound 1/tau of the unit-row logits is a safe fixed shift: no running
      maxima, and one exp per element of each block serves both its rows and its columns. FLOPs:
      2 x N^2 (D + E) for the two passes' logits and targets + 2 N^2 D for the gradient = 4 N^2 D + 2 N^2 E,
      below the dense 6 N^2 D + 2 N^2 E; memory O(block^2 + N (D + E)).
    - The general sweep (columns from other rows or other devices, or a class table, not known symmetric): row panels
      (R rows x all columns). When a panel's full width fits in one tile (by default up to N = 2^20 columns:
      R >= 8 rows x N within TILE_ELEMENTS) this costs the dense FLOPs in O(R N + N (D + E)) memory; with
      several column tiles the columns are swept twice, recomputing each tile once (8 N^2 D + 4 N^2 E).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("dense", "blockwise", "auto")
# "auto" switches to blockwise when one device's n x N logits pass this many elements: the crossover measured by
# `python -m benchmarks.loss_bench --n 256 512 1024 2048 4096 8192 16384 --impl plain dense blockwise` on the 2-core
# CPU (benchmarks/results/loss_bench_cpu_2core.jsonl; X-Sample, D = 128, E = 384, f32): at N = 256 both take 1.9 ms,
# from N = 512 blockwise is faster (4.5 against 5.8 ms; 0.13 against 0.23 s at 4,096).
AUTO_BLOCKWISE_ELEMENTS = 1 << 16
# The general sweep (rows sharded over devices, cross-modal, CLIP, class tables) keeps full-width panels and was not
# measured against dense at small sizes: it keeps its former threshold (16 MiB of f32 logits a device).
AUTO_GENERAL_BLOCKWISE_ELEMENTS = 1 << 22
# Elements in one blockwise tile (rows x columns): 32 MiB per f32 buffer.
TILE_ELEMENTS = 1 << 23
# Side of the self-similarity sweep's square blocks.
SYM_BLOCK = 1024

__all__ = [
    "xsample_loss", "xsample_cross_modal_loss", "simclr_loss", "supcon_loss", "clip_loss", "siglip_loss",
    "soft_cross_entropy",
]


# ----------------------------------------------------------------------------------------------------------
# Public losses.


def xsample_loss(z, c, *, temperature=0.1, target_temperature=0.1, mask_self=True, axis_name=None,
                 impl="dense", class_similarity=None, tile=None):
  """X-Sample contrastive loss (X-CLR): soft-target cross-entropy against a caption-similarity graph.

  Args:
    z: [n, D] image embeddings of this shard's rows (all views stacked). L2-normalised here.
    c: the rows' frozen graph inputs, one of
       - [n, E] float caption / class-name embeddings (L2-normalised here; no gradient), or
       - [n] int labels or instance ids. With `class_similarity` ([K, K], e.g. cosine similarities of the K
         class-name embeddings) s_ij = class_similarity[y_i, y_j]; without it s_ij = [y_i == y_j].
    temperature: tau of the image logits (a float, or a scalar array to learn it).
    target_temperature: tau_s of the target graph, > 0.
    mask_self: exclude the pair (i, i) from both distributions.
    axis_name: mesh axis (or axes) to gather the global batch over, inside `jax.shard_map`.
    impl: "dense", "blockwise" or "auto" (blockwise when one device's n x N logits exceed
      AUTO_BLOCKWISE_ELEMENTS, or AUTO_GENERAL_BLOCKWISE_ELEMENTS for sharded rows).
    class_similarity: optional [K, K] table, with integer `c`.
    tile: optional (rows, cols) tile of the blockwise sweep (default from TILE_ELEMENTS); the self-similarity
      sweep uses square blocks of `rows` (default SYM_BLOCK).

  Returns:
    The scalar mean over all N global rows of the soft-target cross-entropy (docs/method.md, "Notation and the
    loss").
  """
  _check_embeddings("z", z)
  _check_positive("temperature", temperature)
  _check_positive("target_temperature", target_temperature)
  graph = _graph_from_c(c, z.shape[0], class_similarity, target_temperature, hard=False)
  return _mean_soft_ce(z, z, graph, 1.0 / _as_f32(temperature), mask_self=mask_self, axis_name=axis_name,
                       impl=impl, tile=tile, shift=_fixed_shift(temperature))


def supcon_loss(z, labels, *, temperature=0.1, axis_name=None, impl="dense", tile=None):
  """Supervised contrastive loss (Khosla et al., L_out): every other row of the same label is a positive.

  Mean over anchors that have at least one positive. `labels`: [n] int. Equals `xsample_loss` with the label
  graph in the limit target_temperature -> 0.
  """
  return _positives_loss(z, labels, "labels", temperature, axis_name, impl, tile)


def simclr_loss(z, ids, *, temperature=0.1, axis_name=None, impl="dense", tile=None):
  """SimCLR's NT-Xent: the other view(s) of the same image are the positives, all else negatives.

  `ids`: [n] int, the image id of each row (the views of one image share it). With two views this is exactly
  NT-Xent; it is SupCon on instance ids, and X-Sample with an instance graph as target_temperature -> 0.
  """
  return _positives_loss(z, ids, "ids", temperature, axis_name, impl, tile)


def _positives_loss(z, labels, name, temperature, axis_name, impl, tile):
  """SupCon / SimCLR: uniform target over the other rows with the same label (the "hard" graph), self masked."""
  _check_embeddings("z", z)
  _check_positive("temperature", temperature)
  graph = _graph_from_c(labels, z.shape[0], None, None, hard=True, name=name)
  return _mean_soft_ce(z, z, graph, 1.0 / _as_f32(temperature), mask_self=True, axis_name=axis_name,
                       impl=impl, tile=tile, shift=_fixed_shift(temperature))


def xsample_cross_modal_loss(image_emb, text_emb, c, *, temperature=0.1, target_temperature=0.1,
                             axis_name=None, impl="dense", class_similarity=None, tile=None):
  """Cross-modal X-Sample: image->text and text->image soft cross-entropies against the caption graph.

  l_ij = u_i . v_j / tau between image i and text j (unit rows), targets softmax_j(s_ij / tau_s) from the frozen
  graph inputs `c` (as in `xsample_loss`); the symmetric mean of both directions. No self-mask: the pair (i, i)
  is the matched pair. With an instance graph and tau_s -> 0 this is CLIP.
  """
  _check_pair(image_emb, text_emb)
  _check_positive("temperature", temperature)
  _check_positive("target_temperature", target_temperature)
  graph = _graph_from_c(c, image_emb.shape[0], class_similarity, target_temperature, hard=False)
  scale = 1.0 / _as_f32(temperature)
  kw = dict(mask_self=False, axis_name=axis_name, impl=impl, tile=tile)
  return 0.5 * (_mean_soft_ce(image_emb, text_emb, graph, scale, **kw)
                + _mean_soft_ce(text_emb, image_emb, graph, scale, **kw))


def clip_loss(image_emb, text_emb, log_scale, *, max_scale=100.0, axis_name=None, impl="dense", tile=None):
  """CLIP's symmetric image-text InfoNCE with a learnable temperature.

  Logits are exp(log_scale) * u_i . v_j (unit rows), the scale clipped at `max_scale` as in CLIP;
  `log_scale` is a scalar (CLIP initialises it to log(1 / 0.07)). Each row's positive is its own pair.
  """
  _check_pair(image_emb, text_emb)
  graph = _Graph("hard", None, None, None, None, 0.0)  # filled with global row indices in _mean_soft_ce
  scale = jnp.minimum(jnp.exp(_as_f32(log_scale)), max_scale)
  kw = dict(mask_self=False, axis_name=axis_name, impl=impl, tile=tile)
  return 0.5 * (_mean_soft_ce(image_emb, text_emb, graph, scale, **kw)
                + _mean_soft_ce(text_emb, image_emb, graph, scale, **kw))


def siglip_loss(image_emb, text_emb, log_scale, bias, *, axis_name=None):
  """SigLIP's pairwise sigmoid loss with learnable temperature and bias (Zhai et al. 2023).

  L = -(1/N) sum_ij log sigmoid(y_ij (exp(log_scale) u_i . v_j + bias)), y_ij = +1 for the matched pair and
  -1 otherwise (SigLIP initialises log_scale = log 10, bias = -10). Rows against the gathered columns, dense.
  """
  _check_pair(image_emb, text_emb)
  u = _unit(image_emb)
  v_all = _gather(_unit(text_emb), axis_name)
  n, total = u.shape[0], v_all.shape[0]
  row_ids = _row_offset(n, axis_name) + jnp.arange(n)
  logits = jnp.exp(_as_f32(log_scale)) * _dot_nt(u, v_all) + _as_f32(bias)
  sign = jnp.where(row_ids[:, None] == jnp.arange(total)[None, :], 1.0, -1.0)
  local = -jnp.sum(jax.nn.log_sigmoid(sign * logits))
  return _psum(local, axis_name) / total


def soft_cross_entropy(logits, target_logits):
  """Per-row soft-target cross-entropy LSE(l_i) - sum_j softmax(t_i)_j l_ij; -inf entries are excluded.

  The building block of every softmax loss here; its gradient w.r.t. `logits` is P - G (rows sum to zero).
  Rows whose targets are all -inf give 0.
  """
  loss, _, _, _ = _row_terms(jnp.asarray(logits, jnp.float32), jax.lax.stop_gradient(target_logits))
  return loss


# ----------------------------------------------------------------------------------------------------------
# Input checks (at trace time: shapes and concrete hyper-parameters).


def _check_embeddings(name, x):
  if jnp.ndim(x) != 2:
    raise ValueError(f"{name} must be [rows, dim], got shape {jnp.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"{name} must be floating point, got {jnp.result_type(x)}")


def _check_pair(image_emb, text_emb):
  _check_embeddings("image_emb", image_emb)
  _check_embeddings("text_emb", text_emb)
  if image_emb.shape != text_emb.shape:
    raise ValueError(f"image_emb {image_emb.shape} and text_emb {text_emb.shape} must have the same shape "
                     "(rows are matched pairs, dims must agree for the dot product)")


def _check_positive(name, value):
  try:  # Only concrete values can be checked; a traced (learned) temperature is the caller's business.
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if not v > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def _as_f32(x):
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------------------
# Graphs.


class _Graph(NamedTuple):
  kind: str                 # "embed" | "table" | "label" | "hard"
  rows: jax.Array | None    # [n, E] unit caption embeddings or [n] int labels of this shard's rows
  cols: jax.Array | None    # the same for all N columns (gathered)
  table: jax.Array | None   # [K, K] class similarities ("table")
  inv_tau: jax.Array | None  # 1 / tau_s (not "hard")
  shift: float | None        # a fixed softmax shift for t (_fixed_shift), or None


def _graph_from_c(c, n, class_similarity, target_temperature, *, hard, name="c"):
  """Validates the graph inputs of n rows; the columns are filled in by _mean_soft_ce after gathering."""
  c = jnp.asarray(c)
  if jnp.issubdtype(c.dtype, jnp.floating):
    if c.ndim != 2:
      raise ValueError(f"{name} must be [rows, E] embeddings or [rows] integer labels, got shape {c.shape}")
    if class_similarity is not None:
      raise ValueError("class_similarity needs integer labels as c, got float embeddings")
    kind, rows = "embed", _unit(jax.lax.stop_gradient(c))
  elif jnp.issubdtype(c.dtype, jnp.integer):
    if c.ndim != 1:
      raise ValueError(f"integer {name} must be [rows] labels/ids, got shape {c.shape}")
    kind, rows = ("hard" if hard else "table" if class_similarity is not None else "label"), c.astype(jnp.int32)
  else:
    raise TypeError(f"{name} must be float embeddings or integer labels, got dtype {c.dtype}")
  if c.shape[0] != n:
    raise ValueError(f"z has {n} rows but {name} has {c.shape[0]}: each row needs its own graph input")
  table = None
  if class_similarity is not None:
    table = jax.lax.stop_gradient(jnp.asarray(class_similarity, jnp.float32))
    if table.ndim != 2 or table.shape[0] != table.shape[1]:
      raise ValueError(f"class_similarity must be a square [K, K] table, got shape {table.shape}")
  inv_tau = None if hard else 1.0 / _as_f32(target_temperature)
  shift = 0.0 if hard else _fixed_shift(target_temperature)  # "hard" targets are 0 or -inf
  return _Graph(kind, rows, None, table, inv_tau, shift)


# ----------------------------------------------------------------------------------------------------------
# The shared kernel.


def _unit(x):
  """L2-normalise rows in f32 and return them in x's dtype (the matmuls then run in that dtype)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, -1, keepdims=True), 1e-24))).astype(x.dtype)


@jax.custom_vjp
def _dot_nt(a, b):
  """a @ b.T with f32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nt_fwd(a, b):
  return _dot_nt(a, b), (a, b)


def _dot_nt_bwd(res, g):
  """g b and (a^T g)^T: autodiff's g^T a is a transposed-operand matmul, about half the rate on CPU."""
  a, b = res
  g = g.astype(a.dtype)  # operands in the inputs' dtype, f32 accumulation
  da = jnp.dot(g, b, preferred_element_type=jnp.float32)
  db = jnp.dot(a.T, g, preferred_element_type=jnp.float32).T
  return da.astype(a.dtype), db.astype(b.dtype)


_dot_nt.defvjp(_dot_nt_fwd, _dot_nt_bwd)


def _gather(x, axis_name):
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _row_offset(n, axis_name):
  """Global index of this shard's first row (shards are laid out in device order along the axis)."""
  return jnp.int32(0) if axis_name is None else jax.lax.axis_index(axis_name).astype(jnp.int32) * n


def _mean_soft_ce(zr, zc, graph, scale, *, mask_self, axis_name, impl, tile, shift=None):
  """Global mean over rows (with targets) of the soft CE of this shard's rows zr against all columns zc."""
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
  n = zr.shape[0]
  # Rows against themselves on one device, with a symmetric graph: the blockwise kernel forms half the blocks.
  symmetric = zr is zc and axis_name is None and graph.kind in ("embed", "label", "hard")
  zr_unit = _unit(zr)
  zc_all = zr_unit if symmetric else _gather(_unit(zc), axis_name)
  total = zc_all.shape[0]
  offset = _row_offset(n, axis_name)
  if graph.rows is None:  # instance graph of global row indices (CLIP)
    graph = graph._replace(rows=offset + jnp.arange(n, dtype=jnp.int32), cols=jnp.arange(total, dtype=jnp.int32))
  else:
    graph = graph._replace(cols=graph.rows if symmetric else _gather(graph.rows, axis_name))
  if impl == "auto":
    threshold = AUTO_BLOCKWISE_ELEMENTS if symmetric else AUTO_GENERAL_BLOCKWISE_ELEMENTS
    impl = "blockwise" if n * total > threshold else "dense"
  if impl == "dense":
    loss_sum, count = _dense_sum(zr_unit, zc_all, scale, graph, offset, mask_self, shift)
  elif symmetric:
    if tile is None:  # the fewest blocks of at most SYM_BLOCK rows, equal up to a multiple of 8: little padding
      block = -(-n // -(-n // SYM_BLOCK))
      block = min(-(-block // 8) * 8, n)
    else:
      block = min(int(tile[0]), n)
      if block < 1:
        raise ValueError(f"tile must be two positive sizes, got {tile}")
    cfg = (graph.kind, mask_self, block, zr_unit.dtype.name, (shift, graph.shift))
    loss_sum, count = _sym_sum(cfg, zr_unit, scale, graph._replace(kind=None, cols=None, shift=None))
  else:
    rows, cols = _tile_shape(n, total, tile)
    if axis_name is not None:  # scale is replicated; mark it per-device so its cotangent is summed (psum).
      scale = jax.lax.pcast(scale, axis_name, to="varying")
    # The graph's kind travels in the static config; its arrays are (non-differentiable) inputs.
    cfg = (graph.kind, mask_self, rows, cols, zr_unit.dtype.name, zc_all.dtype.name, axis_name)
    loss_sum, count = _blockwise_sum(cfg, zr_unit, zc_all, scale,
                                     graph._replace(kind=None, shift=None), offset)
  return _psum(loss_sum, axis_name) / jnp.maximum(_psum(count, axis_name), 1.0)


def _tile(zr, zc, scale, graph_rows, graph_cols, graph, excluded):
  """Logits l, target logits t (both -inf where `excluded`) and raw cosines for one tile of rows x columns."""
  raw = _dot_nt(zr, zc)
  if graph.kind == "embed":
    t = _dot_nt(graph_rows, graph_cols) * graph.inv_tau
  elif graph.kind == "table":
    t = jnp.take(jnp.take(graph.table, graph_rows, axis=0), graph_cols, axis=1) * graph.inv_tau
  elif graph.kind == "label":
    t = (graph_rows[:, None] == graph_cols[None, :]).astype(jnp.float32) * graph.inv_tau
  else:  # "hard"
    t = jnp.where(graph_rows[:, None] == graph_cols[None, :], 0.0, -jnp.inf)
  l = jnp.where(excluded, -jnp.inf, scale * raw)
  t = jnp.where(excluded, -jnp.inf, jax.lax.stop_gradient(t))
  return raw, l, t


def _excluded(row_ids, col_ids, n_cols, mask_self):
  """Pairs left out of both distributions: padding columns and, with mask_self, the self pair."""
  excluded = (col_ids >= n_cols)[None, :]
  if mask_self:
    excluded = excluded | (row_ids[:, None] == col_ids[None, :])
  return excluded


def _softmax_stats(x):
  """Row-wise exp(x - m), their sum and log-sum-exp; an all -inf row gives sum 0 and LSE -inf, not NaN."""
  m = jnp.max(x, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(x - m[:, None])
  s = jnp.sum(e, axis=-1)
  return e, s, jnp.log(s) + m


def _row_terms(l, t):
  """Per-row loss, has-target flag, G and P for logits l and target logits t (whole rows)."""
  e_l, s_l, lse_l = _softmax_stats(l)
  e_t, s_t, _ = _softmax_stats(t)
  has_target = s_t > 0
  g = e_t / jnp.where(has_target, s_t, 1.0)[:, None]
  gl = jnp.sum(g * jnp.where(jnp.isfinite(l), l, 0.0), axis=-1)
  p = e_l / jnp.where(s_l > 0, s_l, 1.0)[:, None]
  return jnp.where(has_target, lse_l - gl, 0.0), has_target, g, p


def _dense_sum(zr, zc, scale, graph, offset, mask_self, shift):
  """The n x N tile whole, differentiated by autodiff; no isfinite passes over it (they cost as much as the
  softmax): excluded pairs are -inf in l and t, so exp makes them 0, and sum_j G_ij l_ij reads the finite logits.
  shift, graph.shift: fixed softmax shifts for l and t (_fixed_shift) in place of the rows' maxima, or None."""
  row_ids = offset + jnp.arange(zr.shape[0], dtype=jnp.int32)
  col_ids = jnp.arange(zc.shape[0], dtype=jnp.int32)
  raw, l, t = _tile(zr, zc, scale, graph.rows, graph.cols, graph, _excluded(row_ids, col_ids, zc.shape[0], mask_self))
  rows = zr.shape[0]
  m_t = _finite_or_zero(jnp.max(t, 1)) if graph.shift is None else jnp.full((rows,), graph.shift)
  e_t = jnp.exp(t - m_t[:, None])
  s_t = jnp.sum(e_t, 1)
  has_target = s_t > 0  # then l has a finite entry too (the same pairs are excluded)
  m_l = jax.lax.stop_gradient(_finite_or_zero(jnp.max(l, 1))) if shift is None else jnp.full((rows,), shift)
  lse_l = jnp.log(jnp.where(has_target, jnp.sum(jnp.exp(l - m_l[:, None]), 1), 1.0)) + m_l
  gl = jnp.sum(e_t * (scale * raw), 1) / jnp.where(has_target, s_t, 1.0)
  loss = jnp.where(has_target, lse_l - gl, 0.0)
  return jnp.sum(loss), jnp.sum(has_target.astype(jnp.float32))


def _tile_shape(n, total, tile):
  """(rows, cols) of a blockwise tile. Default: full-width row panels while they fit TILE_ELEMENTS."""
  if tile is not None:
    rows, cols = (int(v) for v in tile)
    if rows < 1 or cols < 1:
      raise ValueError(f"tile must be two positive sizes, got {tile}")
    return min(rows, n), min(cols, total)
  rows = 1 << max(3, min(9, int(math.log2(max(TILE_ELEMENTS // total, 1)))))  # 8 .. 512, a power of two
  rows = min(rows, n)
  cols = total if rows * total <= TILE_ELEMENTS else max(TILE_ELEMENTS // rows, 128)
  return rows, cols


# ----------------------------------------------------------------------------------------------------------
# Blockwise kernel: row panels x column tiles, online LSEs, gradient formed in the forward sweep.


def _pad_rows(x, size):
  return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _padded_inputs(cfg, zr, zc, graph, offset):
  rows, cols = cfg[2], cfg[3]
  n, total = zr.shape[0], zc.shape[0]
  n_pad, total_pad = -(-n // rows) * rows, -(-total // cols) * cols
  graph_rows = _pad_rows(graph.rows, n_pad)
  graph_cols = _pad_rows(graph.cols, total_pad)
  row_ids = offset + jnp.arange(n_pad, dtype=jnp.int32)
  return _pad_rows(zr, n_pad), _pad_rows(zc, total_pad), graph_rows, graph_cols, row_ids, n_pad, total_pad


def _sweep(cfg, zr, zc, scale, graph, offset, with_grad):
  """Returns (loss_sum, count) and, with_grad, d(loss_sum)/d(zr, zc, scale) in f32."""
  kind, mask_self, rows, cols, _, _, axis_name = cfg
  graph = graph._replace(kind=kind)

  def vary(tree):  # loop carries start per-device under shard_map (the rows differ per device)
    return tree if axis_name is None else jax.tree.map(lambda x: jax.lax.pcast(x, axis_name, to="varying"), tree)

  n, total = zr.shape[0], zc.shape[0]
  zr_p, zc_p, gr_p, gc_p, row_ids, n_pad, total_pad = _padded_inputs(cfg, zr, zc, graph, offset)
  n_col_tiles = total_pad // cols
  col_ids_all = jnp.arange(total_pad, dtype=jnp.int32)

  def col_slice(x, j, axis=0):
    return jax.lax.dynamic_slice_in_dim(x, j * cols, cols, axis)

  def panel(i, carry):
    loss_sum, count, dzr, dzc_t, dscale = carry
    zr_i = jax.lax.dynamic_slice_in_dim(zr_p, i * rows, rows)
    gr_i = jax.lax.dynamic_slice_in_dim(gr_p, i * rows, rows)
    rid = jax.lax.dynamic_slice_in_dim(row_ids, i * rows, rows)
    row_valid = (rid - offset) < n  # padding rows

    def tile(j):
      return _tile(zr_i, col_slice(zc_p, j), scale, gr_i, col_slice(gc_p, j), graph,
                   _excluded(rid, col_slice(col_ids_all, j), total, mask_self))

    if n_col_tiles == 1:  # the panel's full width is one tile: no online statistics, no recomputation
      _, l, t = tile(0)
      loss, has_target, g, p = _row_terms(l, t)
    else:  # pass 1: online LSE(l), LSE(t) and sum_j exp(t_ij - m_t) l_ij over the column tiles
      def stats(j, s):
        raw, l, t = tile(j)
        return _fold_stats(s, l, t, scale * raw, 1)

      neg_inf, zeros = jnp.full((rows,), -jnp.inf), jnp.zeros((rows,))
      m_l, s_l, m_t, s_t, acc = jax.lax.fori_loop(0, n_col_tiles, stats,
                                                  vary((neg_inf, zeros, neg_inf, zeros, zeros)))
      lse_l, lse_t = jnp.log(s_l) + _finite_or_zero(m_l), jnp.log(s_t) + _finite_or_zero(m_t)
      has_target = jnp.isfinite(lse_t)
      loss = jnp.where(has_target, lse_l - acc / jnp.where(has_target, s_t, 1.0), 0.0)
    has_target = has_target & row_valid
    loss_sum = loss_sum + jnp.sum(jnp.where(has_target, loss, 0.0))
    count = count + jnp.sum(has_target.astype(jnp.float32))
    if not with_grad:
      return loss_sum, count, dzr, dzc_t, dscale

    def grad_tile(dl, j, dzr_i, dzc_t):  # dl = dL/dl = P - G, rows sum to zero
      dl_mm = dl.astype(zr.dtype)  # matmul operands in the embeddings' dtype, f32 accumulation
      dzr_i = dzr_i + jnp.dot(dl_mm, col_slice(zc_p, j), preferred_element_type=jnp.float32)
      # The columns' share as (z_i^T A)^T: A^T z_i, a transposed-operand matmul, runs at about half the rate on CPU.
      dzc_t_j = col_slice(dzc_t, j, 1) + jnp.dot(zr_i.T, dl_mm, preferred_element_type=jnp.float32)
      return dzr_i, jax.lax.dynamic_update_slice_in_dim(dzc_t, dzc_t_j, j * cols, 1)

    dzr_i = vary(jnp.zeros((rows, zr.shape[1]), jnp.float32))
    if n_col_tiles == 1:
      dzr_i, dzc_t = grad_tile(jnp.where(has_target[:, None], p - g, 0.0), 0, dzr_i, dzc_t)
    else:  # pass 2: recompute each tile, form P - G, accumulate the gradients
      norm = (jnp.where(has_target, m_l, 0.0), 1.0 / jnp.where(has_target, s_l, 1.0),
              jnp.where(has_target, m_t, 0.0), 1.0 / jnp.where(has_target, s_t, 1.0), has_target)
      def grads(j, s):
        _, l, t = tile(j)
        return grad_tile(_p_minus_g(l, t, norm), j, *s)
      dzr_i, dzc_t = jax.lax.fori_loop(0, n_col_tiles, grads, (dzr_i, dzc_t))
    # d/dscale = sum_ij A_ij zr_i . zc_j = sum_i zr_i . (A zc)_i
    dscale = dscale + jnp.sum(zr_i.astype(jnp.float32) * dzr_i)
    dzr = jax.lax.dynamic_update_slice_in_dim(dzr, scale * dzr_i, i * rows, 0)
    return loss_sum, count, dzr, dzc_t, dscale

  f32 = jnp.float32
  init = (jnp.zeros((), f32), jnp.zeros((), f32),
          jnp.zeros((n_pad, zr.shape[1]), f32) if with_grad else None,
          jnp.zeros((zc.shape[1], total_pad), f32) if with_grad else None,  # dL/dzc transposed
          jnp.zeros((), f32) if with_grad else None)
  loss_sum, count, dzr, dzc_t, dscale = jax.lax.fori_loop(0, n_pad // rows, panel, vary(init))
  if not with_grad:
    return (loss_sum, count), None
  return (loss_sum, count), (dzr[:n], scale * dzc_t.T[:total], dscale)


def _fixed_shift(temperature):
  """A fixed softmax shift for logits x / temperature with |x| <= 1 (unit rows): 1 / temperature, when then every
  exp(x / temperature - 1 / temperature) is a normal float32 (exp(-80) is; the smallest is exp(-87.3)), so sums of
  exp lose nothing to the missing max. None (online maxima) when the temperature is an array (learned, or traced)
  or below 1/40."""
  if not isinstance(temperature, (int, float, np.integer, np.floating)) or not 2.0 / temperature <= 80.0:
    return None
  return 1.0 / temperature


def _finite_or_zero(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


def _fold_stats(state, l, t, l_finite, axis, shifts=(None, None)):
  """Folds a tile into the online statistics (max, sum of exp for l; max, sum of exp, sum_j exp(t) l for t) of
  the rows along `axis` (1: the tile's rows, 0: its columns). l_finite: l without the -inf (exp(t) is 0 there).
  shifts: (for l, for t) a fixed shift (_fixed_shift; the state holds it as the max) or None. A fixed shift needs
  no max and no rescaling, and the rows' and the columns' folds of one tile share its exps."""
  m_l, s_l, m_t, s_t, acc = state
  def shifted_exp(x, m, shift):  # exp(x - m'), m' and the rescaling of the old sums
    if shift is not None:
      return jnp.exp(x - shift), m, 1.0
    m2 = jnp.maximum(m, jnp.max(x, axis))
    m2_safe = _finite_or_zero(m2)
    return jnp.exp(x - jnp.expand_dims(m2_safe, axis)), m2, jnp.exp(_finite_or_zero(m) - m2_safe) * jnp.isfinite(m)
  e_l, m_l, rescale_l = shifted_exp(l, m_l, shifts[0])
  e_t, m_t, rescale_t = shifted_exp(t, m_t, shifts[1])
  s_l = s_l * rescale_l + jnp.sum(e_l, axis)
  s_t = s_t * rescale_t + jnp.sum(e_t, axis)
  acc = acc * rescale_t + jnp.sum(e_t * l_finite, axis)
  return m_l, s_l, m_t, s_t, acc


def _sym_sweep(cfg, z, scale, graph, with_grad):
  """The self-similarity sweep (columns = rows, one device): l and t are symmetric, so only the blocks I <= J
  are formed; each serves row block I along its rows and row block J along its columns. Returns (loss_sum,
  count) and, with_grad, d(loss_sum)/d(z, scale) in f32."""
  kind, mask_self, block, _, shifts = cfg
  graph = graph._replace(kind=kind)
  n = z.shape[0]
  n_pad = -(-n // block) * block
  z_p, g_p = _pad_rows(z, n_pad), _pad_rows(graph.rows, n_pad)
  ids = jnp.arange(n_pad, dtype=jnp.int32)
  # I-major, so block I stays in cache while the J >= I stream past.
  pairs = jnp.asarray(np.stack(np.triu_indices(n_pad // block), 1), jnp.int32)

  def blk(x, i, axis=0):
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis)

  def tile(p):
    i, j = pairs[p, 0], pairs[p, 1]
    rid, cid = blk(ids, i), blk(ids, j)
    excluded = _excluded(rid, cid, n, mask_self) | (rid >= n)[:, None]  # symmetric: padding rows too
    return i, j, _tile(blk(z_p, i), blk(z_p, j), scale, blk(g_p, i), blk(g_p, j), graph, excluded)

  def blocks(stats, i):
    return tuple(blk(x, i) for x in stats)

  def update(stats, i, new):
    return tuple(jax.lax.dynamic_update_slice_in_dim(x, v, i * block, 0) for x, v in zip(stats, new))

  def fold(p, stats):
    i, j, (raw, l, t) = tile(p)
    stats = update(stats, i, _fold_stats(blocks(stats, i), l, t, scale * raw, 1, shifts))
    # A diagonal block's columns are its own rows, already folded.
    old = blocks(stats, j)
    cols = _fold_stats(old, l, t, scale * raw, 0, shifts)
    return update(stats, j, tuple(jnp.where(i == j, o, c) for o, c in zip(old, cols)))

  start = [jnp.full((n_pad,), -jnp.inf if s is None else s) for s in shifts]
  zeros = jnp.zeros((n_pad,))
  m_l, s_l, m_t, s_t, acc = jax.lax.fori_loop(0, pairs.shape[0], fold, (start[0], zeros, start[1], zeros, zeros))
  has_target = (s_t > 0) & (ids < n)
  s_l, s_t = jnp.where(has_target, s_l, 1.0), jnp.where(has_target, s_t, 1.0)
  m_l, m_t = jnp.where(has_target, m_l, 0.0), jnp.where(has_target, m_t, 0.0)
  loss = jnp.where(has_target, jnp.log(s_l) + m_l - acc / s_t, 0.0)
  out = (jnp.sum(loss), jnp.sum(has_target.astype(jnp.float32)))
  if not with_grad:
    return out, None

  # exp(x - m) / s rather than exp(x - LSE), whose rounding near a large max (t up to 1 / tau_s) costs G digits.
  r_l, r_t = jnp.where(has_target, 1.0 / s_l, 0.0), jnp.where(has_target, 1.0 / s_t, 0.0)
  z_t = z_p.T  # [D, N]: the column-side product is then a plain (not transposed-operand) matmul

  def softmaxes(x, m, r, shift, i, j):  # softmax_j(x_ij) of rows I plus softmax_i(x_ij) of rows J (columns)
    r_i, r_j = blk(r, i)[:, None], blk(r, j)[None, :]
    if shift is not None:  # exp(x - shift) <= 1 serves both, rows without targets have r = 0
      return jnp.exp(x - shift) * (r_i + r_j)
    m_i, m_j = blk(m, i)[:, None], blk(m, j)[None, :]  # a row without targets may overflow: where, not r = 0
    return jnp.where(r_i > 0, jnp.exp(x - m_i) * r_i, 0.0) + jnp.where(r_j > 0, jnp.exp(x - m_j) * r_j, 0.0)

  def grads(p, carry):
    dz, dz_t = carry
    i, j, (_, l, t) = tile(p)
    # S = A_IJ + A_JI^T with A = P - G: the rows' softmaxes of I and, through the columns, of J.
    s = softmaxes(l, m_l, r_l, shifts[0], i, j) - softmaxes(t, m_t, r_t, shifts[1], i, j)
    s_mm = s.astype(z.dtype)
    dz_i = blk(dz, i) + jnp.dot(s_mm, blk(z_p, j), preferred_element_type=jnp.float32)
    dz = jax.lax.dynamic_update_slice_in_dim(dz, dz_i, i * block, 0)
    # Off the diagonal, S^T z_I is block J's share; a diagonal S already holds both.
    dz_t_j = jnp.dot(blk(z_t, i, 1), s_mm, preferred_element_type=jnp.float32)
    dz_t_j = blk(dz_t, j, 1) + jnp.where(i == j, 0.0, dz_t_j)
    return dz, jax.lax.dynamic_update_slice_in_dim(dz_t, dz_t_j, j * block, 1)

  d = z.shape[1]
  dz, dz_t = jax.lax.fori_loop(0, pairs.shape[0], grads, (jnp.zeros((n_pad, d)), jnp.zeros((d, n_pad))))
  dz = dz + dz_t.T  # (A + A^T) z: d(loss_sum)/dl = A, and l = scale z z^T
  # d/dscale = sum_ij A_ij z_i.z_j = (1/2) sum_i z_i . ((A + A^T) z)_i
  return out, (scale * dz[:n], 0.5 * jnp.sum(z_p.astype(jnp.float32) * dz))


def _p_minus_g(l, t, norm):
  """A = P - G of a tile's rows from their final statistics.

  norm = (m_l, 1 / s_l, m_t, 1 / s_t, has_target): exp(x - m) / s rather than exp(x - LSE), whose rounding near a
  large max (t up to 1 / tau_s) would cost G digits."""
  m_l, r_l, m_t, r_t, has_target = (x[:, None] for x in norm)
  return jnp.where(has_target, jnp.exp(l - m_l) * r_l - jnp.exp(t - m_t) * r_t, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise_sum(cfg, zr, zc, scale, graph, offset):
  out, _ = _sweep(cfg, zr, zc, scale, graph, offset, with_grad=False)
  return out


def _blockwise_fwd(cfg, zr, zc, scale, graph, offset):
  out, grads = _sweep(cfg, zr, zc, scale, graph, offset, with_grad=True)
  return out, grads


def _blockwise_bwd(cfg, grads, cotangents):
  dzr, dzc, dscale = grads
  zr_dtype, zc_dtype = cfg[4], cfg[5]
  g = cotangents[0]  # the count output is not differentiable
  # None: the graph and the row offset get no gradient (and no zero buffers are made for them).
  return (g * dzr).astype(zr_dtype), (g * dzc).astype(zc_dtype), g * dscale, None, None


_blockwise_sum.defvjp(_blockwise_fwd, _blockwise_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sym_sum(cfg, z, scale, graph):
  out, _ = _sym_sweep(cfg, z, scale, graph, with_grad=False)
  return out


def _sym_fwd(cfg, z, scale, graph):
  return _sym_sweep(cfg, z, scale, graph, with_grad=True)


def _sym_bwd(cfg, grads, cotangents):
  dz, dscale = grads
  g = cotangents[0]
  return (g * dz).astype(cfg[3]), g * dscale, None


_sym_sum.defvjp(_sym_fwd, _sym_bwd)

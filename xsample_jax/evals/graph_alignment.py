"""How well the learned similarities reproduce the target graph, on held-out rows.

For learned embeddings z (projection outputs) and the frozen caption embeddings c of the same rows, the rows
are cut into consecutive batches of `batch_size` (the graph of docs/method.md is defined within a batch). In
each batch, with l_ij = cos(z_i, z_j) and s_ij = cos(c_i, c_j):

  spearman: the Spearman rank correlation of l and s over the off-diagonal pairs, i.e. the Pearson correlation
    of their ranks, tied values sharing their average rank (captions repeat, so s has large ties). Both are
    symmetric, so the pairs i < j give the same value as all i != j.
  kl: KL(G_i || P_i) averaged over the rows i, with the target and model distributions of the loss,
    G_ij = softmax_{j != i}(s_ij / target_temperature), P_ij = softmax_{j != i}(l_ij / temperature).

Both are then averaged over the batches, each weighted by its number of rows (the plain mean when all batches
are full). A tail of fewer than `batch_size` rows is kept as a smaller batch when it has at least 2 rows and
dropped when it has 1 (a single row has no pair). A batch whose l or s is constant has no ranking to correlate:
it is left out of the Spearman mean (the KL still counts it), and spearman is NaN when no batch has one.
spearman = 1 when the learned cosines order the pairs as the graph does, whatever their scale; kl = 0 when they
also match it through the temperatures. z = c with equal temperatures gives both exactly.

Everything is computed on the host in float64. Rows of z (or of c) whose unit vectors round to the same float32
vector are given bit-identical similarities, exactly 1 between themselves, so that repeated captions are exact
ties whatever order the matmul sums in.

    graph_alignment.run(z, c)    # {"spearman": ..., "kl": ...}
"""
from __future__ import annotations

import math

import numpy as np


def run(z, c, *, batch_size: int = 256, temperature: float = 0.1, target_temperature: float = 0.1) -> dict:
  """{"spearman", "kl"} of [n, D] learned embeddings z against the graph of [n, E] caption embeddings c."""
  z, c = _check(z, "z"), _check(c, "c")
  if len(z) != len(c):
    raise ValueError(f"z and c have different lengths: {len(z)} vs {len(c)} rows")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 2:
    raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
  for name, t in (("temperature", temperature), ("target_temperature", target_temperature)):
    if not (t > 0 and math.isfinite(t)):
      raise ValueError(f"{name} must be a finite value > 0, got {t}")
  n = len(z)
  if n < 2:
    raise ValueError(f"need at least 2 rows to form a pair, got {n}")

  kl_sum = sp_sum = sp_rows = 0.0
  kept = 0
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    if stop - start < 2:
      break  # a one-row tail: no pairs
    l, s = _cosines(z[start:stop]), _cosines(c[start:stop])
    rows = stop - start
    kept += rows
    kl_sum += rows * _kl(s / target_temperature, l / temperature)
    iu = np.triu_indices(rows, k=1)
    rho = _pearson(_average_ranks(l[iu]), _average_ranks(s[iu]))
    if not math.isnan(rho):
      sp_sum += rows * rho
      sp_rows += rows
  return {"spearman": float(sp_sum / sp_rows) if sp_rows else math.nan, "kl": float(kl_sum / kept)}


SETTINGS = dict(batch_size=256)


def evaluator(data, settings) -> dict:
  """The evaluator entry: held-out rows of data.eval (`data.test(settings)`), their projections against their
  caption embeddings, at the run's temperatures; settings.batch_size rows per graph (default 256)."""
  rows = data.test(settings)
  loss = data.config.loss
  return run(rows["projections"], rows["caption_emb"], batch_size=settings.batch_size,
             temperature=loss.temperature, target_temperature=loss.target_temperature)


def _check(x, name):
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[1] == 0:
    raise ValueError(f"{name} must be [n, D] with D > 0, got shape {x.shape}")
  # bfloat16 (JAX's, from ml_dtypes) is not a NumPy floating kind but converts exactly.
  if x.dtype.kind not in "fiu" and x.dtype.name != "bfloat16":
    raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf")
  zero = np.flatnonzero(~np.any(x != 0, axis=1))
  if len(zero):
    raise ValueError(f"{name} has a zero row (row {zero[0]}): its cosine similarity is undefined")
  return x


def _cosines(x):
  """[m, m] cosine similarities, rows of one direction counted as one row.

  Rows whose unit vectors round to the same float32 vector (a repeated caption) share one representative:
  their similarities to any row are bit-identical and to each other exactly 1. Left to the matmul's rounding,
  cos(x, x) is 1 +- a few ulps, differently for each caption, which would split the ties a rank correlation
  must see.
  """
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  _, first, inv = np.unique(unit.astype(np.float32), axis=0, return_index=True, return_inverse=True)
  rep = unit[first]
  gram = np.clip(rep @ rep.T, -1.0, 1.0)
  np.fill_diagonal(gram, 1.0)
  inv = inv.reshape(-1)
  return gram[np.ix_(inv, inv)]


def _kl(t, l):
  """mean_i KL(softmax_{j != i} t_i || softmax_{j != i} l_i), the self pair left out of both."""
  diag = np.eye(len(t), dtype=bool)
  log_g, log_p = _log_softmax(np.where(diag, -np.inf, t)), _log_softmax(np.where(diag, -np.inf, l))
  # On the diagonal G = 0 and both logs are -inf: zero the logs there so the term is 0 * 0, not 0 * NaN.
  log_g, log_p = np.where(diag, 0.0, log_g), np.where(diag, 0.0, log_p)
  g = np.where(diag, 0.0, np.exp(log_g))
  return float(np.mean(np.sum(g * (log_g - log_p), axis=1)))


def _log_softmax(x):
  m = np.max(x, axis=1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))


def _average_ranks(a):
  """1-based ranks of a's values; a run of equal values shares the mean of the ranks it spans."""
  order = np.argsort(a, kind="stable")
  sorted_a = a[order]
  starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
  ends = np.r_[starts[1:], len(a)]
  ranks = np.empty(len(a))
  ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
  return ranks


def _pearson(a, b):
  a, b = a - a.mean(), b - b.mean()
  den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
  return float(np.dot(a, b)) / den if den > 0 else math.nan

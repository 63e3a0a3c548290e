"""Figures of one run for notebooks/inspect_run.ipynb: training curves, the latest evaluations, the target graph
against the learned one, nearest neighbours and 2-D projections coloured by a factor.

Every figure is a `matplotlib.figure.Figure` made without pyplot, so nothing depends on a GUI backend or global
figure state (a notebook shows it after `%matplotlib inline`; elsewhere `fig.savefig(path)`). The array helpers
(`target_graph`, `learned_graph`, `nearest_neighbours`, `pca_2d`) are plain NumPy in float64.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath
from matplotlib.figure import Figure

CURVES = ("loss", "lr", "grad_norm", "images_per_sec")
MAX_LEGEND = 10  # the colour cycle's colours; more classes get a colour bar instead of a legend


# ----------------------------------------------------------------------------------------------------------
# Metrics.


def read_metrics(workdir) -> list[dict]:
  """The rows of DIR/metrics.jsonl in file order. A torn last line (a run killed mid-write) is skipped; a bad line
  before it is an error, since the trainer never leaves one there."""
  lines = (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except ValueError as e:
      if i == len(lines) - 1:
        break
      raise ValueError(f"{workdir}/metrics.jsonl line {i + 1} is not JSON: {e}") from e
  return rows


def metric_series(rows, key) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that have `key` (images_per_sec is only logged at log steps, evals apart)."""
  pairs = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
  steps, values = zip(*pairs) if pairs else ((), ())
  return np.asarray(steps, np.int64), np.asarray(values, np.float64)


def training_curves(rows, keys=CURVES) -> Figure:
  """One panel per metric of `keys` present in `rows`, against step."""
  series = {k: metric_series(rows, k) for k in keys}
  series = {k: v for k, v in series.items() if len(v[0])}
  fig = Figure(figsize=(4 * max(len(series), 1), 3), layout="constrained")
  if not series:
    fig.text(0.5, 0.5, "no training metrics", ha="center", va="center")
    return fig
  for ax, (key, (steps, values)) in zip(fig.subplots(1, len(series), squeeze=False)[0], series.items()):
    ax.plot(steps, values)
    ax.set(title=key, xlabel="step")
    ax.grid(alpha=0.3)
  return fig


def eval_table(rows) -> list[tuple[str, int, float]]:
  """(metric, step, value) of every eval/NAME/METRIC at its latest step, sorted by metric; of two rows at the same
  step (a checkpoint evaluated again) the later one in the file."""
  latest = {}
  for r in rows:
    for k, v in r.items():
      if k.startswith("eval/") and (k not in latest or r["step"] >= latest[k][0]):
        latest[k] = (int(r["step"]), float(v))
  return [(k, step, v) for k, (step, v) in sorted(latest.items())]


def eval_text(rows) -> str:
  """eval_table as aligned text."""
  table = eval_table(rows)
  if not table:
    return "no evaluations logged"
  width = max(len(k) for k, _, _ in table)
  return "\n".join([f"{'metric':<{width}}  {'step':>7}  value"]
                   + [f"{k:<{width}}  {step:>7}  {v:.4f}" for k, step, v in table])


# ----------------------------------------------------------------------------------------------------------
# Graphs: the loss's target G and the model's P on the same rows.


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _softmax_without_self(logits):
  """Row softmax over j != i; the diagonal is exactly 0 and every row sums to 1."""
  logits = np.where(np.eye(len(logits), dtype=bool), -np.inf, logits)
  e = np.exp(logits - np.max(logits, axis=1, keepdims=True))
  return e / np.sum(e, axis=1, keepdims=True)


def target_graph(c, target_temperature) -> np.ndarray:
  """[n, n] G_ij = softmax_{j != i}(s_ij / tau_s), the X-CLR target of docs/method.md. `c`: [n, E] caption (or
  class-name) embeddings, s their cosines; or [n] int labels, s_ij = [y_i == y_j]."""
  c = np.asarray(c)
  if c.ndim == 1:
    s = (c[:, None] == c[None, :]).astype(np.float64)
  else:
    u = _unit(c)
    s = u @ u.T
  if len(s) < 2:
    raise ValueError(f"a graph needs at least 2 rows, got {len(s)}")
  return _softmax_without_self(s / target_temperature)


def learned_graph(z, temperature) -> np.ndarray:
  """[n, n] P_ij = softmax_{j != i}(cos(z_i, z_j) / tau), the model's distribution in the loss."""
  u = _unit(z)
  if len(u) < 2:
    raise ValueError(f"a graph needs at least 2 rows, got {len(u)}")
  return _softmax_without_self(u @ u.T / temperature)


def graph_vs_learned(target, learned, titles=("target graph G", "learned P"), group=None) -> Figure:
  """The two [n, n] graphs side by side on one colour scale. `group`: optional [n] labels; rows and columns are
  then sorted by them so that each class is a block on the diagonal."""
  target, learned = np.asarray(target), np.asarray(learned)
  if group is not None:
    order = np.argsort(np.asarray(group), kind="stable")
    target, learned = target[np.ix_(order, order)], learned[np.ix_(order, order)]
  vmax = max(float(target.max()), float(learned.max()))  # one scale: a flatter P shows as paler
  fig = Figure(figsize=(9, 4), layout="constrained")
  axes = fig.subplots(1, 2)
  for ax, g, title in zip(axes, (target, learned), titles):
    im = ax.imshow(g, vmin=0.0, vmax=vmax, cmap="viridis", interpolation="nearest")
    ax.set(title=title, xlabel="j", ylabel="i")
  fig.colorbar(im, ax=axes, shrink=0.8)
  return fig


# ----------------------------------------------------------------------------------------------------------
# Neighbours.


def nearest_neighbours(features, queries, k) -> np.ndarray:
  """[len(queries), k] indices of the k rows of `features` with the highest cosine to each query row (the query
  itself left out), most similar first; ties go to the lower index."""
  u = _unit(features)
  queries = np.asarray(queries, np.int64)
  if not 1 <= k < len(u):
    raise ValueError(f"k must be in [1, {len(u) - 1}] for {len(u)} rows, got {k}")
  sim = u[queries] @ u.T
  sim[np.arange(len(queries)), queries] = -np.inf
  return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def neighbour_grid(images, query_indices, features, k=8) -> Figure:
  """One row per query: the query image, then its k nearest neighbours in `features`, titled with their cosine.
  `images[i]` is the HxWx3 image of features row i."""
  u = _unit(features)
  nn = nearest_neighbours(features, query_indices, k)
  fig = Figure(figsize=(1.3 * (k + 1), 1.4 * len(nn)), layout="constrained")
  axes = fig.subplots(len(nn), k + 1, squeeze=False)
  for row, (q, neighbours) in enumerate(zip(query_indices, nn)):
    for col, i in enumerate([q, *neighbours]):
      ax = axes[row, col]
      ax.imshow(np.asarray(images[i]))
      ax.set_xticks([])
      ax.set_yticks([])
      ax.set_title(f"query {q}" if col == 0 else f"{float(u[q] @ u[i]):.2f}", fontsize=8)
  return fig


# ----------------------------------------------------------------------------------------------------------
# Projections.


def pca_2d(x) -> np.ndarray:
  """[n, 2] coordinates of the centred rows on their two principal axes (SVD). Each axis's sign makes its largest
  coordinate positive, so the result does not depend on the SVD's sign choice; missing axes (rank < 2) are 0."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  x = x - x.mean(axis=0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  xy = np.zeros((len(x), 2))
  r = min(2, len(s))
  xy[:, :r] = u[:, :r] * s[:r]
  rank = int(np.sum(s > s[0] * 1e-10)) if len(s) and s[0] > 0 else 0
  xy[:, rank:] = 0.0  # an axis of rounding noise is no axis
  for a in range(2):
    i = np.argmax(np.abs(xy[:, a]))
    if xy[i, a] < 0:
      xy[:, a] = -xy[:, a]
  return xy


def _scatter(ax, xy, labels, title):
  labels = np.asarray(labels)
  values = np.unique(labels)
  ax.set_title(title)
  ax.set_xticks([])
  ax.set_yticks([])
  if len(values) <= MAX_LEGEND:
    for n, v in enumerate(values):
      m = labels == v
      ax.scatter(xy[m, 0], xy[m, 1], s=10, color=f"C{n % 10}", label=str(v))
    ax.legend(fontsize=7, markerscale=1.5, loc="best", frameon=False)
  else:
    sc = ax.scatter(xy[:, 0], xy[:, 1], s=10, c=labels, cmap="turbo")
    ax.figure.colorbar(sc, ax=ax)


def projection_2d(x, labels, title="") -> Figure:
  """A scatter of pca_2d(x) coloured by `labels` ([n] ints: a class, an attribute, a background)."""
  fig = Figure(figsize=(4.5, 4), layout="constrained")
  _scatter(fig.subplots(), pca_2d(x), labels, title)
  return fig


def int_factors(data, max_values=64) -> list[str]:
  """The names of the [n] integer fields of an extract (label, attribute, background, ...) that make a colouring:
  not ids, and at most `max_values` distinct values."""
  return [k for k, v in data.items()
          if k != "id" and not k.endswith("_id") and np.ndim(v) == 1 and np.asarray(v).dtype.kind in "iu"
          and len(np.unique(v)) <= max_values]


def factor_projections(x, data, title="") -> Figure:
  """pca_2d(x) once, one panel per factor of int_factors(data)."""
  names = int_factors(data)
  xy = pca_2d(x)
  fig = Figure(figsize=(4.5 * max(len(names), 1), 4), layout="constrained")
  if title:
    fig.suptitle(title)
  if not names:
    _scatter(fig.subplots(), xy, np.zeros(len(xy), np.int64), "no integer factor")
    return fig
  for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
    _scatter(ax, xy, data[name], name)
  return fig

"""The notebook's helpers on small arrays with known answers; every figure renders headless."""
import io
import json
import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from xsample_jax import plots


def rendered(fig):
  """The figure drawn to PNG bytes (fails if anything in it cannot be drawn)."""
  assert isinstance(fig, Figure)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def write_metrics(path, rows, tail=""):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


ROWS = [
    {"step": 1, "loss": 5.0, "lr": 0.0, "grad_norm": 2.0, "temperature": 0.1},
    {"step": 2, "loss": 4.0, "lr": 0.5, "grad_norm": 1.5, "temperature": 0.1, "images_per_sec": 100.0},
    {"step": 3, "loss": 3.5, "lr": 1.0, "grad_norm": 1.0, "temperature": 0.1},
    {"step": 4, "loss": 3.0, "lr": 0.5, "grad_norm": 0.5, "temperature": 0.1, "images_per_sec": 120.0},
    {"step": 4, "eval/linear_probe/top1": 0.5, "eval/linear_probe/top5": 0.9},
]


def test_read_metrics_skips_a_torn_last_line(tmp_path):
  write_metrics(tmp_path / "metrics.jsonl", ROWS, tail='{"step": 5, "loss": 2.')
  assert plots.read_metrics(tmp_path) == ROWS
  assert plots.read_metrics(str(tmp_path)) == ROWS


def test_read_metrics_rejects_a_bad_line_before_the_last(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
  with pytest.raises(ValueError, match="line 1 is not JSON"):
    plots.read_metrics(tmp_path)


def test_training_curves_one_line_per_metric_against_step():
  fig = plots.training_curves(ROWS)
  axes = fig.axes
  assert [ax.get_title() for ax in axes] == ["loss", "lr", "grad_norm", "images_per_sec"]
  want = {"loss": ([1, 2, 3, 4], [5.0, 4.0, 3.5, 3.0]), "lr": ([1, 2, 3, 4], [0.0, 0.5, 1.0, 0.5]),
          "grad_norm": ([1, 2, 3, 4], [2.0, 1.5, 1.0, 0.5]), "images_per_sec": ([2, 4], [100.0, 120.0])}
  for ax in axes:
    (line,) = ax.get_lines()
    steps, values = want[ax.get_title()]
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_array_equal(line.get_ydata(), values)
  assert rendered(fig)


def test_training_curves_leave_out_metrics_never_logged():
  fig = plots.training_curves([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
  assert [ax.get_title() for ax in fig.axes] == ["loss"]
  assert rendered(plots.training_curves([]))


def test_eval_table_keeps_the_latest_value_of_each_metric():
  rows = [*ROWS, {"step": 4, "eval/linear_probe/top1": 0.55},  # the same checkpoint evaluated again
          {"step": 2, "eval/knn/top1": 0.3}, {"step": 1, "eval/knn/top1": 0.2}]
  assert plots.eval_table(rows) == [("eval/knn/top1", 2, 0.3), ("eval/linear_probe/top1", 4, 0.55),
                                    ("eval/linear_probe/top5", 4, 0.9)]
  text = plots.eval_text(rows).splitlines()
  assert text[1].split() == ["eval/knn/top1", "2", "0.3000"] and len(text) == 4
  assert plots.eval_text(ROWS[:2]) == "no evaluations logged"


def test_target_graph_is_the_row_softmax_without_self():
  c = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])  # unit cosines: 1/sqrt2 (0,1), 0 (0,2), 1/sqrt2 (1,2)
  tau = 0.5
  g = plots.target_graph(c, tau)
  r = math.sqrt(0.5) / tau
  e = math.exp(r)
  want = np.array([[0, e / (e + 1), 1 / (e + 1)], [0.5, 0, 0.5], [1 / (e + 1), e / (e + 1), 0]])
  np.testing.assert_allclose(g, want, rtol=1e-12)
  np.testing.assert_array_equal(np.diag(g), 0.0)
  np.testing.assert_allclose(g.sum(axis=1), 1.0, rtol=1e-12)


def test_target_graph_of_labels_spreads_over_the_same_class():
  g = plots.target_graph(np.array([0, 0, 1, 1, 1]), 1e-3)  # tau_s -> 0: uniform over the other rows of the class
  np.testing.assert_allclose(g[0], [0, 1, 0, 0, 0], atol=1e-12)
  np.testing.assert_allclose(g[2], [0, 0, 0, 0.5, 0.5], atol=1e-12)


def test_learned_graph_uses_cosines_and_excludes_self():
  z = np.array([[3.0, 0.0], [0.0, 0.1], [-2.0, 0.0]])  # cosines 0 (0,1), -1 (0,2), 0 (1,2): the scale is ignored
  p = plots.learned_graph(z, 1.0)
  e = math.exp(-1.0)
  np.testing.assert_allclose(p[0], [0, 1 / (1 + e), e / (1 + e)], rtol=1e-12)
  np.testing.assert_allclose(p[1], [0.5, 0, 0.5], rtol=1e-12)
  np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
  # z = c and equal temperatures: the model reproduces the graph exactly.
  c = np.random.default_rng(0).normal(size=(6, 4))
  np.testing.assert_allclose(plots.learned_graph(c, 0.2), plots.target_graph(c, 0.2), rtol=1e-12)


def test_graph_vs_learned_sorts_rows_and_columns_by_group():
  g = np.arange(9.0).reshape(3, 3)
  fig = plots.graph_vs_learned(g, g / 2, group=[2, 0, 1])
  left, right = (ax.get_images()[0].get_array() for ax in fig.axes[:2])
  order = [1, 2, 0]
  np.testing.assert_array_equal(left, g[np.ix_(order, order)])
  np.testing.assert_array_equal(right, g[np.ix_(order, order)] / 2)
  assert [ax.get_title() for ax in fig.axes[:2]] == ["target graph G", "learned P"]
  assert rendered(fig)


def test_nearest_neighbours_by_cosine_without_the_query():
  angles = np.radians([0, 10, 30, 100, 185, 350])
  features = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1], [5], [0.1], [2], [1], [3]])
  nn = plots.nearest_neighbours(features, [0, 3], 3)
  np.testing.assert_array_equal(nn, [[1, 5, 2], [2, 4, 1]])  # angular distances 10, 10, 30; 70, 85, 90
  with pytest.raises(ValueError, match="k must be in"):
    plots.nearest_neighbours(features, [0], 6)


def test_neighbour_grid_shows_the_query_then_its_neighbours():
  angles = np.radians([0, 10, 30, 100, 185, 350])
  features = np.stack([np.cos(angles), np.sin(angles)], 1)
  images = [np.full((4, 4, 3), 40 * i, np.uint8) for i in range(6)]  # image i is uniformly 40 * i
  fig = plots.neighbour_grid(images, [0, 3], features, k=3)
  assert len(fig.axes) == 2 * 4
  shown = [int(ax.get_images()[0].get_array()[0, 0, 0]) // 40 for ax in fig.axes]
  assert shown == [0, 1, 5, 2, 3, 2, 4, 1]
  assert fig.axes[0].get_title() == "query 0" and fig.axes[1].get_title() == "0.98"  # cos 10 degrees
  assert rendered(fig)


def test_pca_2d_of_points_on_a_line_has_one_nonzero_coordinate():
  t = np.array([-2.0, -1.0, 0.5, 3.0])
  direction = np.array([1.0, 2.0, -2.0]) / 3.0
  xy = plots.pca_2d(5.0 + t[:, None] * direction)
  np.testing.assert_allclose(xy[:, 0], t - t.mean(), atol=1e-12)  # the largest coordinate is positive
  np.testing.assert_array_equal(xy[:, 1], 0.0)


def test_pca_2d_finds_the_two_axes_of_largest_variance():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 3)) * [0.1, 10.0, 3.0]
  xy = plots.pca_2d(x)
  centred = x - x.mean(0)
  np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 0], centred[:, 1])[0, 1]), 1.0, atol=1e-3)
  np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 1], centred[:, 2])[0, 1]), 1.0, atol=1e-2)
  np.testing.assert_allclose(xy.T @ xy, np.diag(np.diag(xy.T @ xy)), atol=1e-8)  # uncorrelated axes


def test_projection_2d_colours_each_label():
  x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
  fig = plots.projection_2d(x, [0, 0, 1, 2], "shape")
  (ax,) = [a for a in fig.axes if a.get_title() == "shape"]
  assert [len(c.get_offsets()) for c in ax.collections] == [2, 1, 1]
  np.testing.assert_allclose(np.concatenate([c.get_offsets() for c in ax.collections]), plots.pca_2d(x))
  assert rendered(fig)
  assert rendered(plots.projection_2d(np.random.default_rng(0).normal(size=(40, 3)), np.arange(40)))  # colour bar


def test_factor_projections_one_panel_per_integer_factor():
  rng = np.random.default_rng(0)
  data = {"features": rng.normal(size=(20, 5)), "caption_emb": rng.normal(size=(20, 4)),
          "label": rng.integers(0, 3, 20), "attribute": rng.integers(0, 4, 20), "id": np.arange(20),
          "caption_id": np.arange(20), "background": np.zeros(20, np.int32)}
  assert plots.int_factors(data) == ["label", "attribute", "background"]
  fig = plots.factor_projections(data["features"], data, "backbone")
  assert [ax.get_title() for ax in fig.axes] == ["label", "attribute", "background"]
  assert rendered(fig)

"""Weighted k-nearest-neighbour classifier on frozen features (the InstDisc / DINO k-NN evaluator), on device.

Rows are L2-normalised, so similarity is cosine. For a test row q with s_j = <q, x_j>, and N_k(q) its k most
similar training rows,

    votes(q)[c] = sum over j in N_k(q) with y_j = c of exp(s_j / temperature)

and the prediction is the class with the most votes; top-5 ranks the classes by their vote totals. A row counts
as correct at r when fewer than r other classes have at least its label's total (ties count against it, as in
linear_probe), so a label with no votes is never right even when fewer than r classes got any.

The [n_test, n_train] similarity matrix never exists whole (ImageNet: 50k x 1.28M): test rows go through in
blocks of `batch_size`, each block one jitted call that keeps only its rows' k best neighbours. With a mesh, the
training rows are split over the 'data' axis (padded to a multiple of its size with label -1); each block is
replicated, every device takes the top k of its own rows, and the k best of the n_data * k gathered candidates
are kept. Per device that is a [batch_size, N / n_data] block of similarities at a time.

Rows with a label < 0 are padding: a training row never becomes a neighbour, a test row is not counted.

    knn.run(train_x, train_y, test_x, test_y, 1000, mesh=mesh)     # {"top1": ..., "top5": ...}
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from xsample_jax.evals.linear_probe import _check_xy, _put
from xsample_jax.sharding import DATA

K = 20
TEMPERATURE = 0.07
BATCH_SIZE = 256
# Full f32 similarities: bf16 passes (TPU default) or TF32 (GPU) would reorder near neighbours, so the result
# would depend on the backend and on how the training rows are split.
_HIGHEST = jax.lax.Precision.HIGHEST


SETTINGS = dict(k=20, temperature=0.07)


def evaluator(data, settings) -> dict:
  """The evaluator entry: neighbours among data.train's rows for data.eval's (see evals/__init__.py); settings
  k (20) and temperature (0.07), label (the int field to predict, "label")."""
  tr, te, label, n = data.classification(settings)
  return run(tr["features"], tr[label], te["features"], te[label], n, k=settings.k,
             temperature=settings.temperature, mesh=data.mesh)


def run(train_x, train_y, test_x, test_y, num_classes: int, *, k: int = K, temperature: float = TEMPERATURE,
        mesh: Mesh | None = None, batch_size: int = BATCH_SIZE) -> dict:
  """{"top1": ..., "top5": ...} (top5 only when num_classes > 5) over the test rows with a label >= 0.

  k larger than the number of labelled training rows is an error rather than clamped: every test row would
  then get the same neighbours, which is not the evaluator that was asked for.
  """
  x, y = _check_xy(train_x, train_y, num_classes, "train")
  tx, ty = _check_xy(test_x, test_y, num_classes, "test")
  if tx.shape[1] != x.shape[1]:
    raise ValueError(f"test features have dim {tx.shape[1]} but the train features have dim {x.shape[1]}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be an int >= 1, got {k!r}")
  if not (temperature > 0 and math.isfinite(temperature)):
    raise ValueError(f"temperature must be a finite value > 0, got {temperature}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  n_train = int(np.sum(y >= 0))
  if n_train == 0:
    raise ValueError("the train set is empty: no rows with a label >= 0")
  if k > n_train:
    raise ValueError(f"k={k} is more than the {n_train} labelled training rows")
  if not (ty >= 0).any():
    raise ValueError("the test set is empty: no rows with a label >= 0")

  xd, yd, _, rep = _put(x, y, mesh)
  xd, bad = _normalise(xd, yd >= 0)
  if int(bad):
    raise ValueError("the train features contain NaN or inf")
  # One block size for every call (the last block padded with label -1), so the block compiles once.
  b = min(int(batch_size), len(tx))
  totals = jnp.zeros(4, jnp.int32)
  for start in range(0, len(tx), b):
    qx, qy = tx[start:start + b], ty[start:start + b]
    if len(qx) < b:
      qx = np.concatenate([qx, np.zeros((b - len(qx), qx.shape[1]), qx.dtype)])
      qy = np.concatenate([qy, np.full(b - len(qy), -1, np.int32)])
    q = jax.device_put((qx.astype(np.float32), qy), rep)
    # Summed on device: no host sync per block, so the host queues the next block while this one runs.
    totals = totals + _block(xd, yd, *q, jnp.float32(1 / temperature), k=int(k), num_classes=int(num_classes),
                             mesh=mesh)
  top1, top5, n, bad = (int(v) for v in totals)
  if bad:
    raise ValueError(f"the test features contain NaN or inf ({bad} labelled rows)")
  out = {"top1": top1 / n}
  if num_classes > 5:
    out["top5"] = top5 / n
  return out


# ------------------------------------------------------------------------------------------------------------
# Device side (jit).


def _unit_rows(x, valid):
  # Padding rows become 0 (a NaN there must not reach a max or a sum); a zero row stays 0 rather than NaN.
  x = jnp.where(valid[:, None], x, 0.0)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12), jnp.sum(valid & ~jnp.all(jnp.isfinite(x), axis=1))


_normalise = jax.jit(_unit_rows)


def _local_top_k(q, x, y, k):
  """The k largest similarities of q's rows to x's rows, and those rows' labels (padding rows: -inf)."""
  s = jnp.dot(q, x.T, precision=_HIGHEST)
  s = jnp.where(y[None, :] >= 0, s, -jnp.inf)
  s, idx = jax.lax.top_k(s, min(k, x.shape[0]))
  return s, y[idx]


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "mesh"))
def _block(x, y, qx, qy, inv_t, *, k, num_classes, mesh):
  """[correct at 1, correct at 5, counted rows, non-finite counted rows] of one block of test rows."""
  valid = qy >= 0
  q, bad = _unit_rows(qx, valid)
  if mesh is None:
    s, labels = _local_top_k(q, x, y, k)
  else:
    # Each device's candidates come back side by side ([B, n_data * k_local], split over 'data'); the top_k
    # below is over all of them, for which XLA gathers the candidates, not the training rows.
    local = functools.partial(_local_top_k, k=k)
    cols = P(None, DATA)
    s, labels = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(DATA), P(DATA)), out_specs=(cols, cols))(q, x, y)
    s, pos = jax.lax.top_k(s, k)
    labels = jnp.take_along_axis(labels, pos, axis=1)
  # Weights relative to the nearest neighbour's: the same ranking as exp(s / T) without overflow at small T.
  # Padding neighbours (only possible when a device holds fewer than k labelled rows) weigh exp(-inf) = 0.
  w = jnp.exp((s - s[:, :1]) * inv_t)
  votes = jnp.einsum("bk,bkc->bc", w, jax.nn.one_hot(labels, num_classes, dtype=w.dtype), precision=_HIGHEST)
  true = jnp.take_along_axis(votes, jnp.maximum(qy, 0)[:, None], axis=1)
  rank = jnp.sum(~(votes < true), axis=1) - 1
  return jnp.stack([jnp.sum(valid & (rank < 1)), jnp.sum(valid & (rank < 5)), jnp.sum(valid),
                    bad]).astype(jnp.int32)

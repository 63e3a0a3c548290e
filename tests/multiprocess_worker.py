"""One process of a real multi-process run, started by tests/test_multiprocess.py through launch/local.sh:

  ENTRY=tests.multiprocess_worker launch/local.sh 2 4 -- OUT_DIR FOLDER

Joins the others with jax.distributed, then writes OUT_DIR/process_I.npz:
  local_train_ids     the ids of the images this process read in one epoch of the training pipeline;
  train_{field}       the global training batches (as assembled by make_array_from_process_local_data, gathered);
  eval_{field}        the same for the evaluation pipeline;
  table               the class-name caption table of folder:FOLDER, cached by process 0 first.
and appends "I" to OUT_DIR/order when its turn in `_process_zero_first` comes.
"""
import sys

import numpy as np

from xsample_jax import cli

TRAIN_EXAMPLES, BATCH = 40, 8  # one epoch = 5 global batches
EVAL_EXAMPLES, EVAL_BATCH = 21, 8  # 3 global batches, the last padded


def train_batches(mesh, process_index=None, process_count=None):
  from xsample_jax.data import augment, pipeline, sources
  src = sources.procedural_source("train", TRAIN_EXAMPLES, image_size=24)
  return pipeline.train_dataset(src, global_batch_size=BATCH, augment=augment.SimCLRAugment(size=16), seed=5,
                                num_epochs=1, mesh=mesh, process_index=process_index, process_count=process_count)


def eval_batches(mesh):
  from xsample_jax.data import pipeline, sources
  src = sources.procedural_source("original", EVAL_EXAMPLES, image_size=24)
  return pipeline.eval_dataset(src, global_batch_size=EVAL_BATCH, image_size=16, mesh=mesh)


def main(out_dir: str, folder: str):
  cli.init_distributed("auto", coordinator_timeout_s=120, heartbeat_timeout_s=30)
  import jax
  from etils import epath
  from jax.experimental import multihost_utils

  from configs import smoke
  from xsample_jax import sharding, train

  mesh = sharding.make_mesh()
  i = jax.process_index()
  out = {"local_train_ids": np.concatenate([b["id"] for b in train_batches(None)])}

  def gathered(batches, prefix):
    rows = [{k: multihost_utils.process_allgather(v, tiled=True) for k, v in b.items()} for b in batches]
    out.update({f"{prefix}_{k}": np.stack([r[k] for r in rows]) for k in rows[0]})

  gathered(train_batches(mesh), "train")
  gathered(eval_batches(mesh), "eval")

  def take_turn():
    order = epath.Path(out_dir) / "order"
    order.write_text((order.read_text() if order.exists() else "") + f"{i}\n")

  train._process_zero_first(take_turn, "turns")
  config = smoke.get_config()
  with config.unlocked():
    config.data.cache_dir = str(epath.Path(out_dir) / "cache")
  out["table"] = train.get_source(config, f"folder:{folder}", "train").table
  np.savez(epath.Path(out_dir) / f"process_{i}.npz", **out)


if __name__ == "__main__":
  main(*sys.argv[1:])

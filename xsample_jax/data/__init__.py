"""Input pipelines (grain, no TensorFlow): files on disk -> global batch on the mesh.

  sources.py     random-access sources: TFDS label datasets, caption shards, the procedural default; `get_source`
  procedural.py  the embedded procedural captioned-image dataset (ImageNet-9-style background splits)
  shards.py      the ArrayRecord caption-shard record format (written by tools/make_shards.py)
  augment.py     SimCLR two-view augmentations and the evaluation transform (NumPy/OpenCV, in grain workers)
  pipeline.py    `train_dataset` / `eval_dataset`: slicing, shuffling, views, batching, bad-record skips, global arrays

Nothing is imported here, so grain's worker processes load only what a pipeline uses.
"""

"""Failure modes of caption shards: crashed --overwrite runs, bad bytes in records, huge ids, incomplete
directories, mismatched --embeddings, decompression bombs, and the caption encoder's identity in the manifest."""
import os

import numpy as np
import pytest

from xsample_jax.data import shards
from xsample_jax.tools import make_shards as ms
from tests.helpers import bow_embed
from tests.test_data_shards import corrupt_inputs  # noqa: F401 (a fixture)


def _claimed(out):
  """The records manifest.json claims, read back from the shards it lists; each must be there, whole."""
  m = shards.read_manifest(out)
  paths = [os.path.join(out, n) for n in m["shards"]]
  assert all(os.path.isfile(p) for p in paths), (m["shards"], sorted(os.listdir(out)))
  if not paths:
    return m, []
  src = shards.ArrayRecordDataSource(paths)
  assert len(src) == m["written"]
  return m, [shards.decode_record(src[i]) for i in range(len(src))]


def _dying(after_calls):
  calls = []

  def embed(texts):
    calls.append(len(texts))
    if len(calls) > after_calls:
      raise RuntimeError("the encoder died")
    return bow_embed(texts)
  return embed


def test_a_crashed_overwrite_never_leaves_a_manifest_claiming_missing_records(tmp_path, corrupt_inputs):  # noqa: F811
  inputs, good, _ = corrupt_inputs
  ref = ms.make_shards(inputs, str(tmp_path / "ref"), embed_fn=bow_embed, records_per_shard=5, progress=False)
  out = str(tmp_path / "out")
  assert ms.make_shards(inputs, out, embed_fn=bow_embed, records_per_shard=4, progress=False)["complete"]
  for calls in range(5):  # die before, inside and after the first shard of the new run
    with pytest.raises(RuntimeError, match="encoder died"):
      ms.make_shards(inputs, out, embed_fn=_dying(calls), records_per_shard=5, batch_size=2, overwrite=True,
                     progress=False)
    m, records = _claimed(out)
    assert not m["complete"], calls
    assert [r["key"] for r in records] == list(good)[:len(records)]
  resumed = ms.make_shards(inputs, out, embed_fn=bow_embed, records_per_shard=5, batch_size=2, progress=False)
  for k in ("complete", "written", "skipped", "skipped_items", "shards"):
    assert resumed[k] == ref[k], k
  m, records = _claimed(out)
  assert [r["key"] for r in records] == list(good)
  assert sorted(f for f in os.listdir(out) if f != "manifest.json") == ref["shards"]  # no stale or partial files

"""grain pipelines: a source (sources.py) -> per-process share of each global batch -> decode + augment -> batch -> global jax.Array.

Training batch (`train_dataset`), for a global batch of B images over P processes (b = B / P images per process):
  "image":    uint8 [2b, S, S, 3]  two SimCLR views per image, interleaved: rows 2i and 2i+1 are the two views of
              image i. Interleaving keeps every pair inside any even-sized contiguous block of rows, so the pairing
              is the same for the process-local batch, every device shard and the global array, whatever P and the
              device count (the global array is the processes' blocks in process order).
  "caption_emb": float32 [2b, E]      the image's frozen caption embedding, repeated for both views.
  "label":    int32 [2b]           class (label datasets), object shape (procedural), -1 (caption shards).
  "id":       int32 [2b]           the example's index in its source (caption shards: the id make_shards gave it);
                                   both views share it, so `id[r] == id[s]` marks positive pairs for SimCLR-style
                                   instance graphs.
  + every other int field of the source, int32 [2b] (procedural: "attribute", "background", "caption_id"), or
    int32 [2b, R] for a fixed-width set field (imagenet2012_real's "real_label", padded with -1).
  With `tokenize_fn` (caption str -> (ids, mask), int arrays of one fixed length L), also, repeated for both views:
  "tokens":     int32 [2b, L]        the caption's token ids, for a trainable text tower (CLIP/SigLIP-style losses).
  "token_mask": int32 [2b, L]        1 on real tokens, 0 on padding.
Images stay uint8 to cut host->device traffic 4x; normalise on device with `augment.normalize`.
With `mesh`, every leaf is a global jax.Array of leading size 2B sharded over the mesh's 'data' axis, assembled with
`jax.make_array_from_process_local_data`; without it, the process-local NumPy batch.

Evaluation batch (`eval_dataset`): one centre-cropped view per image, [b, S, S, 3] and [b] fields (and [b, L]
tokens), plus "valid": bool [b]; the last batch is padded (valid False; int fields -1, tokens and mask 0) so every
process yields the same number of batches; set fields [b, R] pad with -1 too.

`tokenize_fn` runs in grain's worker processes, so it must pickle: a module-level function or a functools.partial
of one (e.g. partial(my_tokenize, vocab_path=..., length=L)) works, a lambda or closure does not. This package never
imports models; the trainer passes the text tower's tokenizer in.

Bad records (undecodable image, empty caption, embedding of the wrong length or not finite) are skipped in training
and masked (valid False) in evaluation, counted, and logged with their key; with `strict=True` the first one raises
`BadRecordError` naming it. The counts are part of the iterator: `it.skipped`, `it.metrics()`, and its grain state.
A dataset-wide problem stops training with BadRecordError instead of searching forever for a good record
(`max_bad_in_a_row`, `max_bad_fraction`).

Checkpointing: `it.get_state()` / `it.set_state(state)` (JSON-able dict; also works with
`grain.checkpoint.CheckpointHandler` in an orbax CheckpointManager) restore the exact stream of batches.
`Prefetch(it)` assembles a training iterator's next batches in a background thread; its state stays that of the
last batch it returned.
Determinism: global batch k depends only on (source, seed, global batch size): not on the number of processes or
devices, nor on worker counts (until a bad record is skipped: the process that met it reads one element further).
"""
from __future__ import annotations

import functools
import logging
import os
import queue
import sys
import threading
from typing import Any, Callable

import grain
import numpy as np
from absl import flags

from xsample_jax.data import augment as aug_lib
from xsample_jax.data.shards import BadRecordError, decode_image, record_problem
from xsample_jax.data.sources import EMBED_DIM

TokenizeFn = Callable[[str], tuple[np.ndarray, np.ndarray]]

# Fields that are not int labels (the token arrays, should a source carry them, are never int32 scalars).
_DROP = ("image", "caption_emb", "caption", "key", "error", "tokens", "token_mask")


def _as_rgb(image) -> np.ndarray:
  """Encoded bytes or an array -> uint8 RGB [H, W, 3] (grey and RGBA made RGB)."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return decode_image(bytes(image))
  img = np.asarray(image)
  if img.dtype != np.uint8:
    raise BadRecordError(f"image dtype {img.dtype}, expected uint8")
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or img.shape[-1] not in (1, 3, 4) or min(img.shape[:2]) == 0:
    raise BadRecordError(f"image shape {img.shape} is not [H, W, 1|3|4]")
  if img.shape[-1] == 1:
    return np.repeat(img, 3, axis=-1)
  return img[..., :3]


def _labels(ex: dict) -> dict:
  """The int fields: scalars, or fixed-width 1-D sets (one shape per field across the source)."""
  return {k: np.asarray(v, np.int32) for k, v in ex.items() if k not in _DROP}


def _tokens(caption: str, tokenize_fn: TokenizeFn | None) -> dict:
  """{"tokens", "token_mask"}: int32 [L] each, from `tokenize_fn`; {} without one."""
  if tokenize_fn is None:
    return {}
  ids, mask = (np.asarray(x, np.int32) for x in tokenize_fn(caption))
  if ids.ndim != 1 or ids.shape != mask.shape:
    raise ValueError(f"tokenize_fn must return ids and mask of one shape [L]; got {ids.shape} and {mask.shape} "
                     f"for caption {caption!r}")
  return {"tokens": ids, "token_mask": mask}


def _checked(ex: dict, embed_dim: int, strict: bool):
  """(rgb image, None) for a usable record, else (None, reason); strict raises instead."""
  reason = ex.get("error") or record_problem(ex.get("caption", ""), ex["caption_emb"], embed_dim)
  image = None
  if reason is None:
    try:
      image = _as_rgb(ex["image"])
    except BadRecordError as e:
      reason = str(e)
  if reason is not None and strict:
    raise BadRecordError(f"bad record {ex.get('key')!r}: {reason}")
  return image, reason


def _train_rows(positions: list[int], *, source, length: int, shuffle_seed: int, rngs: grain.experimental.RngPool,
                aug: aug_lib.SimCLRAugment, embed_dim: int, strict: bool,
                tokenize_fn: TokenizeFn | None = None) -> list[dict]:
  """The rows of stream positions `positions`: the source reshuffled every epoch (a seeded permutation of its
  indices per epoch, computed per index: grain's index_shuffle, as its shuffle() uses), each example's two views
  drawn from a generator keyed by its position (grain's RngPool, as its random_map() uses), so no two epochs share
  augmentation randomness and a row does not depend on the positions around it. The views of all the good rows are
  made together (`augment.views`); a bad record's row says why."""
  rows, good, images, draws = [], [], [], []
  for position in positions:
    epoch, i = divmod(position, length)
    ex = source[grain.experimental.index_shuffle(i, max_index=length - 1, seed=(shuffle_seed + epoch) % 2**32,
                                                 rounds=4)]
    image, reason = _checked(ex, embed_dim, strict)
    if reason is not None:
      rows.append({"bad": reason, "key": ex.get("key", "?")})
      continue
    rng = rngs.acquire_rng(position)
    try:
      draws.append(rng.random((2, aug_lib.DRAWS_PER_VIEW)))
    finally:
      rngs.release_rng(rng)
    good.append((len(rows), ex))
    images.append(image)
    rows.append(None)
  if images:
    for (row, ex), views in zip(good, aug_lib.views(images, np.stack(draws), aug)):
      rows[row] = {"image": views, "caption_emb": np.asarray(ex["caption_emb"], np.float32), **_labels(ex),
                   **_tokens(ex.get("caption", ""), tokenize_fn)}
  return rows


def _eval_rows(indices: list[int], *, source, size: int, crop_fraction: float, embed_dim: int, strict: bool,
               tokenize_fn: TokenizeFn | None = None) -> list[dict]:
  rows = []
  for index in indices:
    if index >= len(source):
      rows.append({"pad": True})
      continue
    ex = source[index]
    image, reason = _checked(ex, embed_dim, strict)
    if reason is not None:
      rows.append({"bad": reason, "key": ex.get("key", "?")})
      continue
    rows.append({"image": aug_lib.eval_view(image, size, crop_fraction)[None],
                 "caption_emb": np.asarray(ex["caption_emb"], np.float32), **_labels(ex),
                 **_tokens(ex.get("caption", ""), tokenize_fn), "valid": np.bool_(True)})
  return rows


def _filler(pad_to: dict) -> dict:
  """An invalid row (padding, or a masked bad record in evaluation)."""
  row = {"image": np.zeros(pad_to["image"], np.uint8), "caption_emb": np.zeros(pad_to["embed_dim"], np.float32)}
  row.update({k: np.full(shape, -1, np.int32) for k, shape in pad_to["fields"].items()})
  if pad_to["token_len"] is not None:
    row.update(tokens=np.zeros(pad_to["token_len"], np.int32), token_mask=np.zeros(pad_to["token_len"], np.int32))
  row["valid"] = np.bool_(False)
  return row


def _collate(rows: list[dict]) -> dict:
  """Stack examples; images [n, V, ...] -> [n V, ...] (views interleaved), other fields repeated V times."""
  views = rows[0]["image"].shape[0]
  batch = {}
  for k in rows[0]:
    x = np.stack([r[k] for r in rows])
    batch[k] = x.reshape((-1,) + x.shape[2:]) if k == "image" else np.repeat(x, views, axis=0)
  return batch


class _BatchIterator(grain.DatasetIterator):
  """Batches the rows of `ProcessRows` elements (lists of rows); counts and drops (train) or masks (eval) bad
  records; optionally makes global jax.Arrays.

  Training stops (BadRecordError) after `limits` = (K, F): K bad records in a row, or a bad fraction above F once
  1000 records were read, rather than search forever for a good one (one host stuck there hangs a whole pod).
  Its state is the parent's before the element being consumed and how many of its rows were used: a batch may end
  inside an element (skipped records shift the boundaries), and a restore reads that element again.
  """

  def __init__(self, parent, batch_size: int, pad_to: dict | None, sharding, limits=None):
    super().__init__(parent)
    self._batch_size, self._pad_to, self._sharding, self._limits = batch_size, pad_to, sharding, limits
    self._skipped = self._seen = self._in_a_row = 0
    self._rows, self._used, self._rows_state = [], 0, None  # the element being consumed, and the state before it

  @property
  def skipped(self) -> int:
    """Bad records met so far by this process (dropped in training, masked in evaluation)."""
    return self._skipped

  def metrics(self) -> dict[str, int]:
    return {"data/skipped_records": self._skipped}

  def _next_row(self) -> dict:
    if self._used == len(self._rows):
      self._rows_state = self._parent.get_state()
      self._rows, self._used = next(self._parent), 0
    self._used += 1
    return self._rows[self._used - 1]

  def __next__(self):
    rows = []
    while len(rows) < self._batch_size:
      # Streams come in whole global batches (ProcessRows; evaluation padded with "pad" rows), so the end falls
      # between batches; a training batch cut short by skipped records is dropped.
      ex = self._next_row()
      self._seen += "pad" not in ex
      self._in_a_row = self._in_a_row + 1 if "bad" in ex else 0
      if "bad" in ex:
        self._skipped += 1
        logging.warning("skipping bad record %r: %s (%d bad so far)", ex["key"], ex["bad"], self._skipped)
        self._check_limits(ex)
      if "bad" not in ex and "pad" not in ex:
        rows.append(ex)
      elif self._pad_to is not None:
        rows.append(_filler(self._pad_to))
    batch = _collate(rows)
    if self._sharding is None:
      return batch
    import jax  # only the global assembly needs jax; grain workers never import it
    return jax.make_array_from_process_local_data(self._sharding, batch)  # the fields in one call: ~25% less time

  def _check_limits(self, ex: dict) -> None:
    if self._limits is None:
      return
    most_in_a_row, most_fraction = self._limits
    if self._in_a_row >= most_in_a_row or (self._seen >= 1000 and self._skipped > most_fraction * self._seen):
      raise BadRecordError(
          f"{self._in_a_row} bad records in a row, {self._skipped} of {self._seen} read; the last, {ex['key']!r}: "
          f"{ex['bad']}. When most records fail the same way the cause is usually the dataset as a whole (caption "
          "embeddings of another width than the model's, images in a format the decoder does not read, the wrong "
          "directory) rather than single bad files")

  def get_state(self) -> dict[str, Any]:
    if self._used == len(self._rows):  # between elements: nothing to read again
      parent, used = self._parent.get_state(), 0
    else:
      parent, used = self._rows_state, self._used
    return {"parent": parent, "rows_used": used, "skipped": self._skipped, "seen": self._seen}

  def set_state(self, state: dict[str, Any]) -> None:
    if not can_restore(state):
      raise ValueError("this iterator state is from a version of xsample_jax that read one example per grain "
                       "element; its stream position cannot be restored. Resume with start_batch (the global batch "
                       "the run had reached) instead")
    self._parent.set_state(state["parent"])
    self._rows, self._used = [], 0
    if state["rows_used"]:
      self._rows_state, self._rows = state["parent"], next(self._parent)
      self._used = int(state["rows_used"])
    self._skipped, self._seen, self._in_a_row = int(state["skipped"]), int(state.get("seen", 0)), 0


def can_restore(state: dict[str, Any]) -> bool:
  """Whether `state` (an iterator's get_state()) is of this pipeline's layout. States saved before a grain element
  carried several examples (`ProcessRows`) name a position in a per-example stream instead."""
  return "rows_used" in state


class _BatchDataset(grain.IterDataset):

  def __init__(self, parent, batch_size: int, pad_to: dict | None, sharding, limits=None):
    super().__init__(parent)
    self._batch_size, self._pad_to, self._sharding, self._limits = batch_size, pad_to, sharding, limits

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self._batch_size, self._pad_to, self._sharding, self._limits)

  def __str__(self) -> str:
    return f"BatchGoodRecords(batch_size={self._batch_size}, pad={self._pad_to is not None})"


PREFETCH_PRIORITIES = ("idle", "low", "normal")


def _lower_this_thread(priority: str) -> None:
  """Puts the calling thread under SCHED_IDLE ("idle") or at nice 19 ("low") on Linux, where a thread id is a
  scheduling target; "normal" and other systems leave it as it is."""
  if priority == "normal" or not sys.platform.startswith("linux"):
    return
  tid = threading.get_native_id()
  try:
    if priority == "idle":
      os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    else:
      os.setpriority(os.PRIO_PROCESS, tid, 19)
  except OSError as e:  # a sandbox that forbids it: the thread keeps the process's priority
    logging.warning("could not lower the prefetch thread's priority to %r: %s", priority, e)


class Prefetch:
  """Assembles the next `size` batches of a `train_dataset` (or `eval_dataset`) iterator (reading, with no read
  threads; collation, global arrays, their copy to the devices) in a background thread, so the loop's next() takes a
  ready batch while the device runs a step.

  get_state() / metrics() are those of the last batch returned, not of the ones read ahead: a checkpoint refers to
  the batches the step consumed. An error of the pipeline (BadRecordError) or its end reaches next() in order; at
  the end they include the records read after the last whole batch.

  priority: the thread's scheduling on Linux (elsewhere it keeps the process's):
    "idle" (SCHED_IDLE): it runs only on a core nothing else wants, and an XLA thread that wakes takes the core back
      at once. On 2 cores beside the smoke step, in three alternated pairs of runs, the fed step measured
      1.021-1.075x the in-memory one against 1.074-1.133x at nice 19, 5-6% lower in each pair
      (benchmarks/pipeline_bench.py).
    "low" (nice 19): it takes turns with XLA's threads at a small share; a woken XLA thread may wait for its turn,
      and the op it belongs to waits with it.
    "normal": the process's priority (a loop that waits on every batch, as evaluation's does).
  Below normal, it needs the pipeline's CPU per step to fit in the step's idle time; where it does not (a CPU host
  whose step keeps every core busy), the step waits for data instead, as the trainer's data_wait metric shows.
  """

  def __init__(self, it: _BatchIterator, size: int = 2, priority: str = "idle"):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    if priority not in PREFETCH_PRIORITIES:
      raise ValueError(f"prefetch priority must be one of {PREFETCH_PRIORITIES}, got {priority!r}")
    self._it, self.size, self._priority = it, size, priority
    self._state, self._metrics, self._skipped = it.get_state(), it.metrics(), it.skipped
    self._start()

  def _start(self):
    self._queue, self._stop = queue.Queue(self.size), threading.Event()
    self._assembled = self._taken = 0
    self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
    self._thread.start()

  def _fill(self):
    _lower_this_thread(self._priority)
    try:
      while not self._stop.is_set():
        batch = next(self._it)
        self._assembled += 1
        self._put((batch, self._it.get_state(), self._it.metrics(), self._it.skipped))
    except StopIteration as e:  # the end: with the counts of the records read after the last whole batch
      self._put((e, self._it.get_state(), self._it.metrics(), self._it.skipped))
    except BaseException as e:  # noqa: BLE001 - every failure goes to the consumer
      self._put((e, None, None, None))

  def _put(self, item):
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        pass

  def _halt(self):
    self._stop.set()
    while self._thread.is_alive():
      try:  # unblocks a put waiting for room
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass
    self._thread.join()

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    batch, state, metrics, skipped = item
    if state is not None:  # a batch, or the end
      self._state, self._metrics, self._skipped = state, metrics, skipped
    if isinstance(batch, BaseException):
      self._queue.put(item)  # every later call raises it too
      raise batch
    self._taken += 1
    return batch

  def ready(self) -> int:
    """Batches assembled and not yet returned: at most size + 1, when the thread holds one more and waits for room
    in the queue (then it does no work until next() takes one)."""
    return self._assembled - self._taken

  @property
  def skipped(self) -> int:
    return self._skipped

  def metrics(self) -> dict[str, int]:
    return self._metrics

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    self._halt()
    self._it.set_state(state)
    self._state, self._metrics, self._skipped = self._it.get_state(), self._it.metrics(), self._it.skipped
    self._start()

  def close(self) -> None:
    self._halt()
    self._it.close()


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int, rows_per_image: int, mesh) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch of {global_batch_size} images does not split over {process_count} processes")
  if mesh is not None:
    shards = mesh.shape["data"]
    if global_batch_size * rows_per_image % shards:
      raise ValueError(f"{global_batch_size * rows_per_image} rows do not split over the mesh's {shards} data shards")
  return global_batch_size // process_count


def _sharding(mesh):
  if mesh is None:
    return None
  from xsample_jax.sharding import batch_sharding
  return batch_sharding(mesh)


# Rows (examples) to a grain element (see ProcessRows): enough to make grain's per-element cost small beside the
# rows' own, few enough that read threads and worker processes still have many elements to share.
ROWS_PER_ELEMENT = 16


class ProcessRows(grain.MapDataset):
  """Process `index`'s rows of a stream cut into global batches of B = count * local positions, `per_element` rows
  to a grain element: element e is fn(the positions of rows e * per_element ... (e + 1) * per_element - 1), a list
  of rows, one per position (fn may make them together: the training views are).

  Row r of the process is row r % local of its block of global batch start_batch + r // local, and global batch k
  holds stream positions [k B, (k + 1) B), the processes' blocks in process order (as the global array is). So 1 x 8
  and 2 x 4 devices train on the same data, and a run resumes on another layout by starting each process at the
  global batch it had reached. Only whole global batches are shared out: a finite stream's last B - 1 positions at
  most are left, as a lone process would.

  Several rows to a grain element: grain's per-element machinery (its iterator, stats and metrics at every stage)
  cost ~100-150 us an element on a 2-core host, a third of what the smoke setting's pipeline spent on an example.
  The batching iterator reassembles batches from these runs of rows.
  """

  def __init__(self, fn: Callable[[list[int]], list[Any]], stream_length: int, index: int, count: int, local: int,
               start_batch: int = 0, per_element: int = ROWS_PER_ELEMENT):
    super().__init__()
    self._fn, self._index, self._count, self._local, self._start = fn, index, count, local, start_batch
    self._per = per_element
    self._rows = max(0, stream_length // (count * local) - start_batch) * local

  def position(self, row: int) -> int:
    batch, j = divmod(row, self._local)
    return ((self._start + batch) * self._count + self._index) * self._local + j

  def __len__(self) -> int:
    return -(-self._rows // self._per)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    if not 0 <= index < len(self):
      raise IndexError(f"element {index} of {len(self)}")
    first = index * self._per
    return self._fn([self.position(r) for r in range(first, min(first + self._per, self._rows))])

  def __str__(self) -> str:
    return (f"ProcessRows(index={self._index}, count={self._count}, local_batch={self._local}, "
            f"start={self._start}, per_element={self._per})")


def host_cores() -> int:
  """CPU cores this process may run on (its affinity mask: a container's or taskset's share, not the machine's)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(cores: int | None = None) -> int:
  """Worker processes for `num_workers=-1`: none (grain's read threads in this process) up to 4 cores, else one per
  two cores, at most 16.

  Read threads share the GIL, so they top out near one core, but pay no pickling or inter-process copies: on 2
  cores they ran 301 images/s at 224 px against 226 with 2 workers, 607 against 612 at the 32 px smoke setting
  (benchmarks/input_bench.py; results in benchmarks/results/), and a CPU run's step needs the other core. With more
  cores than that, processes scale past the GIL; half the cores leave the rest to the training process and the
  runtime, and 16 is what a TPU host's pipeline needs (the ImageNet and CC configs' former fixed setting).
  """
  cores = host_cores() if cores is None else cores
  return 0 if cores <= 4 else min(16, cores // 2)


def resolve_num_workers(num_workers: int) -> int:
  """num_workers, or for -1 (auto) `default_num_workers()` for this host."""
  if num_workers < -1:
    raise ValueError(f"num_workers must be >= 0, or -1 for the host's default; got {num_workers}")
  return default_num_workers() if num_workers == -1 else num_workers


def default_read_threads(num_workers: int, cores: int | None = None) -> int:
  """Read threads for `read_threads=-1`, given the resolved worker count: none in the training process of a host of
  up to 4 cores (elements are read in the thread that asks for the batch: `Prefetch`'s), else 8 (in the training
  process, or in each worker).

  In the training process threads share the GIL and the cores with the train step, and on a small host the step
  already keeps every core busy, so what counts is the pipeline's CPU per image, not its parallelism: at the smoke
  setting on 2 cores, reading alone, 8 threads spent 2.1 CPU-ms an image against 1.1 for one, and one grain thread
  behind `Prefetch`'s spent more than `Prefetch`'s thread reading by itself (the fed smoke step 1.18-1.20x the
  in-memory one against 1.19-1.21x, 4 alternating runs each; benchmarks/pipeline_bench.py).
  """
  cores = host_cores() if cores is None else cores
  return 0 if num_workers == 0 and cores <= 4 else 8


def resolve_read_threads(read_threads: int, workers: int) -> int:
  """read_threads, or for -1 (auto) `default_read_threads` for `workers` (resolved: `resolve_num_workers`)."""
  if read_threads < -1:
    raise ValueError(f"read_threads must be >= 0, or -1 for the host's default; got {read_threads}")
  return default_read_threads(workers) if read_threads == -1 else read_threads


def _to_iter(ds: ProcessRows, num_workers: int, read_threads: int, local_batch: int) -> grain.IterDataset:
  num_workers = resolve_num_workers(num_workers)
  read_threads = resolve_read_threads(read_threads, num_workers)
  # Enough read-ahead for a batch and a half, so the threads (or each worker's threads) never starve; with no
  # threads, elements are read when asked for.
  per_worker = max(2, -(-3 * local_batch // (2 * ROWS_PER_ELEMENT * max(1, num_workers))))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(read_threads, per_worker) if read_threads else 0))
  if num_workers:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside absl.app nobody parsed them, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=per_worker))
  return it


def train_dataset(source, *, global_batch_size: int, augment: aug_lib.SimCLRAugment, seed: int,
                  process_index: int | None = None, process_count: int | None = None, mesh=None,
                  num_epochs: int | None = None, num_workers: int = 0, read_threads: int = -1,
                  strict: bool = False, embed_dim: int = EMBED_DIM,
                  tokenize_fn: TokenizeFn | None = None, start_batch: int = 0, max_bad_in_a_row: int = 1000,
                  max_bad_fraction: float = 0.5) -> grain.IterDataset:
  """Shuffled (reshuffled every epoch), two-view batches of `global_batch_size` images; endless by default.

  Each process reads only its share of each global batch of the shuffled stream (`ProcessRows`) and augments with
  a generator keyed by the example's position in the stream, so global batch k (its examples, their order and their
  augmentations) does not depend on the number of processes, and no two epochs share augmentation randomness.
  num_workers: grain worker processes running the augmentation (0: grain's read threads in this process; -1: the
  host's default, `default_num_workers()`); read_threads: threads reading and augmenting (per worker; -1: the
  default for that worker count, `default_read_threads()`).
  tokenize_fn: adds "tokens" / "token_mask" [2b, L] from each caption (picklable; see the module docstring).
  start_batch: the first global batch to yield (a resume on another process layout; same-layout resumes restore
  the iterator's state instead).
  max_bad_in_a_row, max_bad_fraction: stop with BadRecordError after that many bad records in a row, or when more
  than that fraction of the records read (after the first 1000) were bad.
  """
  process_index, process_count = _process(process_index, process_count)
  local = _local_batch(global_batch_size, process_count, 2, mesh)
  if not len(source):
    raise ValueError("the training source is empty")
  shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  rows = functools.partial(_train_rows, source=source, length=len(source), shuffle_seed=shuffle_seed,
                           rngs=grain.experimental.RngPool(augment_seed), aug=augment, embed_dim=embed_dim,
                           strict=strict, tokenize_fn=tokenize_fn)
  stream = sys.maxsize if num_epochs is None else num_epochs * len(source)
  ds = ProcessRows(rows, stream, process_index, process_count, local, start_batch)
  it = _to_iter(ds, num_workers, read_threads, local)
  return _BatchDataset(it, local, None, _sharding(mesh), (max_bad_in_a_row, max_bad_fraction))


def eval_dataset(source, *, global_batch_size: int, image_size: int, process_index: int | None = None,
                 process_count: int | None = None, mesh=None, crop_fraction: float = 0.875, num_workers: int = 0,
                 read_threads: int = -1, strict: bool = False, embed_dim: int = EMBED_DIM,
                 tokenize_fn: TokenizeFn | None = None) -> grain.IterDataset:
  """One pass in source order, resize + centre crop, padded to whole global batches (so all processes yield the
  same number of batches, and the rows of global batch k are source elements [k B, (k + 1) B) for any layout).

  tokenize_fn: adds "tokens" / "token_mask" [b, L] from each caption (zeros on invalid rows).
  """
  process_index, process_count = _process(process_index, process_count)
  local = _local_batch(global_batch_size, process_count, 1, mesh)
  padded = -(-len(source) // global_batch_size) * global_batch_size
  rows = functools.partial(_eval_rows, source=source, size=image_size, crop_fraction=crop_fraction,
                           embed_dim=embed_dim, strict=strict, tokenize_fn=tokenize_fn)
  ds = ProcessRows(rows, padded, process_index, process_count, local)
  it = _to_iter(ds, num_workers, read_threads, local)
  # Invalid rows carry the same fields, of the same shapes, as real ones (int fields -1, tokens 0), so every batch
  # has one structure; the token length L is fixed, so the empty caption's tokenisation tells it.
  fields = {k: v.shape for k, v in _labels(source[0]).items()} if len(source) else {"label": (), "id": ()}
  token_len = None if tokenize_fn is None else len(_tokens("", tokenize_fn)["tokens"])
  pad_to = {"image": (1, image_size, image_size, 3), "embed_dim": embed_dim, "fields": fields,
            "token_len": token_len}
  return _BatchDataset(it, local, pad_to, _sharding(mesh))

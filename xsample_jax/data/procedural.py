"""The embedded default dataset: procedural captioned images, no download.

Each image is one object (shape class, colour, size, position, rotation) on a textured coloured background, rendered
with NumPy from a per-index random generator, so element i of a split is the same on every machine for a seed.
Its caption names the factors: "a small red triangle on a striped green background". There are 1,664 distinct
captions (`all_captions()`); their sentence embeddings are a committed table (see `sources.procedural_source`).

Factors kept as evaluation labels: `label` = object shape, `attribute` = object colour, `background` =
texture x background-colour class. In the training distribution each shape prefers one background class (with
probability `bg_correlation`), a spurious cue like the backgrounds of ImageNet classes. Splits mirror ImageNet-9's
background decomposition (Xiao et al. 2020):
  train / original: the training distribution (different seeds);
  mixed_same: every object on a fresh background of its own shape's preferred class;
  mixed_rand: every object on a background of a uniformly random class.
A model that relies on the background loses accuracy from mixed_same to mixed_rand (the "BG-gap").
"""
from __future__ import annotations

import functools
import threading
import zlib

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
COLOURS = {  # object colours: saturated
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
    "yellow": (235, 210, 40), "purple": (145, 60, 195), "orange": (245, 140, 30)}
BG_COLOURS = {  # background colours: muted, so an object of another colour stands out
    "red": (150, 75, 70), "green": (80, 130, 80), "blue": (75, 95, 150), "yellow": (170, 160, 95),
    "grey": (125, 125, 125)}
TEXTURES = ("plain", "striped", "checkered", "dotted")
SIZES = ("small", "large")
SPLITS = ("train", "original", "mixed_same", "mixed_rand")
NUM_BACKGROUNDS = len(TEXTURES) * len(BG_COLOURS)
_SIZE_RADIUS = {"small": (0.16, 0.22), "large": (0.28, 0.36)}  # fraction of the image side

_BG_NAMES = tuple(BG_COLOURS)
_COLOUR_NAMES = tuple(COLOURS)


def caption(shape: str, colour: str, size: str, texture: str, bg_colour: str) -> str:
  return f"a {size} {colour} {shape} on a {texture} {bg_colour} background"


def all_captions() -> list[str]:
  """Every caption the generator can produce, in a fixed order (the row order of the embedding table)."""
  return [caption(s, c, z, t, b) for s in SHAPES for c in COLOURS for z in SIZES for t in TEXTURES for b in BG_COLOURS
          if c != b]


_CAPTION_INDEX = {c: i for i, c in enumerate(all_captions())}


def preferred_background(shape_id: int) -> int:
  """The background class shape `shape_id` is shown on in the correlated splits (distinct for every shape)."""
  return (shape_id % len(TEXTURES)) * len(BG_COLOURS) + shape_id % len(BG_COLOURS)


def sample_factors(rng: np.random.Generator, split: str, bg_correlation: float) -> dict:
  """The discrete and continuous factors of one image."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
  shape = int(rng.integers(len(SHAPES)))
  if split == "mixed_same" or (split in ("train", "original") and rng.random() < bg_correlation):
    background = preferred_background(shape)
  else:
    background = int(rng.integers(NUM_BACKGROUNDS))
  texture, bg_colour = divmod(background, len(BG_COLOURS))
  allowed = [i for i, c in enumerate(_COLOUR_NAMES) if c != _BG_NAMES[bg_colour]]
  colour = allowed[int(rng.integers(len(allowed)))]
  size = int(rng.integers(len(SIZES)))
  return dict(shape=shape, colour=colour, size=size, texture=texture, bg_colour=bg_colour, background=background,
              radius=float(rng.uniform(*_SIZE_RADIUS[SIZES[size]])), angle=float(rng.uniform(-np.pi / 6, np.pi / 6)),
              centre=rng.uniform(0, 1, size=2), bg_phase=rng.uniform(0, 1, size=2),
              bg_period=float(rng.uniform(0.12, 0.22)), bg_orient=int(rng.integers(3)))


def caption_of(f: dict) -> str:
  return caption(SHAPES[f["shape"]], _COLOUR_NAMES[f["colour"]], SIZES[f["size"]], TEXTURES[f["texture"]],
                 _BG_NAMES[f["bg_colour"]])


def caption_id(f: dict) -> int:
  return _CAPTION_INDEX[caption_of(f)]


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test in object coordinates (unit radius, v pointing down)."""
  r = lambda: np.hypot(u, v)  # noqa: E731 - only the round shapes need it
  au, av = np.abs(u), np.abs(v)
  if name == "circle":
    return r() <= 1
  if name == "square":
    return np.maximum(au, av) <= 0.8
  if name == "triangle":
    return (v <= 0.5) & (v >= -1 + np.sqrt(3) * au)
  if name == "diamond":
    return au + av <= 1
  if name == "star":
    theta = np.arctan2(u, -v)  # one point straight up
    return r() <= 0.42 + 0.58 * np.abs(np.cos(2.5 * theta)) ** 4
  if name == "cross":
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
  if name == "hexagon":
    return (av <= 0.866) & (0.866 * au + 0.5 * av <= 0.866)
  if name == "ring":
    rr = r()
    return (rr <= 1) & (rr >= 0.55)
  raise ValueError(name)


@functools.lru_cache(maxsize=8)
def _axis(n: int) -> np.ndarray:
  """Pixel-centre coordinates in [0, 1] along one side of an n x n image (the grid is separable)."""
  return (np.arange(n).astype(np.float32) + 0.5) / n


def _span(d: np.ndarray) -> slice:
  """The run of pixels along one axis whose object coordinate d is within 1.5 radii of the centre."""
  inside = np.flatnonzero(np.abs(d) <= 1.5)
  return slice(inside[0], inside[-1] + 1) if len(inside) else slice(0, 0)


def render(f: dict, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]; rendered at 2x and area-downsampled for anti-aliased edges.

  The pipeline renders these on the CPU that also runs a CPU training step, so every pixel-wise pass counts: what
  depends on one coordinate is computed on a row or a column and broadcast, the two background tones are looked up,
  and the object is tested only inside its box (every shape lies within max(|u|, |v|) <= 1, so within sqrt(2)
  radii of its centre).
  """
  n = 2 * size
  x = _axis(n)
  xx, yy = x[None, :], x[:, None]
  base = np.asarray(BG_COLOURS[_BG_NAMES[f["bg_colour"]]], np.float32)
  alt = base * 0.55 + 255 * 0.45  # the texture's second tone
  orient = f["bg_orient"]
  t = xx if orient == 0 else yy if orient == 1 else (xx + yy) * np.float32(1 / np.sqrt(2))  # stripe direction
  px, py = f["bg_phase"]
  period = f["bg_period"]
  texture = TEXTURES[f["texture"]]
  if texture == "plain":
    on = np.zeros((1, 1), bool)
  elif texture == "striped":
    on = np.mod(t / period + px, 1.0) < 0.5
  elif texture == "checkered":  # the parity of the cell's row + column, the floors taken on one row and one column
    on = (np.floor(xx / period + px).astype(np.int32) + np.floor(yy / period + py).astype(np.int32)) % 2 == 1
  else:  # dotted
    cx, cy = np.mod(xx / period + px, 1.0) - 0.5, np.mod(yy / period + py, 1.0) - 0.5
    on = np.hypot(cx, cy) < 0.25
  img = np.take(np.stack([base, alt]), np.broadcast_to(on, (n, n)).astype(np.uint8), axis=0)
  radius = f["radius"]
  centre = radius + f["centre"] * (1 - 2 * radius)  # the object stays inside the frame
  c, s = np.cos(f["angle"]), np.sin(f["angle"])
  du, dv = (xx - centre[0]) / radius, (yy - centre[1]) / radius
  cols, rows = _span(du[0]), _span(dv[:, 0])
  du, dv = du[:, cols], dv[rows]
  mask = _shape_mask(SHAPES[f["shape"]], c * du + s * dv, -s * du + c * dv)
  img[rows, cols][mask] = np.asarray(COLOURS[_COLOUR_NAMES[f["colour"]]], np.float32) * rng.uniform(0.85, 1.1)
  img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
  img += rng.standard_normal(img.shape, dtype=np.float32) * 6.0  # sensor-like noise: no two images alike
  return np.clip(img + 0.5, 0, 255).astype(np.uint8)


class ProceduralSource:
  """grain random-access source: element i of (split, seed) -> dict of image, caption id and factor labels.

  keep_rendered: keep each element once rendered (about S x S x 3 bytes), for a training set read epoch after epoch
  (the smoke run reads its 8,192 images 2.3 times); `prerender()` then renders the rest in a background thread. The
  kept images are read-only. A pickled copy (a grain worker process's) keeps nothing: it renders what it reads.
  """

  def __init__(self, split: str = "train", num_examples: int = 50_000, *, image_size: int = 64, seed: int = 0,
               bg_correlation: float = 0.8, keep_rendered: bool = False):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if num_examples <= 0 or image_size < 8:
      raise ValueError(f"need num_examples > 0 and image_size >= 8, got {num_examples}, {image_size}")
    self.split, self.num_examples, self.image_size = split, num_examples, image_size
    self.seed, self.bg_correlation = seed, bg_correlation
    self._split_key = zlib.crc32(split.encode())  # stable across Python runs, unlike hash()
    self._kept = [None] * num_examples if keep_rendered else None
    self._prerender = None

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    kept = None if self._kept is None else self._kept[index]
    if kept is None:
      kept = self._render(index)
      if self._kept is not None:  # two threads may render one element: the same pixels, either copy is kept
        kept[0].flags.writeable = False  # shared by every later read
        self._kept[index] = kept
    image, fields = kept
    return {"image": image, **fields, "id": index, "key": f"procedural/{self.split}/{index}"}

  def _render(self, index: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng([self.seed, self._split_key, index])
    f = sample_factors(rng, self.split, self.bg_correlation)
    fields = {"caption_id": caption_id(f), "caption": caption_of(f), "label": f["shape"], "attribute": f["colour"],
              "background": f["background"]}
    return render(f, self.image_size, rng), fields

  def prerender(self, count: int | None = None) -> threading.Thread | None:
    """Render the first `count` elements (all by default) not yet kept, in a daemon thread; None without
    keep_rendered. The trainer starts it while XLA compiles the train step, which leaves a core idle."""
    if self._kept is None:
      return None
    if self._prerender is None:
      count = self.num_examples if count is None else min(count, self.num_examples)

      def fill():
        for i in range(count):
          if self._kept[i] is None:
            self[i]

      self._prerender = threading.Thread(target=fill, name="procedural-prerender", daemon=True)
      self._prerender.start()
    return self._prerender

  def __getstate__(self) -> dict:
    state = dict(self.__dict__, _prerender=None)
    state["_kept"] = None  # a worker process renders what it reads rather than hold a copy of everything
    return state

  def __repr__(self) -> str:
    return (f"ProceduralSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed}, bg_correlation={self.bg_correlation}, "
            f"keep_rendered={self._kept is not None})")

"""SimCLR two-view augmentations and the evaluation transform, in NumPy/OpenCV on the host.

They run inside grain workers on the examples of a grain element together (`views`), from uniform draws that the
pipeline takes from a generator keyed by the pipeline's seed and each example's position in the stream
(`pipeline._train_rows`): every sample gets independent randomness, the two views of one image take different
draws (so they differ), and the whole stream is reproducible for a seed, whatever examples share an element.
Why on the host and not on device in JAX (`benchmarks/input_bench.py` measures both on the same images; runs in
benchmarks/results/): at 224 px the OpenCV path ran 2-5x faster than the same recipe as a jitted, vmapped JAX
function on a CPU backend (per-sample crops of different sizes are one cheap cv2.resize each, while in JAX every crop
is a fixed-shape antialiased resampling of the whole image), it scales with grain worker processes, and it keeps the
accelerator for the model.

Images are uint8 [H, W, 3] RGB throughout, as PIL's are between torchvision's transforms.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

# Standard ImageNet statistics, applied on device by `normalize` (images travel as uint8: 4x less host->device traffic).
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)

# OpenCV's own thread pool fights grain's worker processes for the same cores.
cv2.setNumThreads(1)


@dataclasses.dataclass(frozen=True)
class SimCLRAugment:
  """The SimCLR recipe (Chen et al. 2020, appendix A) with its default strengths.

  Colour jitter strength s scales brightness/contrast/saturation by 0.8 s and hue by 0.2 s (s = 1.0 for ImageNet,
  0.5 for CIFAR in the paper). Blur kernel is ~10% of the image side, sigma uniform in `blur_sigma`.
  """
  size: int = 224
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  jitter_strength: float = 1.0
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur_prob: float = 0.5
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  solarize_prob: float = 0.0

  def __post_init__(self):
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
    for name in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
    if self.size <= 0:
      raise ValueError(f"size must be positive, got {self.size}")


# Uniform draws a view takes (`views`), in this order: the crop's 10 tries (area, log aspect), its top and left, flip,
# jitter gate, the jitter ops' order (argsort of 4 draws: a uniform permutation), their 4 factors, grayscale gate,
# blur gate and sigma, solarize gate. A fixed count per view, drawn in one call per image.
_CROP_TRIES = 10
DRAWS_PER_VIEW = 2 * _CROP_TRIES + 16
_TOP, _FLIP, _JITTER, _ORDER, _FACTORS, _GRAY, _BLUR, _SIGMA, _SOLARIZE = 20, 22, 23, 24, 28, 32, 33, 34, 35


def crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scale, ratio) -> np.ndarray:
  """int [n, 4] (top, left, h, w): for each view a crop covering `scale` of the area with aspect `ratio`, from its
  uniform draws u [n, DRAWS_PER_VIEW] (torchvision's rule: the first of 10 tries that fits the image, else the
  central crop with the aspect clamped into range)."""
  heights, widths = np.asarray(heights), np.asarray(widths)
  area = (heights * widths)[:, None]
  log_ratio = np.log(ratio)
  target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :_CROP_TRIES])
  aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, _CROP_TRIES:2 * _CROP_TRIES])
  w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
  h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
  fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
  rows = np.arange(len(u))
  first = fits.argmax(1)
  w, h = w[rows, first], h[rows, first]
  # No try fits: the central crop with the aspect ratio clamped into range.
  none = ~fits[rows, first]
  in_ratio = widths / heights
  fw = np.where(in_ratio < ratio[0], widths, np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]), widths))
  fh = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]), heights)
  w, h = np.where(none, fw, w).astype(np.int64), np.where(none, fh, h).astype(np.int64)
  top = np.where(none, (heights - h) // 2, (u[:, _TOP] * (heights - h + 1)).astype(np.int64))
  left = np.where(none, (widths - w) // 2, (u[:, _TOP + 1] * (widths - w + 1)).astype(np.int64))
  return np.stack([top, left, h, w], 1)


def _resize(image: np.ndarray, size: tuple[int, int], dst: np.ndarray | None = None) -> np.ndarray:
  """Resize to (h, w) (into dst if given); area averaging when shrinking (no aliasing), bilinear when growing."""
  h, w = size
  shrink = h < image.shape[0] or w < image.shape[1]
  return cv2.resize(image, (w, h), dst=dst, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# Solarize as a lookup table: a level below 128 stays, one at or above becomes 255 - level.
_SOLARIZE_LUT = np.where(np.arange(256) < 128, np.arange(256), 255 - np.arange(256)).astype(np.uint8)


# The colour ops work on a stack of images, uint8 [m, H, W, 3] RGB, with one factor per image, and return uint8,
# rounded and clipped. OpenCV's per-pixel conversions run on the stack as one tall image [m H, W, 3]; the blends
# are float32 NumPy over the stack. So a batch of small views costs a few calls, not a few per view.
# Each blends the image with a degenerate one, as PIL's ImageEnhance does (what torchvision's ColorJitter runs on
# PIL images, the path of the PyTorch SimCLR and SupCon code); PIL truncates where this rounds (tested to agree
# within a level or two).

def _tall(x: np.ndarray) -> np.ndarray:
  return x.reshape(-1, *x.shape[2:])


def gray(x: np.ndarray) -> np.ndarray:
  """uint8 [m, H, W]: the ITU-R 601 luma of each pixel, rounded (PIL's and torchvision's grayscale)."""
  return cv2.cvtColor(_tall(x), cv2.COLOR_RGB2GRAY).reshape(x.shape[:3])


def _per_image(f: np.ndarray) -> np.ndarray:
  return np.asarray(f, np.float32).reshape(-1, 1, 1, 1)


def _to_uint8(y: np.ndarray) -> np.ndarray:
  np.rint(y, out=y)
  return np.clip(y, 0, 255, out=y).astype(np.uint8)


def adjust_brightness(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Blend with black: x * factor."""
  return _to_uint8(np.multiply(x, _per_image(factor), dtype=np.float32))


def adjust_contrast(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Blend with the image's mean grey level."""
  f = _per_image(factor)
  mean = gray(x).reshape(len(x), -1).mean(1, dtype=np.float32).reshape(-1, 1, 1, 1)
  return _to_uint8(np.multiply(x, f, dtype=np.float32) + mean * (1 - f))


def adjust_saturation(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Blend with each pixel's grey level."""
  f = _per_image(factor)
  return _to_uint8(np.multiply(x, f, dtype=np.float32) + gray(x)[..., None] * (1 - f))


def adjust_hue(x: np.ndarray, turn: np.ndarray) -> np.ndarray:
  """Turn every pixel's hue by `turn` of a full circle. In float32 HSV: OpenCV's (and PIL's) 8-bit HSV moves dark,
  greyish pixels by up to 7 levels even for a zero turn."""
  hsv = cv2.cvtColor(_tall(x).astype(np.float32), cv2.COLOR_RGB2HSV).reshape(x.shape)  # H in [0, 360)
  # In [0, 720): OpenCV's way back wraps hues of 360 and more (not negative ones).
  hsv[..., 0] += (np.asarray(turn, np.float32) * 360.0 % 360.0).reshape(-1, 1, 1)
  return cv2.convertScaleAbs(cv2.cvtColor(_tall(hsv), cv2.COLOR_HSV2RGB)).reshape(x.shape)  # rounded, clipped


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: np.ndarray, u: np.ndarray, strength: float) -> np.ndarray:
  """Brightness, contrast, saturation and hue in a random order per image, with factors drawn as torchvision's
  ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) draws them, on uint8 [m, H, W, 3] (a new array); u [m, 8]: each image's
  uniform draws, 4 for the order (their argsort) and 4 for the factors.

  Each op runs once per position in the order on the images that take it there: 16 calls on sub-stacks for the
  whole stack. Per image on uint8, OpenCV's calls cost ~4-20 us each at 32 px, most of it per call.
  """
  b, h = 0.8 * strength, 0.2 * strength
  lo = max(0.0, 1 - b)
  factors = np.concatenate([lo + (1 + b - lo) * u[:, 4:7], -h + 2 * h * u[:, 7:8]], 1)
  order = np.argsort(u[:, :4], axis=1)
  x = x.copy()
  for slot in range(4):
    for op, fn in enumerate(_JITTER_OPS):
      take = np.flatnonzero(order[:, slot] == op)
      if take.size:
        x[take] = fn(x[take], factors[take, op])
  return x


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  size = x.shape[0]
  k = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd kernel, ~10% of the side as in SimCLR
  return cv2.GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def views(images: Sequence[np.ndarray], u: np.ndarray, aug: SimCLRAugment) -> np.ndarray:
  """uint8 [n, V, size, size, 3]: V SimCLR views of each of n uint8 RGB images (any sizes), view j of image i
  drawn from u[i, j] (uniform draws, [n, V, DRAWS_PER_VIEW]).

  The crop and resize run per view (one cv2.resize each); flips, the colour ops and grayscale on the stack of
  views, so a batch of small views costs a few NumPy/OpenCV calls each, not a few per view.
  """
  n, v = u.shape[:2]
  u = u.reshape(n * v, DRAWS_PER_VIEW)
  which = np.repeat(np.arange(n), v)
  heights = np.array([im.shape[0] for im in images])[which]
  widths = np.array([im.shape[1] for im in images])[which]
  boxes = crop_boxes(u, heights, widths, aug.crop_scale, aug.crop_ratio).tolist()
  out = np.empty((n * v, aug.size, aug.size, 3), np.uint8)
  for i, (top, left, h, w) in enumerate(boxes):
    _resize(images[which[i]][top:top + h, left:left + w], (aug.size, aug.size), dst=out[i])
  if aug.flip:
    flip = np.flatnonzero(u[:, _FLIP] < 0.5)
    out[flip] = out[flip, :, ::-1]
  jitter = np.flatnonzero(u[:, _JITTER] < aug.jitter_prob)
  if jitter.size:
    out[jitter] = color_jitter(out[jitter], u[jitter, _ORDER:_GRAY], aug.jitter_strength)
  grey = np.flatnonzero(u[:, _GRAY] < aug.grayscale_prob)
  if grey.size:
    out[grey] = gray(out[grey])[..., None]
  for i in np.flatnonzero(u[:, _BLUR] < aug.blur_prob).tolist():
    lo, hi = aug.blur_sigma
    out[i] = gaussian_blur(out[i], lo + (hi - lo) * u[i, _SIGMA])
  solar = np.flatnonzero(u[:, _SOLARIZE] < aug.solarize_prob)
  if solar.size:
    out[solar] = _SOLARIZE_LUT[out[solar]]
  return out.reshape(n, v, aug.size, aug.size, 3)


def eval_view(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """Resize the shorter side to size / crop_fraction, then take the central size x size crop."""
  height, width = image.shape[:2]
  short = size / crop_fraction
  new_h = max(size, int(round(height * short / min(height, width))))
  new_w = max(size, int(round(width * short / min(height, width))))
  x = _resize(image, (new_h, new_w))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(x[top:top + size, left:left + size])


def normalize(images):
  """uint8 [..., 3] -> float32 standardised with ImageNet mean/std (works on NumPy or jax arrays, use on device)."""
  mean = np.asarray(MEAN_RGB, np.float32) * 255.0
  std = np.asarray(STD_RGB, np.float32) * 255.0
  return (images.astype(np.float32) - mean) / std

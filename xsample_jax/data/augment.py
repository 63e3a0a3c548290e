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
_TOP, _FLIP, _JITTER, _ORDER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = 20, 22, 23, 24, 32, 33, 34, 35


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
  fw = np.where(in_ratio > ratio[1], np.rint(heights * ratio[1]), widths)
  fh = np.where(in_ratio < ratio[0], np.rint(widths / ratio[0]), heights)
  w, h = np.where(none, fw, w).astype(np.int64), np.where(none, fh, h).astype(np.int64)
  top = np.where(none, (heights - h) // 2, (u[:, _TOP] * (heights - h + 1)).astype(np.int64))
  left = np.where(none, (widths - w) // 2, (u[:, _TOP + 1] * (widths - w + 1)).astype(np.int64))
  return np.stack([top, left, h, w], 1)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resize to (h, w); area averaging when shrinking (no aliasing), bilinear when growing."""
  h, w = size
  shrink = h < image.shape[0] or w < image.shape[1]
  return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# Solarize as a lookup table: a level below 128 stays, one at or above becomes 255 - level.
_SOLARIZE_LUT = np.where(np.arange(256) < 128, np.arange(256), 255 - np.arange(256)).astype(np.uint8)


# The jitter ops on uint8 RGB. Each blends the image with a degenerate one, as PIL's ImageEnhance does (what
# torchvision's ColorJitter runs on PIL images, the path of the PyTorch SimCLR and SupCon code), and returns a uint8
# image, rounded and clipped (PIL truncates: tested to agree within a level or two). One OpenCV pass or a few each,
# per image: float32 NumPy blends over a whole stack of views, a call per op, ran 2x slower at 224 px and no faster
# at 32 px.

def gray(x: np.ndarray) -> np.ndarray:
  """uint8 [H, W]: the ITU-R 601 luma of each pixel of uint8 RGB, rounded (PIL's and torchvision's grayscale)."""
  return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)


def _gray3(x: np.ndarray) -> np.ndarray:
  """gray(x) in all three channels."""
  return cv2.cvtColor(gray(x), cv2.COLOR_GRAY2RGB)


def _blend(x: np.ndarray, f: float, y: np.ndarray | None = None, offset: float = 0.0) -> np.ndarray:
  """uint8 x * f + y * (1 - f) + offset (y = None: nothing), rounded and clipped to [0, 255] in one cv2 pass."""
  return cv2.addWeighted(x, f, x if y is None else y, 0.0 if y is None else 1.0 - f, offset)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
  """Blend with black: x * factor."""
  return _blend(x, factor)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
  """Blend with the image's mean grey level."""
  return _blend(x, factor, offset=cv2.mean(gray(x))[0] * (1 - factor))


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
  """Blend with each pixel's grey level."""
  return _blend(x, factor, _gray3(x))


def adjust_hue(x: np.ndarray, turn: float) -> np.ndarray:
  """Turn every pixel's hue by `turn` of a full circle. In float32 HSV: OpenCV's (and PIL's) 8-bit HSV moves dark,
  greyish pixels by up to 7 levels even for a zero turn."""
  hsv = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2HSV)  # H in [0, 360); V (and RGB back) in [0, 255]
  hue = hsv[..., 0]
  hue += turn * 360.0 % 360.0  # in [0, 720): OpenCV's way back wraps hues of 360 and more (not negative ones)
  return cv2.convertScaleAbs(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))  # rounded and clipped to uint8


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _jitter_params(u: np.ndarray, strength: float) -> tuple[list, list]:
  """(orders, factors) of the jitter ops for views' draws u [n, 8]: each view's op order (the argsort of its first
  4 draws: a uniform permutation) and its 4 factors, drawn as torchvision's ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s)
  draws them (brightness, contrast and saturation in [max(0, 1 - 0.8 s), 1 + 0.8 s], hue in [-0.2 s, 0.2 s])."""
  b, h = 0.8 * strength, 0.2 * strength
  lo = max(0.0, 1 - b)
  factors = np.concatenate([lo + (1 + b - lo) * u[:, 4:7], -h + 2 * h * u[:, 7:8]], 1)
  return np.argsort(u[:, :4], axis=1, kind="stable").tolist(), factors.tolist()


def _jitter(x: np.ndarray, order, factors) -> np.ndarray:
  for op in order:
    x = _JITTER_OPS[op](x, factors[op])
  return x


def color_jitter(x: np.ndarray, u: np.ndarray, strength: float) -> np.ndarray:
  """Brightness, contrast, saturation and hue in a random order on a uint8 RGB image; u: its 8 uniform draws, 4 for
  the order and 4 for the factors (`_jitter_params`)."""
  (order,), (factors,) = _jitter_params(np.asarray(u)[None], strength)
  return _jitter(x, order, factors)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  size = x.shape[0]
  k = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd kernel, ~10% of the side as in SimCLR
  return cv2.GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def views(images: Sequence[np.ndarray], u: np.ndarray, aug: SimCLRAugment) -> np.ndarray:
  """uint8 [n, V, size, size, 3]: V SimCLR views of each of n uint8 RGB images (any sizes), view j of image i
  drawn from u[i, j] (uniform draws, [n, V, DRAWS_PER_VIEW]).

  The random parameters of all the views are computed together from the draws, as arrays (a few NumPy calls for
  the lot instead of a dozen generator calls a view); each view is then cropped, resized and coloured with OpenCV
  on uint8.
  """
  n, v = u.shape[:2]
  u = u.reshape(n * v, DRAWS_PER_VIEW)
  heights, widths = np.repeat([im.shape[:2] for im in images], v, axis=0).T
  boxes = crop_boxes(u, heights, widths, aug.crop_scale, aug.crop_ratio).tolist()
  flip = (aug.flip & (u[:, _FLIP] < 0.5)).tolist()
  jitter = (u[:, _JITTER] < aug.jitter_prob).tolist()
  orders, factors = _jitter_params(u[:, _ORDER:_GRAY], aug.jitter_strength)
  grey = (u[:, _GRAY] < aug.grayscale_prob).tolist()
  blur = (u[:, _BLUR] < aug.blur_prob).tolist()
  sigma = (aug.blur_sigma[0] + (aug.blur_sigma[1] - aug.blur_sigma[0]) * u[:, _SIGMA]).tolist()
  solar = (u[:, _SOLARIZE] < aug.solarize_prob).tolist()
  out = np.empty((n * v, aug.size, aug.size, 3), np.uint8)
  for i, (top, left, h, w) in enumerate(boxes):
    x = _resize(images[i // v][top:top + h, left:left + w], (aug.size, aug.size))
    if flip[i]:
      x = cv2.flip(x, 1)
    if jitter[i]:
      x = _jitter(x, orders[i], factors[i])
    if grey[i]:
      x = _gray3(x)
    if blur[i]:
      x = gaussian_blur(x, sigma[i])
    if solar[i]:
      x = cv2.LUT(x, _SOLARIZE_LUT)
    out[i] = x
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

"""SimCLR two-view augmentations and the evaluation transform, in NumPy/OpenCV on the host.

They run inside grain workers, one image at a time, with an `np.random.Generator` keyed by the pipeline's seed and
the example's position in the stream (`pipeline._shuffled`): every sample gets independent randomness, the two views
of one image draw one after the other from that generator (so they differ), and the whole stream is reproducible
for a seed.
Why on the host and not on device in JAX (`benchmarks/input_bench.py` measures both on the same images; runs in
benchmarks/results/): at 224 px the OpenCV path ran 2-5x faster than the same recipe as a jitted, vmapped JAX
function on a CPU backend (per-sample crops of different sizes are one cheap cv2.resize each, while in JAX every crop
is a fixed-shape antialiased resampling of the whole image), it scales with grain worker processes, and it keeps the
accelerator for the model. At the 32 px smoke resolution the procedural renderer that feeds them dominates.

Images are uint8 [H, W, 3] RGB throughout, as PIL's are between torchvision's transforms.
"""
from __future__ import annotations

import dataclasses
import math

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


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
  """rng.uniform(low, high): the same value, computed as NumPy does (low + (high - low) * a standard uniform
  draw), without its ~3 us of argument handling; a view draws six or seven."""
  return low + (high - low) * rng.random()


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a crop covering `scale` of the area with aspect `ratio` (torchvision's 10-try rule)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * _uniform(rng, *scale)
    aspect = math.exp(_uniform(rng, *log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the central crop with the aspect ratio clamped into range.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resize to (h, w); area averaging when shrinking (no aliasing), bilinear when growing."""
  h, w = size
  shrink = h < image.shape[0] or w < image.shape[1]
  return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# Solarize as a lookup table: a level below 128 stays, one at or above becomes 255 - level.
_SOLARIZE = np.where(np.arange(256) < 128, np.arange(256), 255 - np.arange(256)).astype(np.uint8)


def _gray3(x: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma of uint8 RGB, rounded, in all three channels (PIL's and torchvision's grayscale)."""
  return cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _blend(x: np.ndarray, f: float, y: np.ndarray | None = None, offset: float = 0.0) -> np.ndarray:
  """uint8 x * f + y * (1 - f) + offset (y = None: nothing), rounded and clipped to [0, 255] in one cv2 pass."""
  return cv2.addWeighted(x, f, x if y is None else y, 0.0 if y is None else 1.0 - f, offset)


# The jitter ops on uint8 RGB. Each blends the image with a degenerate one, as PIL's ImageEnhance does (what
# torchvision's ColorJitter runs on PIL images, the path of the PyTorch SimCLR and SupCon code), and returns a uint8
# image, rounded and clipped (PIL truncates: tested to agree within a level or two).

def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
  """Blend with black: x * factor."""
  return _blend(x, factor)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
  """Blend with the image's mean grey level."""
  return _blend(x, factor, offset=cv2.mean(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY))[0] * (1 - factor))


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


def color_jitter(x: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Brightness, contrast, saturation and hue in random order, each with a factor drawn as torchvision's
  ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) draws it, on uint8 RGB.

  On uint8, one OpenCV call or a few per op: about 3x faster, at 32 px and at 224 px, than the same ops on float32
  pixels in NumPy (torchvision's tensor path), whose per-call cost dominates at small sizes.
  """
  b = 0.8 * strength
  h = 0.2 * strength
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
  for op in rng.permutation(4).tolist():
    x = ops[op](x, _uniform(rng, -h, h) if op == 3 else _uniform(rng, max(0.0, 1 - b), 1 + b))
  return x


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  size = x.shape[0]
  k = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd kernel, ~10% of the side as in SimCLR
  return cv2.GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def augment_view(image: np.ndarray, rng: np.random.Generator, aug: SimCLRAugment) -> np.ndarray:
  """One SimCLR view of a uint8 RGB image -> uint8 [size, size, 3]."""
  top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], aug.crop_scale, aug.crop_ratio)
  x = _resize(image[top:top + h, left:left + w], (aug.size, aug.size))
  if aug.flip and rng.random() < 0.5:
    x = cv2.flip(x, 1)
  if rng.random() < aug.jitter_prob:
    x = color_jitter(x, rng, aug.jitter_strength)
  if rng.random() < aug.grayscale_prob:
    x = _gray3(x)
  if rng.random() < aug.blur_prob:
    x = gaussian_blur(x, _uniform(rng, *aug.blur_sigma))
  if rng.random() < aug.solarize_prob:
    x = cv2.LUT(x, _SOLARIZE)
  return x


def two_views(image: np.ndarray, rng: np.random.Generator, aug: SimCLRAugment) -> np.ndarray:
  """[2, size, size, 3] uint8: two independent views of one image."""
  return np.stack([augment_view(image, rng, aug), augment_view(image, rng, aug)])


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

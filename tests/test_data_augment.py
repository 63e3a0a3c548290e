"""SimCLR augmentations: deterministic for a seed, independent views, values in range, checked against NumPy."""
import math

import numpy as np
import pytest

from xsample_jax.data import augment


def _image(h=40, w=56, seed=0):
  # A smooth gradient plus noise: crops, flips and colour changes all show.
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
  noise = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


AUG = augment.SimCLRAugment(size=24, solarize_prob=0.2)


def _draws(seed, n=1, views=2):
  return np.random.default_rng(seed).random((n, views, augment.DRAWS_PER_VIEW))


def test_views_deterministic_for_their_draws_different_from_each_other_and_alone_as_in_a_stack():
  img = _image()
  a = augment.views([img], _draws(123), AUG)[0]
  b = augment.views([img], _draws(123), AUG)[0]
  c = augment.views([img], _draws(124), AUG)[0]
  assert a.shape == (2, 24, 24, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])
  # Over many draws the two views almost never coincide and use the whole value range.
  views = augment.views([img] * 30, _draws(0, 30), AUG)
  assert np.mean([np.array_equal(v[0], v[1]) for v in views]) == 0
  assert views.min() < 30 and views.max() > 225
  # An image's views are the same made alone or beside images of other sizes.
  images = [_image(40 + 3 * i, 56 - 2 * i, seed=i) for i in range(12)]
  u = _draws(7, 12, 3)
  stacked = augment.views(images, u, AUG)
  for i in range(12):
    np.testing.assert_array_equal(stacked[i], augment.views([images[i]], u[i:i + 1], AUG)[0])
  # Jitter keeps the image's shape and type whatever the draw, and leaves the caller's array alone.
  before = img.copy()
  for s in range(20):
    y = augment.color_jitter(img, np.random.default_rng(s).random(8), 1.0)
    assert y.shape == img.shape and y.dtype == np.uint8 and not np.array_equal(y, img)
  np.testing.assert_array_equal(img, before)


def _exact_hue(x, turn):
  """The hue turned in float64 HSV (colorsys)."""
  import colorsys
  rgb = [colorsys.hsv_to_rgb((h + turn) % 1.0, s, v) for h, s, v in
         (colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3) / 255.0)]
  return np.array(rgb).reshape(x.shape) * 255


def test_jitter_ops_agree_with_pil_image_enhance():
  """Brightness, contrast and saturation against PIL's ImageEnhance (what torchvision's ColorJitter runs on PIL
  images), which truncates where OpenCV rounds: the same or one level above, never more than two; hue against the
  rotation in float64 HSV, rounded."""
  from PIL import Image, ImageEnhance
  rng = np.random.default_rng(0)
  pil = {augment.adjust_brightness: ImageEnhance.Brightness, augment.adjust_contrast: ImageEnhance.Contrast,
         augment.adjust_saturation: ImageEnhance.Color}
  for ours, enhance in pil.items():
    diffs = []
    for seed in range(20):
      x, f = _image(seed=seed), rng.uniform(0.2, 1.8)
      diffs.append(ours(x, f).astype(int) - np.array(enhance(Image.fromarray(x)).enhance(f)).astype(int))
    d = np.stack(diffs)
    assert -1 <= d.min() and d.max() <= 2 and 0.2 < d.mean() < 0.6, (ours.__name__, d.min(), d.max(), d.mean())
  for seed, turn in enumerate([-1.3, -0.5, -0.1, 0.0, 0.2, 0.5, 1.0, 2.7]):
    x = _image(20, 28, seed=seed)
    assert np.abs(augment.adjust_hue(x, turn) - _exact_hue(x, turn)).max() <= 0.5 + 1e-3, turn


def test_crop_boxes_respect_scale_and_ratio():
  u = np.random.default_rng(0).random((300, augment.DRAWS_PER_VIEW))
  boxes = augment.crop_boxes(u, np.full(300, 60), np.full(300, 80), (0.08, 1.0), (3 / 4, 4 / 3))
  top, left, h, w = boxes.T
  assert (0 <= top).all() and (top + h <= 60).all() and (0 <= left).all() and (left + w <= 80).all()
  # Rounding to whole pixels moves area and aspect slightly outside the sampled ranges.
  assert (0.08 * 4800 * 0.9 <= h * w).all() and (h * w <= 4800).all()
  assert (3 / 4 * 0.85 <= w / h).all() and (w / h <= 4 / 3 * 1.15).all()
  # Crops wander over the whole image.
  assert top.min() == 0 and left.min() == 0 and (top + h).max() == 60 and (left + w).max() == 80
  # Impossible aspect: the central crop with the ratio clamped, beside a fitting one.
  boxes = augment.crop_boxes(u[:2], np.array([10, 60]), np.array([100, 80]), (0.99, 1.0), (1.0, 1.0))
  assert boxes[0].tolist() == [0, 45, 10, 10] and boxes[1, 2] == boxes[1, 3]


def test_jitter_grayscale_and_blur_match_numpy_references():
  x = _image(24, 24)
  gray = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  # Strength 0 leaves colours alone.
  np.testing.assert_array_equal(augment.color_jitter(x, np.random.default_rng(0).random(8), 0.0), x)
  only_gray = augment.SimCLRAugment(size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                                    jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
  out = augment.views([x], _draws(0, views=1), only_gray)[0, 0]
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_allclose(out[..., 0], np.round(gray), atol=1)
  # Gaussian blur against a float64 separable convolution with reflect-101 borders (OpenCV's 8-bit blur rounds).
  sigma = 1.3
  y = augment.gaussian_blur(x, sigma)
  k = 3  # int(0.1 * 24) -> 2 -> odd 3
  t = np.arange(k) - k // 2
  g = np.exp(-t ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  pad = np.pad(x.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
  ref = sum(g[i] * pad[i:i + 24] for i in range(k))
  ref = sum(g[j] * ref[:, j:j + 24] for j in range(k))
  np.testing.assert_allclose(y, ref, atol=1)
  # In views: blurred exactly as gaussian_blur does it, with the view's sigma.
  only_blur = augment.SimCLRAugment(size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                                    jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0)
  u = _draws(1, views=1)
  lo, hi = only_blur.blur_sigma
  np.testing.assert_array_equal(augment.views([x], u, only_blur)[0, 0],
                                augment.gaussian_blur(x, lo + (hi - lo) * u[0, 0, augment._SIGMA]))


def test_solarize_and_flip_only():
  img = _image(24, 24)
  flip_solar = augment.SimCLRAugment(size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0,
                                     grayscale_prob=0.0, blur_prob=0.0, solarize_prob=1.0)
  outs = augment.views([img], _draws(0, views=8), flip_solar)[0]
  x = img.astype(np.float64) / 255
  solar = np.round(np.where(x < 0.5, x, 1 - x) * 255)
  for out in outs:
    assert out.max() <= 128
    assert (np.abs(out - solar).max() <= 1) or (np.abs(out - solar[:, ::-1]).max() <= 1)
  assert any(np.abs(o - solar).max() <= 1 for o in outs) and any(np.abs(o - solar[:, ::-1]).max() <= 1 for o in outs)


def test_eval_view_resizes_shorter_side_and_centre_crops():
  img = _image(64, 96)
  out = augment.eval_view(img, 56, crop_fraction=0.875)  # shorter side 64 = 56 / 0.875: no resize, just the crop
  np.testing.assert_array_equal(out, img[4:60, 20:76])
  small = augment.eval_view(_image(20, 30), 16)
  assert small.shape == (16, 16, 3) and small.dtype == np.uint8


def test_normalize_and_config_validation():
  x = np.full((2, 3), 255, np.uint8)[..., None].repeat(3, -1)
  np.testing.assert_allclose(augment.normalize(x)[0, 0], (1 - np.array(augment.MEAN_RGB)) / augment.STD_RGB,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="crop_scale"):
    augment.SimCLRAugment(crop_scale=(0.0, 1.0))
  with pytest.raises(ValueError, match="probability"):
    augment.SimCLRAugment(blur_prob=1.5)
  assert math.isclose(augment.SimCLRAugment().crop_scale[0], 0.08)

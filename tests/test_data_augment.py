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


def test_two_views_deterministic_for_a_seed_and_different_from_each_other():
  img = _image()
  a = augment.two_views(img, np.random.default_rng(123), AUG)
  b = augment.two_views(img, np.random.default_rng(123), AUG)
  c = augment.two_views(img, np.random.default_rng(124), AUG)
  assert a.shape == (2, 24, 24, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert not np.array_equal(a[0], a[1])
  # Over many seeds the two views almost never coincide and use the whole value range.
  views = np.stack([augment.two_views(img, np.random.default_rng(s), AUG) for s in range(30)])
  assert np.mean([np.array_equal(v[0], v[1]) for v in views]) == 0
  assert views.min() < 30 and views.max() > 225
  # The float stages stay inside [0, 1] whatever the draw.
  x = img.astype(np.float32) / 255
  for s in range(20):
    y = augment.color_jitter(x, np.random.default_rng(s), 1.0)
    assert y.dtype == np.float32 and y.min() >= 0 and y.max() <= 1


def _plain_jitter(x, rng, strength):
  """color_jitter as plain NumPy expressions (fresh arrays, np.clip, np.mod), the draws in the same order."""
  import cv2
  b = c = s = 0.8 * strength
  h = 0.2 * strength
  luma = np.array([0.299, 0.587, 0.114], np.float32)
  for op in rng.permutation(4):
    if op == 0:
      x = x * rng.uniform(max(0.0, 1 - b), 1 + b)
    elif op == 1:
      mean = (x @ luma).mean()
      x = (x - mean) * rng.uniform(max(0.0, 1 - c), 1 + c) + mean
    elif op == 2:
      g = (x @ luma)[..., None]
      x = (x - g) * rng.uniform(max(0.0, 1 - s), 1 + s) + g
    else:
      shift = rng.uniform(-h, h) * 360.0
      hsv = cv2.cvtColor(np.clip(x, 0, 1), cv2.COLOR_RGB2HSV)
      hsv[..., 0] = np.mod(hsv[..., 0] + shift, 360.0)
      x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    x = np.clip(x, 0.0, 1.0)
  return x


@pytest.mark.parametrize("strength", [0.5, 1.0, 6.0])  # 6.0: hue shifts past a full turn take np.mod
def test_in_place_color_jitter_gives_the_plain_expressions_pixels(strength):
  for seed in range(40):
    x = np.random.default_rng(seed).random((13, 17, 3), dtype=np.float32) * 1.2 - 0.1
    before = x.copy()
    got = augment.color_jitter(x, np.random.default_rng(seed), strength)
    np.testing.assert_array_equal(got, _plain_jitter(x, np.random.default_rng(seed), strength))
    np.testing.assert_array_equal(x, before)  # the caller's array is left alone


def test_random_resized_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = augment.random_resized_crop_box(rng, 60, 80, (0.08, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
    # Rounding to whole pixels moves area and aspect slightly outside the sampled ranges.
    assert 0.08 * 4800 * 0.9 <= h * w <= 4800
    assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
  # Impossible aspect: the central crop with the ratio clamped.
  assert augment.random_resized_crop_box(rng, 10, 100, (0.99, 1.0), (1.0, 1.0)) == (0, 45, 10, 10)


def test_jitter_grayscale_and_blur_match_numpy_references():
  x = _image(24, 24).astype(np.float32) / 255
  gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
  # Strength 0 leaves colours alone (hue rotation by 0 degrees round-trips through HSV).
  np.testing.assert_allclose(augment.color_jitter(x, np.random.default_rng(0), 0.0), x, atol=2e-6)
  only_gray = augment.SimCLRAugment(size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False,
                                    jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
  out = augment.augment_view(_image(24, 24), np.random.default_rng(0), only_gray)
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_allclose(out[..., 0], np.round(gray * 255), atol=1)
  # Gaussian blur against a float64 separable convolution with reflect-101 borders.
  sigma = 1.3
  y = augment.gaussian_blur(x, sigma)
  k = 3  # int(0.1 * 24) -> 2 -> odd 3
  t = np.arange(k) - k // 2
  g = np.exp(-t ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  pad = np.pad(x.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
  ref = sum(g[i] * pad[i:i + 24] for i in range(k))
  ref = sum(g[j] * ref[:, j:j + 24] for j in range(k))
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_solarize_and_flip_only():
  img = _image(24, 24)
  flip_solar = augment.SimCLRAugment(size=24, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0,
                                     grayscale_prob=0.0, blur_prob=0.0, solarize_prob=1.0)
  outs = [augment.augment_view(img, np.random.default_rng(s), flip_solar) for s in range(8)]
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

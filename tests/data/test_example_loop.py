"""The CPU path of the photometric ops (one example at a time, planar) against the references.

Each planar op against torchvision's float kernels (`torchvision.transforms.v2.functional`) or
Pillow's `GaussianBlur`, with the tolerances of test_device_ops; then whole views: the looped
path (`example_loop.apply_batch`, what `apply_photometric` runs on the CPU) against the vmapped
path (`device_ops.apply_vmapped`, the accelerators'), draw for draw, for every op and option.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageFilter

from photometric_specs import DINO_GLOBAL_2
from photometric_specs import MOCO_V2
from retro_jax.data import blur
from retro_jax.data import device_ops
from retro_jax.data import example_loop
from retro_jax.data import planar

# float32 op for op against torchvision's float32 kernels: only rounding differs.
FLOAT_ATOL = 1e-5


def planes(photo: np.ndarray) -> np.ndarray:
  return photo.transpose(2, 0, 1).astype(np.float32) / 255.0


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


_PLANAR_OPS = {
    "brightness": (planar.adjust_brightness, F.adjust_brightness, [0.0, 0.6, 1.0, 1.37, 2.0]),
    "contrast": (planar.adjust_contrast, F.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 2.0]),
    "saturation": (planar.adjust_saturation, F.adjust_saturation, [0.0, 0.6, 1.0, 1.4, 2.0]),
    "hue": (planar.adjust_hue, F.adjust_hue,
            [-0.5, -0.4999, -0.25, -0.1, 0.0, 0.033, 0.1, 0.37, 0.4999, 0.5]),
}


@pytest.mark.parametrize("name", list(_PLANAR_OPS))
def test_planar_color_op_matches_torchvision(photos, name):
  ours, reference, factors = _PLANAR_OPS[name]
  ours = jax.jit(ours)
  for photo in photos:
    x = planes(photo)
    for factor in factors:
      expected = reference(torch.from_numpy(x), factor).numpy()
      assert max_diff(ours(jnp.asarray(x), jnp.float32(factor)), expected) <= FLOAT_ATOL, (
          name, factor)


def test_planar_grayscale_and_normalize_match_torchvision(photos):
  x = planes(photos[1])
  expected = F.rgb_to_grayscale(torch.from_numpy(x), 3).numpy()
  assert max_diff(planar.grayscale(jnp.asarray(x)), expected) <= FLOAT_ATOL
  mean, std = device_ops.IMAGENET_MEAN, device_ops.IMAGENET_STD
  expected = F.normalize(torch.from_numpy(x), list(mean), list(std)).numpy()
  assert max_diff(planar.normalize(jnp.asarray(x), mean, std), expected) <= FLOAT_ATOL


BLUR_SIGMAS = [0.1, 0.3, 0.7, 1.0, 1.41, 1.42, 2.0]
_planar_blur = jax.jit(planar.pil_gaussian_blur, static_argnums=2)


def test_planar_blur_equals_the_channels_last_blur_and_is_near_pillow(photos):
  """The same extended-box filter as `blur.pil_gaussian_blur` (3- and 5-tap branches, edge
  columns, a 3 px wide image), and so within Pillow's rounding of Pillow (test_device_ops)."""
  for sigma in BLUR_SIGMAS:
    for photo in photos[:3]:
      x = planes(photo)
      ours = np.asarray(_planar_blur(jnp.asarray(x), jnp.float32(sigma), 2.0))
      channels_last = blur.pil_gaussian_blur(jnp.asarray(x.transpose(1, 2, 0)), sigma, 2.0)
      assert max_diff(ours.transpose(1, 2, 0), channels_last) <= FLOAT_ATOL, sigma
      pil = np.asarray(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(sigma)))
      assert max_diff(ours.transpose(1, 2, 0) * 255.0, pil) <= 3.0 + 1e-3, sigma
    narrow = planes(photos[0])[:, :, :3]
    assert max_diff(_planar_blur(jnp.asarray(narrow), jnp.float32(sigma), 2.0).transpose(1, 2, 0),
                    blur.pil_gaussian_blur(jnp.asarray(narrow.transpose(1, 2, 0)), sigma, 2.0)
                    ) <= FLOAT_ATOL


SPECS = {
    "mocov2": MOCO_V2,
    "dino_global_2": DINO_GLOBAL_2,
    "always, some jitter ops off": {
        "color_jitter": {"p": 1.0, "brightness": 0.4, "hue": 0.5},
        "grayscale": {"p": 0.5}, "gaussian_blur": {"p": 1.0, "sigma": (0.1, 3.0)},
        "solarize": {"p": 0.5, "threshold": 0.3}},
    "quantized blur, never jitter": {
        "color_jitter": {"p": 0.0, "brightness": 0.4},
        "gaussian_blur": {"p": 0.7, "quantize": True}, "normalize": {}},
    "sampled gaussian blur": {"gaussian_blur": {"p": 0.7, "method": "gaussian"}},
}


@pytest.mark.parametrize("name", list(SPECS))
def test_looped_views_equal_vmapped_views(photos, name):
  """Same draws, same ops: the CPU loop equals the vmapped path up to float32 rounding, for
  uint8 and float inputs. Measured: at most 2.2e-6 apart (normalised views)."""
  spec = device_ops.PhotometricSpec.from_config(SPECS[name])
  images = np.resize(photos, (16,) + photos.shape[1:])
  key = jax.random.key(3)
  params = jax.vmap(lambda k: device_ops.sample_params(k, spec))(
      device_ops.example_keys(key, 16))
  vmapped = jax.jit(device_ops.apply_vmapped, static_argnums=2)(images, params, spec)
  looped = jax.jit(example_loop.apply_batch, static_argnums=2)(images, params, spec)
  assert looped.dtype == jnp.float32 and looped.shape == images.shape
  # Normalised views are ~4.4x the [0, 1] values: the bound scales with them.
  bound = FLOAT_ATOL * (1.0 / min(device_ops.IMAGENET_STD) if "normalize" in SPECS[name] else 1)
  assert max_diff(looped, vmapped) <= bound
  floats = jax.jit(example_loop.apply_batch, static_argnums=2)(
      jnp.asarray(images, jnp.float32) / 255.0, params, spec)
  assert max_diff(floats, looped) <= bound
  whole = jax.jit(device_ops.apply_photometric, static_argnums=2)(key, images, spec)
  assert max_diff(whole, looped) <= bound

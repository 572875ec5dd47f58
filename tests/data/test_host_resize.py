"""The host resize (two row passes) against `tf.image.resize` and PIL's antialiased resize.

`host_resize.resize_float` reorganises `tf.image.resize(antialias=True)` (ScaleAndTranslate)
into two vectorised row passes with transposes: the weights and the order of every sum are the
same, so the float results must be equal bit for bit, downscaling, upscaling or both, for both
filters; the uint8 rounding must be PIL's (half up, clipped). Against Pillow itself (what
torchvision's `resized_crop` calls), `test_host_ops.test_resized_crop_matches_torchvision`
bounds the difference at 1 level for bilinear; here the same bound is checked on the random
crops of the MoCo-v2 benchmark's image sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from retro_jax.data import host_resize

tf = host_resize.tf

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# (input height, width) -> (output height, width): down, up, mixed, identity, one pixel.
SHAPES = [((300, 400), (224, 224)), ((97, 83), (224, 224)), ((150, 200), (224, 96)),
          ((224, 224), (224, 224)), ((427, 640), (256, 383)), ((1, 7), (5, 3))]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
  return load_sample_images().images[0]  # china.jpg, 427 x 640


def old_resize(image, height, width, method):
  """What `host_ops.resize` computed before: one tf.image.resize, floor(x + 0.5), clip."""
  y = tf.image.resize(image, [height, width], method=method, antialias=True)
  return y, tf.cast(tf.clip_by_value(tf.floor(y + 0.5), 0.0, 255.0), tf.uint8)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_two_row_passes_equal_tf_image_resize_bit_for_bit(photo, method):
  for (h, w), (out_h, out_w) in SHAPES:
    crop = tf.constant(photo[50:50 + h, 70:70 + w])
    expected_float, expected = old_resize(crop, out_h, out_w, method)
    actual_float = host_resize.resize_float(crop, out_h, out_w, method)
    np.testing.assert_array_equal(actual_float.numpy(), expected_float.numpy())
    actual = host_resize.resize(crop, out_h, out_w, method)
    assert actual.dtype == tf.uint8
    np.testing.assert_array_equal(actual.numpy(), expected.numpy())


def test_rounding_is_half_up_and_clipped():
  x = tf.constant([-3.0, -0.6, -0.5, -0.4, 0.49, 0.5, 1.5, 2.5, 254.5, 254.6, 255.4, 255.5, 300.0])
  expected = np.array([0, 0, 0, 0, 0, 1, 2, 3, 255, 255, 255, 255, 255], np.uint8)
  np.testing.assert_array_equal(host_resize.to_uint8(x).numpy(), expected)


def test_random_crops_are_within_one_level_of_pillow(photo):
  """MoCo-v2's crops of ImageNet-sized images (scale 0.2-1 of ~500 x 375) to 224, in tf.data
  (graph mode): at most 1 level from Pillow's bilinear resize, ~0.15 on average."""
  rng = np.random.default_rng(0)
  boxes = []
  for _ in range(12):
    h, w = (int(v) for v in rng.integers(120, 420, 2))
    boxes.append((int(rng.integers(0, 427 - h)), int(rng.integers(0, 640 - w)), h, w))
  image = tf.constant(photo)
  ds = tf.data.Dataset.from_tensor_slices(np.array(boxes, np.int32)).map(
      lambda box: host_resize.resize(image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]],
                                     224, 224))
  for (top, left, h, w), ours in zip(boxes, ds.as_numpy_iterator()):
    ref = np.asarray(Image.fromarray(photo[top:top + h, left:left + w]).resize(
        (224, 224), PIL_FILTERS["bilinear"]))
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() <= 0.25, ((top, left, h, w), diff.max(), diff.mean())

"""Host-side geometric augmentation against torchvision's transforms on PIL images.

References: `RandomResizedCrop.get_params` (crop-box distribution, by two-sample KS tests with
fixed seeds), `functional.resized_crop` and `Resize` + `CenterCrop` on PIL images (pixels),
PIL's JPEG decoder. Images are real: scikit-learn's two sample photos and Fashion-MNIST.
Every public op runs inside `tf.data` (graph mode) at least once, as the input pipeline runs
it; a few large comparisons run eagerly because their graphs take seconds to build.
"""

from __future__ import annotations

import gzip
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from sklearn.datasets import load_sample_images

from retro_jax.data import host_ops
from retro_jax.data.host_ops import CropSpec

tf = host_ops.tf

PIL_MODES = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
NUM_DRAWS = 3000
# Two-sample tests must not reject at this level. The seeds are fixed, so the tests are
# deterministic; measured on wrong samplers with the same draws, an aspect ratio drawn
# uniformly instead of log-uniformly gives KS p = 7e-7 (log ratio, 375 x 500) and a fallback
# to the whole image p < 1e-60 (200 x 40).
MIN_P = 1e-3


def tf_data(fn, *inputs):
  """fn(*inputs) computed inside a tf.data map (graph mode), as NumPy."""
  ds = tf.data.Dataset.from_tensors(tuple(inputs)).map(fn)
  return tf.nest.map_structure(np.asarray, ds.get_single_element())


def eager(fn, *inputs):
  """fn(*inputs) run eagerly, as NumPy: for comparisons whose graph would take long to build."""
  return tf.nest.map_structure(np.asarray, fn(*(tf.constant(x) for x in inputs)))


def tf_data_per_seed(fn, seeds: np.ndarray):
  """fn(seed) for every row of `seeds` [N, 2], mapped over a tf.data pipeline, stacked."""
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(fn).batch(len(seeds))
  return tf.nest.map_structure(np.asarray, ds.get_single_element())


def example_seeds(n: int, run_seed: int = 0) -> np.ndarray:
  """Seeds [n, 2] of examples 0..n-1, as a pipeline would form them: (run seed, index)."""
  return np.stack([np.full(n, run_seed), np.arange(n)], axis=1).astype(np.int32)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
  """scikit-learn's two sample photos (427 x 640 x 3, CC BY 2.0)."""
  return list(load_sample_images().images)


@pytest.fixture(scope="module")
def fashion_images(fashion_mnist_dir) -> np.ndarray:
  """The first 16 Fashion-MNIST test images, uint8 [16, 28, 28]."""
  with gzip.open(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz") as f:
    data = f.read(16 + 16 * 28 * 28)
  return np.frombuffer(data, np.uint8, offset=16).reshape(16, 28, 28)


def encode(image: np.ndarray, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kwargs)
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Crop-box distribution: RandomResizedCrop.get_params.

def torchvision_boxes(height: int, width: int, scale, ratio, n: int) -> np.ndarray:
  torch.manual_seed(0)
  image = torch.empty((1, height, width), dtype=torch.uint8)
  return np.array([T.RandomResizedCrop.get_params(image, list(scale), list(ratio))
                   for _ in range(n)])


def torchvision_fallback(height: int, width: int, ratio) -> tuple[int, int, int, int]:
  """The box get_params returns when all 10 attempts fail: run it with a scale that never fits."""
  image = torch.empty((1, height, width), dtype=torch.uint8)
  return T.RandomResizedCrop.get_params(image, [100.0, 100.0], list(ratio))


def our_boxes(height: int, width: int, scale, ratio, n: int) -> np.ndarray:
  return tf_data_per_seed(lambda s: host_ops.crop_box(s, height, width, scale, ratio),
                          example_seeds(n, run_seed=1))


def box_statistics(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
  top, left, h, w = boxes.T.astype(np.float64)
  return {"area": h * w / (height * width), "log_ratio": np.log(w / h),
          "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}


CROP_CASES = [
    # (height, width, scale, ratio, fallback rate > 0.02?)
    (375, 500, (0.08, 1.0), (3 / 4, 4 / 3), False),  # ImageNet-like, torchvision's default
    (427, 640, (0.05, 0.4), (3 / 4, 4 / 3), False),  # DINO local crop
    (28, 28, (0.2, 1.0), (3 / 4, 4 / 3), False),  # Fashion-MNIST, MoCo-v2: coarse rounding
    (200, 40, (0.08, 1.0), (3 / 4, 4 / 3), True),  # tall: ~1 in 5 draws falls back
    (40, 200, (0.08, 1.0), (3 / 4, 4 / 3), True),  # wide: the other fallback branch
]


@pytest.mark.parametrize("height,width,scale,ratio,falls_back", CROP_CASES)
def test_crop_box_distribution_matches_torchvision(height, width, scale, ratio, falls_back):
  ours = our_boxes(height, width, scale, ratio, NUM_DRAWS)
  ref = torchvision_boxes(height, width, scale, ratio, NUM_DRAWS)
  assert ours.dtype == np.int32 and ours.shape == (NUM_DRAWS, 4)
  top, left, h, w = ours.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()

  ours_stats, ref_stats = box_statistics(ours, height, width), box_statistics(ref, height, width)
  for name in ours_stats:
    p = stats.ks_2samp(ours_stats[name], ref_stats[name]).pvalue
    assert p > MIN_P, f"{name}: KS p = {p:.2g}"

  fallback = torchvision_fallback(height, width, ratio)
  ours_fb = int((ours == fallback).all(axis=1).sum())
  ref_fb = int((ref == fallback).all(axis=1).sum())
  assert (min(ours_fb, ref_fb) > 0.02 * NUM_DRAWS) == falls_back
  p = stats.fisher_exact([[ours_fb, NUM_DRAWS - ours_fb], [ref_fb, NUM_DRAWS - ref_fb]]).pvalue
  assert p > MIN_P, f"fallback rate {ours_fb} vs {ref_fb} of {NUM_DRAWS}: p = {p:.2g}"


@pytest.mark.parametrize("height,width,ratio", [(1000, 40, (3 / 4, 4 / 3)),
                                                (40, 1000, (3 / 4, 4 / 3)),
                                                (101, 2, (0.5, 2.0))])
def test_crop_box_fallback_is_torchvision_centre_crop(height, width, ratio):
  # At these shapes no attempt ever fits, so every draw is torchvision's fallback.
  expected = torchvision_fallback(height, width, ratio)
  assert (torchvision_boxes(height, width, (0.08, 1.0), ratio, 200) == expected).all()
  assert (our_boxes(height, width, (0.08, 1.0), ratio, 200) == expected).all()


# ---------------------------------------------------------------------------------------------
# Pixels of one crop box: functional.resized_crop on a PIL image.

RESIZE_CASES = [
    # (photo, box (top, left, h, w), output size): downscaling, then upscaling.
    (0, (10, 20, 300, 400), 224),
    (1, (0, 0, 427, 640), 96),
    (0, (101, 33, 257, 171), 96),
    (1, (50, 60, 97, 83), 224),
    (0, (3, 5, 20, 31), 96),
    (1, (200, 300, 150, 200), 224),  # both ways: 150 -> 224 rows, 200 -> 224 columns
]
# Measured over RESIZE_CASES (uint8 levels, |ours - torchvision|): one pass, bilinear max 1,
# mean <= 0.15; bicubic max 7 on a few pixels of sharp edges (PIL clips its uint8
# intermediate), mean <= 0.17, <= 5e-4 of values above 1. With PIL's order and rounding:
# max 1, mean <= 0.004. The box shifted by one source row differs from ours by 0.5-7.5 levels
# on average, 5-40 times our own difference.
BOUNDS = {  # (max, mean, fraction above 1 level)
    ("bilinear", False): (1, 0.25, 0.0),
    ("bicubic", False): (10, 0.25, 1e-3),
    ("bilinear", True): (1, 0.02, 0.0),
    ("bicubic", True): (1, 0.02, 0.0),
}


def abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  assert a.shape == b.shape, (a.shape, b.shape)
  return np.abs(a.astype(np.int16) - b.astype(np.int16))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("pil_rounding", [False, True])
def test_resized_crop_matches_torchvision(photos, interpolation, pil_rounding):
  max_bound, mean_bound, frac_bound = BOUNDS[interpolation, pil_rounding]
  views = tf_data(lambda *images: tuple(
      host_ops.resized_crop(images[index], box, size, interpolation, pil_rounding)
      for index, box, size in RESIZE_CASES), *photos)
  for (index, box, size), ours in zip(RESIZE_CASES, views):
    source = Image.fromarray(photos[index])
    ref = np.asarray(TF.resized_crop(source, *box, [size, size], PIL_MODES[interpolation]))
    diff = abs_diff(ours, ref)
    assert diff.max() <= max_bound and diff.mean() <= mean_bound, (box, diff.max(), diff.mean())
    assert (diff > 1).mean() <= frac_bound, box
    # The bound is tight enough to see a one-pixel shift of the box.
    shifted = np.asarray(TF.resized_crop(source, box[0] + 1, box[1], *box[2:], [size, size],
                                         PIL_MODES[interpolation]))
    assert abs_diff(ours, shifted).mean() > 3 * diff.mean() + 0.1, box


# ---------------------------------------------------------------------------------------------
# Decoding: PIL's pixels, and the fused decode-and-crop.

@pytest.fixture(scope="module")
def jpegs(photos) -> dict[str, bytes]:
  """Each photo as JPEG with 4:4:4, 4:2:2 and 4:2:0 chroma, and progressive."""
  out = {}
  for i, photo in enumerate(photos):
    for name, kwargs in [("444", {"subsampling": 0}), ("422", {"subsampling": 1}),
                         ("420", {"subsampling": 2}), ("progressive", {"progressive": True})]:
      out[f"{i}-{name}"] = encode(photo, "JPEG", quality=90, **kwargs)
  return out


def test_decode_image_equals_pil(jpegs, photos):
  names, files = list(jpegs), list(jpegs.values()) + [encode(photos[0], "PNG")]
  decoded = tf.data.Dataset.from_tensor_slices(files).map(host_ops.decode_image)
  for name, data, ours in zip(names + ["png"], files, decoded.as_numpy_iterator()):
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(ours, pil, err_msg=name)


def test_fused_jpeg_decode_crop_equals_full_decode_then_crop(jpegs):
  rng = np.random.default_rng(0)
  height, width = 427, 640
  boxes = [(0, 0, height, width), (0, 0, 1, 1), (height - 5, width - 7, 5, 7), (16, 32, 64, 48)]
  for _ in range(40):
    h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
    boxes.append((rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w))
  boxes = np.array(boxes, np.int32)
  files = list(jpegs.values())
  full = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in files]
  which = np.repeat(np.arange(len(files)), len(boxes))
  all_boxes = np.tile(boxes, (len(files), 1))
  contents = tf.constant(files)
  crops = tf.data.Dataset.from_tensor_slices((which, all_boxes)).map(
      lambda i, box: host_ops.decode_crop(contents[i], box))
  for i, (top, left, h, w), crop in zip(which, all_boxes, crops.as_numpy_iterator()):
    np.testing.assert_array_equal(crop, full[i][top:top + h, left:left + w],
                                  err_msg=f"{list(jpegs)[i]} {(top, left, h, w)}")


def test_encoded_and_decoded_views_are_equal(photos, jpegs):
  # Fused decode-and-crop per view, decode once, and the decoded-tensor path give the same views.
  specs = [CropSpec(64, (0.2, 1.0)), CropSpec(32, (0.05, 0.4), interpolation="bicubic")]
  seed = np.array([5, 11], np.int32)

  def all_paths(jpeg, png, photo, s):
    return {
        "photo": host_ops.multi_crop(photo, s, specs),
        **{f"{name}-decoded": host_ops.multi_crop(host_ops.decode_image(data), s, specs)
           for name, data in (("jpeg", jpeg), ("png", png))},
        **{f"{name}-{n}": host_ops.multi_crop(data, s, specs, fused_max_views=n)
           for name, data in (("jpeg", jpeg), ("png", png)) for n in (0, 2)},
    }

  views = eager(all_paths, jpegs["0-420"], encode(photos[0], "PNG"), photos[0], seed)
  for name in ("jpeg", "png"):
    for n in (0, 2):
      for view, ref in zip(views[f"{name}-{n}"], views[f"{name}-decoded"]):
        np.testing.assert_array_equal(view, ref, err_msg=f"{name} fused_max_views={n}")
  for view, ref in zip(views["png-decoded"], views["photo"]):  # PNG is lossless
    np.testing.assert_array_equal(view, ref)


# ---------------------------------------------------------------------------------------------
# Flip, determinism, grayscale.

def test_flip_is_exact_and_half_the_time(photos):
  image = photos[1][::3, ::3]  # small, to keep the test fast
  seeds = example_seeds(100, run_seed=3)
  never = tf_data_per_seed(
      lambda s: host_ops.random_resized_crop(image, s, CropSpec(32, flip_prob=0.0)), seeds)
  always = tf_data_per_seed(
      lambda s: host_ops.random_resized_crop(image, s, CropSpec(32, flip_prob=1.0)), seeds)
  half = tf_data_per_seed(
      lambda s: host_ops.random_resized_crop(image, s, CropSpec(32, flip_prob=0.5)), seeds)
  np.testing.assert_array_equal(always, never[:, :, ::-1])
  flipped = np.array([np.array_equal(h, a) and not np.array_equal(h, n)
                      for h, a, n in zip(half, always, never)])
  kept = np.array([np.array_equal(h, n) for h, n in zip(half, never)])
  assert (flipped | kept).all() and 0 < flipped.sum() < len(seeds)

  # The flip on its own, over many seeds: torchvision's RandomHorizontalFlip(0.5).
  row = np.arange(6, dtype=np.uint8).reshape(1, 6, 1)
  out = tf_data_per_seed(lambda s: host_ops.random_flip(row, s), example_seeds(2000))
  is_flipped = (out[:, 0, 0, 0] == 5)
  assert ((out == row[:, ::-1]).all(axis=(1, 2, 3)) == is_flipped).all()
  assert ((out == row).all(axis=(1, 2, 3)) == ~is_flipped).all()
  p = stats.binomtest(int(is_flipped.sum()), len(is_flipped), 0.5).pvalue
  assert p > MIN_P, (is_flipped.mean(), p)


def test_same_seed_same_views_other_example_other_crops(jpegs):
  dino = [CropSpec(64, (0.4, 1.0), interpolation="bicubic")] * 2 + [
      CropSpec(24, (0.05, 0.4), interpolation="bicubic")] * 4
  data = jpegs["1-420"]
  seeds = example_seeds(6, run_seed=42)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: host_ops.multi_crop(tf.constant(data), s, dino), num_parallel_calls=2,
      deterministic=True)
  first, second = list(ds.as_numpy_iterator()), list(ds.as_numpy_iterator())
  for a, b in zip(first, second):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  assert [v.shape for v in first[0]] == [(64, 64, 3)] * 2 + [(24, 24, 3)] * 4
  # Views of one example differ from each other, and view 0 differs between examples.
  for example in first:
    assert not np.array_equal(example[0], example[1])
    assert not np.array_equal(example[2], example[3])
  assert all(not np.array_equal(first[0][0], first[i][0]) for i in range(1, 6))
  boxes = our_boxes(427, 640, (0.08, 1.0), (3 / 4, 4 / 3), 50)
  assert len({tuple(b) for b in boxes}) == 50


def test_grayscale_sources_become_three_equal_channels(fashion_images, photos):
  gray = fashion_images[0]
  spec = CropSpec(32, (0.2, 1.0))
  seed = np.array([0, 9], np.int32)
  photo_gray = np.asarray(Image.fromarray(photos[0]).convert("L"))
  gray_jpeg, gray_png = encode(photo_gray, "JPEG", quality=95), encode(photo_gray, "PNG")

  def views(gray, rgb, jpeg, png, s):
    return {"gray": host_ops.random_resized_crop(gray, s, spec),
            "rgb": host_ops.random_resized_crop(rgb, s, spec),
            "jpeg": host_ops.decode_image(jpeg), "png": host_ops.decode_image(png),
            "jpeg_view": host_ops.random_resized_crop_encoded(jpeg, s, spec),
            "png_view": host_ops.random_resized_crop_encoded(png, s, spec)}

  out = tf_data(views, gray[..., None], np.repeat(gray[..., None], 3, axis=-1), gray_jpeg,
                gray_png, seed)
  assert out["gray"].shape == (32, 32, 3)
  np.testing.assert_array_equal(out["gray"], out["rgb"])
  assert (out["gray"] == out["gray"][..., :1]).all()
  for name, data in (("jpeg", gray_jpeg), ("png", gray_png)):
    decoded = out[name]
    assert decoded.shape == (427, 640, 3) and (decoded == decoded[..., :1]).all()
    np.testing.assert_array_equal(decoded[..., 0], np.asarray(Image.open(io.BytesIO(data))))
    view = out[f"{name}_view"]
    assert view.shape == (32, 32, 3) and (view == view[..., :1]).all()
  # Unknown channel count (a TFDS feature of shape [None, None, None]).
  dynamic = tf.data.Dataset.from_generator(
      lambda: iter([gray[..., None]]),
      output_signature=tf.TensorSpec([None, None, None], tf.uint8))
  view = dynamic.map(lambda x: host_ops.random_resized_crop(x, seed, spec)).get_single_element()
  np.testing.assert_array_equal(view, out["gray"])


# ---------------------------------------------------------------------------------------------
# Evaluation: Resize + CenterCrop.

@pytest.mark.parametrize("height,width,interpolation", [
    (333, 517, "bilinear"), (517, 333, "bicubic"), (257, 300, "bicubic"), (300, 300, "bilinear")])
def test_eval_view_matches_torchvision_resize_center_crop(photos, interpolation, height, width):
  source = np.asarray(Image.fromarray(photos[0]).resize((width, height), Image.BILINEAR))
  sizes = (224, 96)
  ours = tf_data(lambda x, png: (
      *(host_ops.eval_view(x, size, interpolation=interpolation) for size in sizes),
      host_ops.eval_view(png, sizes[-1], interpolation=interpolation)),
      source, encode(source, "PNG"))
  mode = PIL_MODES[interpolation]
  max_bound, mean_bound, _ = BOUNDS[interpolation, False]
  for size, view in zip(sizes, ours):
    ref = np.asarray(T.Compose([T.Resize(round(size * 256 / 224), mode),
                                T.CenterCrop(size)])(Image.fromarray(source)))
    diff = abs_diff(view, ref)
    assert diff.max() <= max_bound and diff.mean() <= mean_bound, (size, diff.max(), diff.mean())
    # Our crop is where torchvision's is: one pixel further in any direction matches worse.
    for shifted_view, shifted_ref in ((view[1:], ref[:-1]), (view[:-1], ref[1:]),
                                      (view[:, 1:], ref[:, :-1]), (view[:, :-1], ref[:, 1:])):
      assert abs_diff(shifted_view, shifted_ref).mean() > 3 * diff.mean() + 0.1
  np.testing.assert_array_equal(ours[-1], ours[-2])  # encoded (lossless PNG) = decoded


def test_eval_view_low_resolution_fashion_mnist(fashion_images):
  # 28 px grey images: shorter side to 32, keep all of it (crop_fraction 1).
  images = fashion_images[..., None]
  ours = tf.data.Dataset.from_tensor_slices(images).map(
      lambda x: (host_ops.eval_view(x, 32, crop_fraction=1.0),
                 host_ops.eval_view(x, 28, crop_fraction=1.0)))
  for image, (view, same) in zip(fashion_images, ours.as_numpy_iterator()):
    ref = np.asarray(T.Compose([T.Resize(32), T.CenterCrop(32)])(Image.fromarray(image)))
    assert view.shape == (32, 32, 3) and (view == view[..., :1]).all()
    diff = abs_diff(view[..., 0], ref)
    assert diff.max() <= 1 and diff.mean() <= 0.25
    # At the native size the view is the image itself, as torchvision's Resize(28) is a no-op.
    np.testing.assert_array_equal(same[..., 0], image)


def test_invalid_parameters_are_rejected():
  with pytest.raises(ValueError, match="scale"):
    CropSpec(224, scale=(0.5, 0.2))
  with pytest.raises(ValueError, match="ratio"):
    CropSpec(224, ratio=(0.0, 1.0))
  with pytest.raises(ValueError, match="flip_prob"):
    CropSpec(224, flip_prob=1.5)
  with pytest.raises(ValueError, match="interpolation"):
    CropSpec(224, interpolation="nearest")
  with pytest.raises(ValueError, match="crop_fraction"):
    host_ops.eval_view(tf.zeros([8, 8, 3], tf.uint8), 8, crop_fraction=1.5)
  assert math.isclose(CropSpec(224).ratio[1], 4 / 3)

"""Host-side geometric augmentation in TensorFlow, with torchvision's semantics.

The host decodes, crops, resizes and flips; the device does the photometric rest. Every
function here is pure TensorFlow, usable inside `tf.data.Dataset.map`, and draws its random
numbers statelessly from a `seed` tensor of shape [2] that the caller derives from (run seed,
step or epoch, example index), e.g. `stateless_fold_in(tf.stack([run_seed, epoch]), index)`;
sub-seeds come from `stateless_split` / `stateless_fold_in`. Views are uint8 [size, size, 3].

What "torchvision's semantics" means, op by op (the reference pipelines of MoCo-v2, DINO and
MSN call torchvision's transforms on PIL images):
  * `crop_box` is `RandomResizedCrop.get_params`: 10 attempts with area ~ U(scale) and
    log-aspect ~ U(log ratio), sides rounded half to even like Python's `round`, the first
    attempt that fits wins, else a centre crop clamped to the ratio range. The 10 attempts are
    drawn at once and the first valid one is taken, which has the same distribution.
  * `resize` is PIL's `Image.resize` with BILINEAR or BICUBIC (what torchvision calls on PIL
    images) with `tf.image.resize(antialias=True)`'s kernels, which are PIL's, run as two
    fast one-axis passes; see `host_resize` for the measured differences and the optional
    PIL-exact rounding.
  * JPEGs are decoded with libjpeg's accurate integer DCT, as PIL does: the pixels equal PIL's
    (TF's default fast DCT differs by up to ~6 levels).
  * `eval_view` is `Resize(round(size / crop_fraction))` then `CenterCrop(size)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from retro_jax.data import host_resize
from retro_jax.data.tf_runtime import import_tensorflow

tf = import_tensorflow()

Interpolation = host_resize.Interpolation

# torchvision's RandomResizedCrop.get_params tries this many boxes before its fallback.
NUM_CROP_ATTEMPTS = 10
# Columns decoded beyond each side of a fused JPEG crop. libjpeg's cropped decode upsamples
# the subsampled chroma of the crop's edge columns without their outer neighbours, which
# changes those columns by up to ~15 levels for 4:2:0 and 4:2:2 files; with a margin of
# decoded context the fused crop equals the full decode exactly.
_JPEG_CROP_MARGIN = 8
_DCT_METHOD = "INTEGER_ACCURATE"


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """One random-resized-crop view: torchvision's `RandomResizedCrop` plus a random flip.

  Attributes:
    size: output side in pixels (square views).
    scale: range of the crop's area as a fraction of the image's.
    ratio: range of the crop's aspect ratio (width / height).
    flip_prob: probability of a horizontal flip.
    interpolation: "bilinear" (torchvision's default, MoCo) or "bicubic" (DINO, MSN).
    pil_rounding: resize with PIL's intermediate rounding (see `resize`); slower.
  """
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip_prob: float = 0.5
  interpolation: Interpolation = "bilinear"
  pil_rounding: bool = False

  def __post_init__(self):
    if self.size <= 0:
      raise ValueError(f"crop size must be positive, got {self.size}")
    if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
      raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
    if not 0.0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
    if not 0.0 <= self.flip_prob <= 1.0:
      raise ValueError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")
    _check_interpolation(self.interpolation)


def _check_interpolation(interpolation: str) -> None:
  host_resize.check_interpolation(interpolation)


def _round_half_even(x: tf.Tensor) -> tf.Tensor:
  """Python's `int(round(x))` of a float64 tensor, as int32 (tf.round rounds half to even)."""
  return tf.cast(tf.round(x), tf.int32)


def crop_box(seed: tf.Tensor, height: tf.Tensor | int, width: tf.Tensor | int,
             scale: Sequence[float] = (0.08, 1.0),
             ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)) -> tf.Tensor:
  """A random crop box with the distribution of torchvision's `RandomResizedCrop.get_params`.

  Args:
    seed: int32 or int64 tensor of shape [2].
    height: the image height (int scalar).
    width: the image width (int scalar).
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the aspect ratio width / height, sampled log-uniformly.

  Returns:
    int32 [4]: top, left, crop height, crop width.
  """
  seed = tf.convert_to_tensor(seed)
  attempts_seed, top_seed, left_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  h_f, w_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  u = tf.random.stateless_uniform([2, NUM_CROP_ATTEMPTS], seed=attempts_seed, dtype=tf.float64)
  target_area = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_r0 + (log_r1 - log_r0) * u[1])
  ws = _round_half_even(tf.sqrt(target_area * aspect))
  hs = _round_half_even(tf.sqrt(target_area / aspect))
  valid = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = tf.argmax(tf.cast(valid, tf.int32), output_type=tf.int32)  # 0 when none is valid

  # torchvision's fallback: the centre crop of the largest box within the ratio range.
  in_ratio = w_f / h_f
  narrow = in_ratio < min(ratio)
  wide = in_ratio > max(ratio)
  fb_w = tf.where(wide, _round_half_even(h_f * max(ratio)), width)
  fb_h = tf.where(narrow, _round_half_even(w_f / min(ratio)), height)

  found = tf.reduce_any(valid)
  h = tf.where(found, hs[first], fb_h)
  w = tf.where(found, ws[first], fb_w)
  top = tf.where(
      found, tf.random.stateless_uniform([], top_seed, 0, height - h + 1, dtype=tf.int32),
      (height - h) // 2)
  left = tf.where(
      found, tf.random.stateless_uniform([], left_seed, 0, width - w + 1, dtype=tf.int32),
      (width - w) // 2)
  return tf.stack([top, left, h, w])


def resize(image: tf.Tensor, height, width, interpolation: Interpolation = "bilinear",
           pil_rounding: bool = False) -> tf.Tensor:
  """PIL's `Image.resize(..., BILINEAR | BICUBIC)` of a uint8 [H, W, C] image: see
  `host_resize.resize` for the method and its measured differences from Pillow."""
  return host_resize.resize(image, height, width, interpolation, pil_rounding)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """A uint8 [H, W, 1 | 3 | 4] image as [H, W, 3]: grey is repeated, alpha dropped."""
  image = tf.convert_to_tensor(image)
  channels = image.shape[-1]
  if channels == 1:
    return tf.tile(image, [1, 1, 3])
  if channels is not None:
    return image[..., :3]
  image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]),
                  lambda: image[..., :3])
  return tf.ensure_shape(image, [None, None, 3])


def decode_image(contents: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 3] from JPEG (PIL's exact pixels), PNG, GIF (first frame), BMP or WebP."""
  image = tf.cond(
      tf.io.is_jpeg(contents),
      lambda: tf.io.decode_jpeg(contents, channels=3, dct_method=_DCT_METHOD),
      lambda: _decode_other(contents))
  return tf.ensure_shape(image, [None, None, 3])


def _decode_jpeg_crop(contents: tf.Tensor, box: tf.Tensor, full_width: tf.Tensor) -> tf.Tensor:
  top, left, h, w = tf.unstack(box)
  start = tf.maximum(left - _JPEG_CROP_MARGIN, 0)
  stop = tf.minimum(left + w + _JPEG_CROP_MARGIN, full_width)
  image = tf.image.decode_and_crop_jpeg(contents, tf.stack([top, start, h, stop - start]),
                                        channels=3, dct_method=_DCT_METHOD)
  return image[:, left - start:left - start + w]


def _decode_other(contents: tf.Tensor) -> tf.Tensor:
  return tf.io.decode_image(contents, channels=3, expand_animations=False)


def _crop(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
  top, left, h, w = tf.unstack(box)
  return image[top:top + h, left:left + w]


def resized_crop(image: tf.Tensor, box: tf.Tensor, size: int,
                 interpolation: Interpolation = "bilinear", pil_rounding: bool = False
                 ) -> tf.Tensor:
  """torchvision's `functional.resized_crop` of a PIL image: crop `box`, resize to a square.

  Args:
    image: uint8 [H, W, C].
    box: int [4]: top, left, height, width (inside the image).
    size: the output side.
    interpolation: "bilinear" or "bicubic".
    pil_rounding: see `resize`.

  Returns:
    uint8 [size, size, C].
  """
  return resize(_crop(tf.convert_to_tensor(image), box), size, size, interpolation,
                pil_rounding)


def decode_crop(contents: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
  """uint8 [h, w, 3]: the crop `box` (top, left, h, w) of an encoded image.

  JPEGs go through the fused decode-and-crop (rows outside the box are never decoded, columns
  only within a small margin) and equal a full decode followed by the crop, pixel for pixel.
  Other formats are decoded whole, then cropped.
  """
  crop = tf.cond(
      tf.io.is_jpeg(contents),
      lambda: _decode_jpeg_crop(contents, box, tf.image.extract_jpeg_shape(contents)[1]),
      lambda: _crop(_decode_other(contents), box))
  return tf.ensure_shape(crop, [None, None, 3])


def _flip(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
  flip = tf.random.stateless_uniform([], seed) < prob
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def random_flip(image: tf.Tensor, seed: tf.Tensor, prob: float = 0.5) -> tf.Tensor:
  """torchvision's `RandomHorizontalFlip(prob)` of an [H, W, C] image, stateless."""
  return _flip(tf.convert_to_tensor(image), tf.convert_to_tensor(seed), prob)


def _view_seeds(seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  return crop_seed, flip_seed


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, spec: CropSpec) -> tf.Tensor:
  """One view of a decoded uint8 [H, W, C] image (C = 1, 3 or 4): crop, resize, flip.

  Args:
    image: uint8 [H, W, C], e.g. a TFDS image feature.
    seed: int tensor [2].
    spec: the view's crop, flip and interpolation parameters.

  Returns:
    uint8 [spec.size, spec.size, 3].
  """
  crop_seed, flip_seed = _view_seeds(tf.convert_to_tensor(seed))
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  box = crop_box(crop_seed, shape[0], shape[1], spec.scale, spec.ratio)
  # Resizing works per channel, so grey images are resized once and repeated afterwards.
  view = to_rgb(resized_crop(image, box, spec.size, spec.interpolation, spec.pil_rounding))
  return _flip(tf.ensure_shape(view, [spec.size, spec.size, 3]), flip_seed, spec.flip_prob)


def random_resized_crop_encoded(contents: tf.Tensor, seed: tf.Tensor, spec: CropSpec
                                ) -> tf.Tensor:
  """One view of an encoded image (a scalar string): fused decode-and-crop, resize, flip.

  Args:
    contents: encoded JPEG, PNG, GIF, BMP or WebP bytes.
    seed: int tensor [2].
    spec: the view's crop, flip and interpolation parameters.

  Returns:
    uint8 [spec.size, spec.size, 3].
  """
  crop_seed, flip_seed = _view_seeds(tf.convert_to_tensor(seed))

  def jpeg():
    shape = tf.image.extract_jpeg_shape(contents)
    box = crop_box(crop_seed, shape[0], shape[1], spec.scale, spec.ratio)
    return _decode_jpeg_crop(contents, box, shape[1])

  def other():
    image = _decode_other(contents)
    shape = tf.shape(image)
    return _crop(image, crop_box(crop_seed, shape[0], shape[1], spec.scale, spec.ratio))

  crop = tf.ensure_shape(tf.cond(tf.io.is_jpeg(contents), jpeg, other), [None, None, 3])
  view = resize(crop, spec.size, spec.size, spec.interpolation, spec.pil_rounding)
  return _flip(tf.ensure_shape(view, [spec.size, spec.size, 3]), flip_seed, spec.flip_prob)


def multi_crop(image: tf.Tensor, seed: tf.Tensor, specs: Sequence[CropSpec],
               fused_max_views: int = 1) -> tuple[tf.Tensor, ...]:
  """All the views of one image, view i drawn from `stateless_fold_in(seed, i)`.

  Examples of `specs`: MoCo-v2, 2 x CropSpec(224, (0.2, 1)); DINO, 2 x CropSpec(224,
  (0.4, 1), interpolation="bicubic") + N x CropSpec(96, (0.05, 0.4), ...); MSN, 2 x
  CropSpec(224, (0.3, 1)) + 10 x CropSpec(96, (0.05, 0.3)).

  Args:
    image: an encoded image (scalar string) or a decoded uint8 [H, W, C] image.
    seed: int tensor [2].
    specs: one spec per view.
    fused_max_views: encoded images with at most this many views get one fused
      decode-and-crop per view; with more, the image is decoded once and cropped per view.
      libjpeg still entropy-decodes every row above the crop, so a fused crop costs nearly a
      full decode on ImageNet-sized JPEGs (~500x375): with one tf.data thread on a shared
      2-core CPU (best of 4), MoCo's two views ran at ~130 img/s fused and ~150-200 decoded
      once, DINO's 2 + 10 at ~22-26 and ~49-52, one view at ~220-300 either way. The views
      are the same either way.

  Returns:
    One uint8 [size, size, 3] tensor per spec, in order.
  """
  image, seed = tf.convert_to_tensor(image), tf.convert_to_tensor(seed)
  seeds = [tf.random.experimental.stateless_fold_in(seed, tf.constant(i, seed.dtype))
           for i in range(len(specs))]
  if image.dtype == tf.string:
    if len(specs) <= fused_max_views:
      return tuple(random_resized_crop_encoded(image, s, spec) for s, spec in zip(seeds, specs))
    image = decode_image(image)
  return tuple(random_resized_crop(image, s, spec) for s, spec in zip(seeds, specs))


def eval_view(image: tf.Tensor, size: int, crop_fraction: float = 224 / 256,
              interpolation: Interpolation = "bilinear", pil_rounding: bool = False
              ) -> tf.Tensor:
  """torchvision's `Resize(round(size / crop_fraction))` then `CenterCrop(size)`.

  The shorter side is resized to exactly `round(size / crop_fraction)` and the longer one to
  `int(that * long / short)`; the crop offsets are `round((side - size) / 2)`. The ImageNet
  protocol is `eval_view(x, 224)` (256 then 224). For small images use `crop_fraction=1`:
  `eval_view(fashion_mnist_image, 32, 1.0)` resizes the 28 px image to 32 and keeps all of it.

  Args:
    image: an encoded image (scalar string) or a decoded uint8 [H, W, C] image.
    size: the output side.
    crop_fraction: the centre crop's side over the resized shorter side, in (0, 1].
    interpolation: "bilinear" (torchvision's default) or "bicubic" (DINO's evaluation).
    pil_rounding: resize with PIL's intermediate rounding (see `resize`).

  Returns:
    uint8 [size, size, 3].
  """
  if not 0.0 < crop_fraction <= 1.0:
    raise ValueError(f"crop_fraction must lie in (0, 1], got {crop_fraction}")
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.string:
    image = decode_image(image)
  short_target = int(round(size / crop_fraction))
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short, long = tf.minimum(height, width), tf.maximum(height, width)
  # Python's int(short_target * long / short): exact in float64, like torchvision's.
  long_target = tf.cast(tf.math.floor(
      tf.cast(short_target * long, tf.float64) / tf.cast(short, tf.float64)), tf.int32)
  new_h = tf.where(height <= width, short_target, long_target)
  new_w = tf.where(height <= width, long_target, short_target)
  resized = resize(image, new_h, new_w, interpolation, pil_rounding)
  top = _round_half_even(tf.cast(new_h - size, tf.float64) / 2.0)
  left = _round_half_even(tf.cast(new_w - size, tf.float64) / 2.0)
  view = to_rgb(resized[top:top + size, left:left + size])
  return tf.ensure_shape(view, [size, size, 3])

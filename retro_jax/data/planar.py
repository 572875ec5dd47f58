"""The photometric ops on one planar image, written for XLA:CPU.

`example_loop` augments a batch one example at a time on the CPU; there each image is float32
[3, H, W] (channels first: each channel a contiguous plane, so every per-pixel op is a
vectorised loop over W) and fits in the core's L2 cache. The ops equal `color`'s (torchvision's
float kernels) and `blur.pil_gaussian_blur` up to float32 rounding, but avoid what XLA:CPU
compiles to slow loops (measured on one 224 px view in cache, pinned to one core):
  * concatenating or stacking channels: a fused concatenate evaluates element by element,
    ~5x an elementwise op; per-channel differences are [3, 1, 1] constants instead;
  * reductions: a fused mean over the image ran ~1.2 ms (scalar code), as a dot ~20 us;
  * `jnp.pad(mode="edge")`, itself a concatenate: a blur pass slices the interior and
    concatenates the few edge columns to it (~35 us a pass instead of ~55);
  * passes over the image: Pillow's three box passes per axis run as one (`_box_passes`).
A whole blurred view takes ~90 us (3-tap passes) or ~150 us (5 taps), hue ~85 us, saturation
~40, contrast ~20, brightness ~8.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from retro_jax.data import blur
from retro_jax.data import color


def _channel_constant(values, dtype) -> jax.Array:
  return jnp.asarray(values, dtype).reshape(3, 1, 1)


def gray(image: jax.Array) -> jax.Array:
  """torchvision's luma of a [3, H, W] image, [H, W]."""
  w = color.GRAY_WEIGHTS
  return image[0] * w[0] + image[1] * w[1] + image[2] * w[2]


def _blend(image: jax.Array, other, factor) -> jax.Array:
  return jnp.clip(image * factor + other * (1.0 - factor), 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
  """Blends with the mean grey level; the mean as a dot product (see the module docstring)."""
  channels = image.reshape(3, -1)
  sums = channels @ jnp.ones(channels.shape[1], image.dtype)
  mean = jnp.dot(jnp.asarray(color.GRAY_WEIGHTS, image.dtype), sums) / channels.shape[1]
  return _blend(image, mean, factor)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  return _blend(image, gray(image), factor)


def adjust_hue(image: jax.Array, factor) -> jax.Array:
  """`color.adjust_hue` on planes (see `color.rotated_hue`)."""
  minc, chroma, h6 = color.rotated_hue(image[0], image[1], image[2], factor)
  const = lambda values: _channel_constant(values, image.dtype)
  trapezoid = const(color.HUE_SLOPE) * jnp.abs(h6 - const(color.HUE_CENTRE))
  return minc + chroma * jnp.clip(trapezoid + const(color.HUE_OFFSET), 0.0, 1.0)


def grayscale(image: jax.Array) -> jax.Array:
  """`color.rgb_to_grayscale(..., 3)`: the luma in all three planes."""
  return jnp.broadcast_to(gray(image), image.shape)


def normalize(image: jax.Array, mean, std) -> jax.Array:
  return (image - _channel_constant(mean, image.dtype)) / _channel_constant(std, image.dtype)


def _edge_filter(image: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
  """Correlates `image` along `axis` with odd-length scalar `taps`, edges replicated."""
  size, radius = image.shape[axis], (taps.shape[0] - 1) // 2
  if size <= 2 * radius:  # no interior: the padded filter
    return blur.filter_1d(image, taps, axis, mode="edge")
  take = lambda start, stop: jax.lax.slice_in_dim(image, start, stop, axis=axis)

  def column(j):  # an edge column, its taps clamped to the image
    return sum(taps[k] * take(i, i + 1) for k, i in
               enumerate(min(max(j + k - radius, 0), size - 1) for k in range(len(taps))))

  interior = sum(taps[k] * take(k, size - 2 * radius + k) for k in range(len(taps)))
  # A concatenate, not an update of zeros: XLA:CPU turns the latter into a pad it does not
  # vectorise (~4x slower).
  return jnp.concatenate([column(j) for j in range(radius)] + [interior] +
                         [column(j) for j in range(size - radius, size)], axis=axis)


def _box_passes(image: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
  """Pillow's three box passes along `axis`, edges replicated, as one filter.

  Away from the edges three passes are one correlation with taps * taps * taps (6r + 1 taps
  for 2r + 1); each of the 3r outputs at an edge is a weighted sum of the 6r inputs next to
  it, the weights being the passes run on a short signal (a [3r, 6r] matrix). The same sums up
  to float32 rounding, in one pass over the image instead of three: ~2.2x faster with 3 taps,
  ~1.3x with 5.
  """
  radius = (taps.shape[0] - 1) // 2
  edge, size = blur.PIL_PASSES * radius, image.shape[axis]
  if size <= 2 * edge:  # no interior: the passes one by one
    for _ in range(blur.PIL_PASSES):
      image = _edge_filter(image, taps, axis)
    return image
  composite = taps
  for _ in range(blur.PIL_PASSES - 1):
    composite = jnp.convolve(composite, taps)  # taps are symmetric: convolution = correlation
  take = lambda start, stop: jax.lax.slice_in_dim(image, start, stop, axis=axis)
  interior = sum(composite[k] * take(k, size - 2 * edge + k) for k in range(len(composite)))
  # One pass on a signal of n samples (edges replicated) as an [n, n] matrix, then three.
  n = 4 * edge + 1
  one_pass = sum(taps[k] * jax.nn.one_hot(jnp.clip(jnp.arange(n) + k - radius, 0, n - 1), n,
                                          dtype=image.dtype) for k in range(len(taps)))
  passes = functools.reduce(jnp.matmul, [one_pass] * blur.PIL_PASSES)
  weights = passes[:edge, :2 * edge]  # output j (< edge) from inputs 0 .. 2 edge - 1

  if edge <= 3:  # 18 sums of slices a side: ~30% faster than dots
    left = [sum(weights[j, i] * take(i, i + 1) for i in range(2 * edge)) for j in range(edge)]
    right = [sum(weights[j, i] * take(size - 1 - i, size - i) for i in range(2 * edge))
             for j in reversed(range(edge))]
  else:  # 72 a side would compile ~1 s longer than these dot products
    def dot(weights, inputs):
      return jnp.moveaxis(jnp.tensordot(weights, inputs, axes=([1], [axis])), 0, axis)
    left = [dot(weights, take(0, 2 * edge))]
    right = [dot(weights[::-1, ::-1], take(size - 2 * edge, size))]
  return jnp.concatenate(left + [interior] + right, axis=axis)


def _blur(image: jax.Array, taps: jax.Array) -> jax.Array:
  for axis in (2, 1):  # Pillow blurs rows (x) first, then columns (y)
    image = _box_passes(image, taps, axis)
  return image


def pil_gaussian_blur(image: jax.Array, sigma, max_sigma: float) -> jax.Array:
  """`blur.pil_gaussian_blur` (float, not quantised) of a [3, H, W] image, one scalar sigma.

  Below sigma ~1.41 (69% of MoCo's draws) a box pass has 3 taps, not 5: a branch runs those.
  """
  num_taps = blur.pil_max_taps(max_sigma)
  taps = blur.pil_box_taps(sigma, num_taps).astype(image.dtype)
  if num_taps == 3:
    return _blur(image, taps)
  return jax.lax.cond(taps[0] == 0, lambda x: _blur(x, taps[1:-1]), lambda x: _blur(x, taps),
                      image)

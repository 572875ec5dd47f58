"""Gaussian blur with one sigma per image: PIL's extended-box approximation or a sampled Gaussian.

MoCo-v2 (`GaussianBlur` in moco/loader.py), DINO and MSN blur PIL images with
`PIL.ImageFilter.GaussianBlur(radius=sigma)`, sigma ~ U(0.1, 2.0). Pillow does not convolve
with a Gaussian: it runs an *extended box filter* three times along x, then three times along
y (Gwosdek et al., SSVM 2011), replicating edge pixels and rounding to uint8 after each of the
six passes. One pass averages the 2l + 1 central pixels with weight w = 1 / (2r + 1) and the
two pixels at distance l + 1 with (1 - (2l + 1) w) / 2, where the fractional box radius r is
chosen so that three passes have variance sigma^2; its integer part l is 0 for sigma < 1.41,
1 up to sigma = 2.0 (so a pass has at most 5 taps), and the three-pass kernel is a piecewise
quadratic bump that is zero beyond 3 (l + 1) pixels, not a Gaussian's tails.

`pil_gaussian_blur` reproduces that filter in float arithmetic (the six intermediate uint8
roundings are left out; they move the result by at most 3/255). `gaussian_blur` is the
alternative: a sampled Gaussian with torchvision's `gaussian_blur` kernel and reflect padding
(BYOL and SimCLR's TF code blur that way). Both take a per-image sigma: the kernel has a fixed
number of taps, set by the largest sigma, and per-image weights, so a batch with different
sigmas is one fused computation (as BYOL does).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Pillow's `ImageFilter.GaussianBlur` runs three box passes per axis.
PIL_PASSES = 3


def filter_1d(image: jax.Array, taps: jax.Array, axis: int, mode: str) -> jax.Array:
  """Correlates `image` along `axis` with odd-length `taps` ([..., K], one row per image)."""
  radius = (taps.shape[-1] - 1) // 2
  pad = [(0, 0)] * image.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(image, pad, mode=mode)
  size = image.shape[axis]
  # Per-image weights: a sum of shifted copies, one elementwise loop on any backend.
  extra = image.ndim - (taps.ndim - 1)
  terms = [taps[..., k].reshape(taps.shape[:-1] + (1,) * extra)
           * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
           for k in range(taps.shape[-1])]
  return functools.reduce(jnp.add, terms)


def pil_box_radius(sigma, passes: int = PIL_PASSES):
  """Pillow's `_gaussian_blur_radius`: the fractional box radius l + a of one pass.

  Each float32 operation is rounded on its own, as in Pillow's C: left to fuse, XLA
  contracts and reassociates some (measured on CPU: the radius moved in its last bit for
  3 of 7 sigmas), which moves Pillow's 24-bit weight by one unit and flips about one in
  1,000 of `quantize`'s roundings. The barriers cost a few scalar operations per image.
  """
  step = jax.lax.optimization_barrier
  sigma2 = step(step(sigma * sigma) / passes)
  length = jnp.sqrt(12.0 * sigma2 + 1.0)  # only its floor matters
  whole = jnp.floor((length - 1.0) / 2.0)
  numerator = step((2 * whole + 1) * step(whole * (whole + 1) - step(3 * sigma2)))
  denominator = step(6 * step(sigma2 - (whole + 1) * (whole + 1)))
  return step(whole + step(numerator / denominator))


def pil_max_taps(max_sigma: float) -> int:
  """The number of taps of one box pass for sigmas up to `max_sigma` (5 for 2.0)."""
  with jax.ensure_compile_time_eval():  # a static shape, also when called under jit
    radius = float(pil_box_radius(jnp.float32(max_sigma)))
  return 2 * (math.floor(radius) + 1) + 1


def pil_box_taps(sigma, num_taps: int, *, fixed_point: bool = False) -> jax.Array:
  """The taps of one extended-box pass, [..., num_taps] for sigma of shape [...].

  Args:
    sigma: the standard deviation of the whole (three-pass) blur.
    num_taps: odd length of the returned taps, at least `pil_max_taps(max(sigma))`.
    fixed_point: float weights (False) or Pillow's integer weights in units of 2^-24, as
      `ImagingHorizontalBoxBlur` computes them (uint32).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  radius = pil_box_radius(sigma)
  whole = jnp.floor(radius)
  if fixed_point:
    step = jax.lax.optimization_barrier
    inner = jnp.floor(step(jnp.float32(1 << 24) / step(2.0 * radius + 1.0))).astype(jnp.uint32)
    count = (2 * whole + 1).astype(jnp.uint32)
    outer = ((1 << 24) - count * inner) // 2
  else:
    inner = 1.0 / (2.0 * radius + 1.0)
    outer = (1.0 - (2.0 * whole + 1.0) * inner) / 2.0
  distance = jnp.abs(jnp.arange(num_taps, dtype=jnp.float32) - (num_taps - 1) // 2)
  whole, inner, outer = whole[..., None], inner[..., None], outer[..., None]
  return jnp.where(distance <= whole, inner,
                   jnp.where(distance == whole + 1.0, outer, jnp.zeros_like(inner)))


def pil_gaussian_blur(image: jax.Array, sigma, max_sigma: float | None = None, *,
                      quantize: bool = False) -> jax.Array:
  """`PIL.ImageFilter.GaussianBlur(radius=sigma)` on float images in [0, 1].

  Args:
    image: [..., H, W, C] float images.
    sigma: the standard deviation, a scalar or one per image (shape [...]).
    max_sigma: the largest sigma `sigma` can hold (sets the number of taps). Needed when
      `sigma` is traced; defaults to `sigma`'s value. A larger sigma would be truncated.
    quantize: False: exact arithmetic, no rounding (within 3/255 of Pillow on uint8-valued
      inputs). True: Pillow's arithmetic: the input rounded to uint8 levels, 24-bit
      fixed-point weights and rounding to uint8 after every pass; the output holds multiples
      of 1/255, bit for bit Pillow's on CPU (a backend whose float32 division is not
      correctly rounded, like TPUs', may move a weight by one unit). Small sigmas then
      barely blur, as in Pillow, where each pass's change of under half a level is lost.

  Returns:
    The blurred images, same shape and dtype.
  """
  if max_sigma is None:
    with jax.ensure_compile_time_eval():
      max_sigma = float(jnp.max(jnp.asarray(sigma)))
  taps = pil_box_taps(sigma, pil_max_taps(max_sigma), fixed_point=quantize)
  dtype = image.dtype
  if quantize:
    image = jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0).astype(jnp.uint32)
  else:
    taps = taps.astype(dtype)

  def box_pass(axis, image):
    image = filter_1d(image, taps, axis, mode="edge")
    if quantize:  # the sum fits in 32 bits: the weights add up to at most 2^24
      image = (image + (1 << 23)) >> 24
    return image

  for axis in (-2, -3):  # Pillow blurs rows (x) first, then columns (y)
    # A loop, not three copies: a third of the program to compile, same speed.
    image = jax.lax.fori_loop(0, PIL_PASSES, lambda _, x, axis=axis: box_pass(axis, x), image)
  return image.astype(dtype) / 255.0 if quantize else image


def gaussian_taps(sigma, kernel_size: int) -> jax.Array:
  """torchvision's `_get_gaussian_kernel1d`: exp(-x^2 / (2 sigma^2)), normalised, [..., K]."""
  sigma = jnp.asarray(sigma, jnp.float32)[..., None]
  x = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2
  return jax.nn.softmax(-0.5 * jnp.square(x / sigma), axis=-1)


def default_kernel_size(max_sigma: float) -> int:
  """2 ceil(3 sigma) + 1: the sampled Gaussian keeps 99.7% of its mass."""
  return 2 * math.ceil(3.0 * max_sigma) + 1


def gaussian_blur(image: jax.Array, sigma, kernel_size: int) -> jax.Array:
  """torchvision's `gaussian_blur(image, kernel_size, sigma)` on float images.

  Args:
    image: [..., H, W, C] float images, H and W larger than kernel_size // 2.
    sigma: the standard deviation, a scalar or one per image (shape [...]).
    kernel_size: odd number of taps per axis (BYOL uses 23 at 224 px;
      `default_kernel_size(max_sigma)` truncates at 3 sigma).

  Returns:
    The blurred images (reflect padding, as torchvision), same shape and dtype.
  """
  if kernel_size % 2 != 1 or kernel_size < 1:
    raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
  taps = gaussian_taps(sigma, kernel_size).astype(image.dtype)
  for axis in (-2, -3):
    image = filter_1d(image, taps, axis, mode="reflect")
  return image

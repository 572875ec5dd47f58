"""Colour operations on float images in [0, 1], with torchvision's tensor semantics.

Each function mirrors the float-tensor kernel of `torchvision.transforms.v2.functional`
(`adjust_brightness`, `adjust_contrast`, `adjust_saturation`, `adjust_hue`,
`rgb_to_grayscale`, `solarize`) on NHWC (or HWC) arrays: the channel axis is last, every axis
before H, W is a batch axis, and a factor is a scalar or an array of the batch shape (one
factor per image). The reference pipelines (MoCo-v2, DINO, MSN) ran these ops on PIL images,
which rounds to uint8 after every op; here nothing is rounded in between.

`sample_jitter` and `apply_jitter` are torchvision's `ColorJitter` split into its parameter
draw (`make_params`: a random order of the four ops and one factor per op) and its
application, so the draws can be tested against torchvision's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

# torchvision's `_rgb_to_grayscale_image` weights (ITU-R 601-2 luma, 0.2989 as torchvision).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Op ids of torchvision's `ColorJitter.fn_idx`: 0 brightness, 1 contrast, 2 saturation, 3 hue.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

Range = tuple[float, float]


def _per_image(factor, image: jax.Array) -> jax.Array:
  """`factor` (a scalar or one value per image) shaped to broadcast over H, W, C."""
  factor = jnp.asarray(factor, image.dtype)
  return factor.reshape(factor.shape + (1,) * (image.ndim - factor.ndim))


def _blend(image1: jax.Array, image2: jax.Array, ratio) -> jax.Array:
  ratio = _per_image(ratio, image1)
  return jnp.clip(image1 * ratio + image2 * (1.0 - ratio), 0.0, 1.0)


def rgb_to_grayscale(image: jax.Array, num_output_channels: int = 1) -> jax.Array:
  """Luma `0.2989 R + 0.587 G + 0.114 B`, with 1 channel or repeated to 3."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  gray = (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2])[..., None]
  return jnp.broadcast_to(gray, gray.shape[:-1] + (num_output_channels,))


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
  """Scales every pixel by `factor` (>= 0) and clips to [0, 1]."""
  return jnp.clip(image * _per_image(factor, image), 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
  """Blends each image with the mean of its grayscale version."""
  mean = jnp.mean(rgb_to_grayscale(image), axis=(-3, -2, -1), keepdims=True)
  return _blend(image, mean, factor)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  """Blends each image with its grayscale version."""
  return _blend(image, rgb_to_grayscale(image), factor)


# A hue rotation keeps each pixel's max, min and chroma = max - min; output channel c is
# min + chroma * clip(slope_c |h6 - centre_c| + offset_c, 0, 1), a trapezoid of the rotated hue
# h6 in [0, 6) (red 0, green 2, blue 4). This is torchvision's RGB -> HSV -> RGB round trip
# (sector i = floor(h6) picking each channel from v, p, q, t) in closed form: no sector
# selects and no stacked channels, which XLA:CPU ran ~3x slower.
HUE_SLOPE = (1.0, -1.0, -1.0)
HUE_CENTRE = (3.0, 2.0, 4.0)
HUE_OFFSET = (-1.0, 2.0, 2.0)


def rotated_hue(r: jax.Array, g: jax.Array, b: jax.Array, factor
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(min, chroma, h6) of pixels whose hue is rotated by `factor` (a fraction of the circle).

  `factor` is a scalar or has the leading (batch) shape of the channel planes `r`, `g`, `b`.
  h6 is torchvision's `_rgb_to_hsv` hue times 6 (grey pixels: 0), plus 6 factor, mod 6.
  """
  # Selects, not jnp.maximum / minimum, whose NaN propagation costs XLA:CPU ~25% of the op.
  larger = jnp.where(r > g, r, g)
  maxc = jnp.where(larger > b, larger, b)
  smaller = jnp.where(r < g, r, g)
  minc = jnp.where(smaller < b, smaller, b)
  chroma = maxc - minc
  inverse = 1.0 / jnp.where(chroma == 0, 1.0, chroma)  # grey pixels: chroma 0, any hue
  h6 = jnp.where(maxc == r, (g - b) * inverse,
                 jnp.where(maxc == g, 2.0 + (b - r) * inverse, 4.0 + (r - g) * inverse))
  factor = jnp.asarray(factor, r.dtype)
  h6 = h6 + 6.0 * factor.reshape(factor.shape + (1,) * (r.ndim - factor.ndim))
  return minc, chroma, h6 - 6.0 * jnp.floor(h6 * (1.0 / 6.0))


def adjust_hue(image: jax.Array, factor) -> jax.Array:
  """Rotates the hue by `factor` (in [-0.5, 0.5], a fraction of the hue circle)."""
  minc, chroma, h6 = rotated_hue(image[..., 0], image[..., 1], image[..., 2], factor)
  const = lambda values: jnp.asarray(values, image.dtype)
  trapezoid = const(HUE_SLOPE) * jnp.abs(h6[..., None] - const(HUE_CENTRE)) + const(HUE_OFFSET)
  return minc[..., None] + chroma[..., None] * jnp.clip(trapezoid, 0.0, 1.0)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Inverts every value >= `threshold`.

  The default 0.5 reproduces PIL's `ImageOps.solarize(threshold=128)` (DINO) on a float
  image whose uint8 rounding is the PIL image: round(255 x) >= 128 exactly when x >= 0.5.
  """
  return jnp.where(image >= threshold, 1.0 - image, image)


def jitter_range(value: float | Sequence[float] | None, name: str) -> Range | None:
  """torchvision's `ColorJitter._check_input`: a factor range, or None for "leave alone".

  Args:
    value: a strength `v` (brightness, contrast, saturation: factors in [max(0, 1 - v),
      1 + v]; hue: offsets in [-v, v]), or an explicit (min, max) range, or None.
    name: one of `JITTER_OPS`.

  Returns:
    The (min, max) range, or None when the op is the identity.

  Raises:
    ValueError: a negative strength or a range out of bounds (hue: [-0.5, 0.5]).
  """
  if name not in JITTER_OPS:
    raise ValueError(f"unknown colour-jitter op {name!r}; expected one of {JITTER_OPS}")
  center, bound = (0.0, (-0.5, 0.5)) if name == "hue" else (1.0, (0.0, float("inf")))
  if value is None:
    return None
  if isinstance(value, (int, float)):
    if value < 0:
      raise ValueError(f"{name}={value}: a single strength must be non-negative")
    low, high = center - value, center + value
    if name != "hue":
      low = max(low, 0.0)
  elif len(value) == 2:
    low, high = (float(v) for v in value)
  else:
    raise ValueError(f"{name}={value!r}: give a strength or a (min, max) pair")
  if not bound[0] <= low <= high <= bound[1]:
    raise ValueError(f"{name} range ({low}, {high}) must be increasing and within {bound}")
  return None if low == high == center else (float(low), float(high))


class JitterParams(NamedTuple):
  """One `ColorJitter` draw: the op order (a permutation of 0..3) and the four factors."""
  order: jax.Array
  brightness: jax.Array
  contrast: jax.Array
  saturation: jax.Array
  hue: jax.Array


# `jitter_from_uniform` turns this many U[0, 1) numbers into one draw.
JITTER_UNIFORMS = 8


def jitter_from_uniform(u: jax.Array, ranges: dict[str, Range | None]) -> JitterParams:
  """One `ColorJitter` draw (torchvision's `make_params`) from `JITTER_UNIFORMS` uniforms.

  The op order is the argsort of u[0:4] (every permutation equally likely, as
  `torch.randperm(4)`); factor i is uniform in its range: low + (high - low) u[4 + i].

  Args:
    u: [8] numbers from U[0, 1).
    ranges: op name -> (min, max) from `jitter_range`, or None: that factor is then its
      identity value (1, or 0 for hue) and `apply_jitter` skips the op.

  Returns:
    Scalar parameters for one image; `jax.vmap` for a batch.
  """
  factors = {}
  for i, name in enumerate(JITTER_OPS):
    bounds = ranges.get(name)
    if bounds is None:
      # Computed from u, not a constant: under vmap it stays batched (and sharded) like u.
      factors[name] = 0.0 * u[4 + i] + (0.0 if name == "hue" else 1.0)
    else:
      factors[name] = bounds[0] + (bounds[1] - bounds[0]) * u[4 + i]
  # argsort(u[:4]) by ranks (ties broken by index), without a sort: sorts compile slowly.
  keys, index = u[:4], jnp.arange(4)
  smaller = (keys[None, :] < keys[:, None]) | (
      (keys[None, :] == keys[:, None]) & (index[None, :] < index[:, None]))
  rank = jnp.sum(smaller, axis=1)  # rank[i]: the step at which op i runs
  order = jnp.sum(jnp.where(rank[None, :] == index[:, None], index[None, :], 0), axis=1)
  return JitterParams(order=order.astype(jnp.int32), **factors)


def sample_jitter(key: jax.Array, ranges: dict[str, Range | None]) -> JitterParams:
  """Draws one image's op order and factors (see `jitter_from_uniform`)."""
  return jitter_from_uniform(jax.random.uniform(key, (JITTER_UNIFORMS,)), ranges)


def _blend_step(image: jax.Array, op: jax.Array, factors: jax.Array) -> jax.Array:
  """Brightness (op 0), contrast (1) or saturation (2) of one image, chosen by a traced op.

  All three are `clip(f x + (1 - f) target)` with target 0, the mean grey level or the grey
  image; `factors` holds their three factors. Op 3 (hue) gets f = 1, which leaves an image
  in [0, 1] unchanged bit for bit.
  """
  gray = rgb_to_grayscale(image)
  target = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(gray), gray))
  return _blend(image, target, jnp.where(op == 3, 1.0, factors[jnp.minimum(op, 2)]))


def apply_jitter(image: jax.Array, params: JitterParams, ranges: dict[str, Range | None],
                 apply: jax.Array | bool = True) -> jax.Array:
  """Applies one image's (HWC) four ops in `params.order`, when `apply`.

  Equal to torchvision's `ColorJitter.transform`, but written for `jax.vmap`: a per-example
  choice of op costs every branch under vmap, so instead of running all four ops at each of
  the four steps, each step runs one blend whose factor and target are selected, and the
  expensive hue rotation runs once, between the steps before it and the steps after it.

  Args:
    image: [H, W, 3] float image in [0, 1].
    params: this image's draw from `sample_jitter`.
    ranges: the ranges it was drawn from; ops with None are skipped.
    apply: whether to jitter at all (RandomApply's coin).
  """
  factors = jnp.stack([
      jnp.where(apply & (ranges.get(name) is not None), getattr(params, name), 1.0)
      for name in JITTER_OPS[:3]])
  if ranges.get("hue") is None:
    hue_step = 4  # after every step: the first loop runs them all
  else:
    hue_step = jnp.argmax(params.order == 3)

  def blend_steps(image, run):  # a loop, not four copies: less to compile, same speed
    def body(step, image):
      blended = _blend_step(image, params.order[step], factors)
      return jnp.where(run(step), blended, image)
    return jax.lax.fori_loop(0, 4, body, image)

  image = blend_steps(image, lambda step: step < hue_step)
  if ranges.get("hue") is None:
    return image
  image = jnp.where(apply, adjust_hue(image, params.hue), image)
  return blend_steps(image, lambda step: step > hue_step)

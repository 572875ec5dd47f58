"""iBOT's block-wise masks of a patch grid, drawn on the device.

The algorithm is VISSL's `create_mask` (`vissl/data/ssl_transforms/masked_image_modeling.py`,
commit 04788de9, copied from bytedance/ibot `loader.py` `ImageFolderMask`, itself BEiT's
masking generator), one image at a time:

    ratio = U(mean - var, mean + var) for one (mean, var) pair picked uniformly  (get_pred_ratio)
    high = int(H * W * ratio)                      patches to mask
    while masked < high:
      up to 10 attempts: area ~ U((min(H, W) // 3)^2, high - masked), aspect ~ see below,
        h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); if h < H and w < W:
        a random h x w rectangle; accepted if it adds between 1 and high - masked new patches
      no attempt accepted: stop (the mask may stay below `high`)

aspect: 'vissl' draws exp(U(lo, hi)) with the configured bounds (0.3, 1/0.3) taken as the
logarithms, as VISSL's transform runs (its default `log_aspect_ratio=(0.3, 1 / 0.3)` is passed
to `random.uniform` unconverted); 'ibot' draws exp(U(log lo, log hi)), as iBOT's loader does.

On the device the 10 attempts of one round are tried together and the first accepted one is
applied (the mask does not change between attempts until one is accepted, so this is the same
process); the rounds run in a `lax.while_loop`, vmapped over images. The random numbers come
from the key: round r of an image uses `uniform(fold_in(loop_key, r), (10, 4))` (area, aspect,
top, left) and its ratio `uniform(ratio_key, (2,))` (which pair, where in its range), with
`ratio_key, loop_key = split(image_key)`; Python's `randint(0, n)` is `floor(u * (n + 1))`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["ATTEMPTS", "block_masks", "image_mask"]

ATTEMPTS = 10  # attempts per round, as VISSL and iBOT


def _ratio(key: jax.Array, means: tuple[float, ...], variances: tuple[float, ...]) -> jax.Array:
  u = jax.random.uniform(key, (2,))
  pick = jnp.minimum(jnp.floor(u[0] * len(means)).astype(jnp.int32), len(means) - 1)
  mean = jnp.asarray(means, jnp.float32)[pick]
  var = jnp.asarray(variances, jnp.float32)[pick]
  # random.uniform(m - v, m + v) if v > 0 else m
  return jnp.where(var > 0, mean - var + 2.0 * var * u[1], mean)


def image_mask(key: jax.Array, grid: tuple[int, int], *, ratio_mean: tuple[float, ...],
               ratio_var: tuple[float, ...], aspect_ratio: tuple[float, float],
               aspect_sampling: str) -> jax.Array:
  """One (H, W) bool mask (True = masked) drawn as the module docstring says."""
  rows, cols = grid
  ratio_key, loop_key = jax.random.split(key)
  high = jnp.floor(rows * cols * _ratio(ratio_key, ratio_mean, ratio_var)).astype(jnp.int32)
  low = float((min(rows, cols) // 3) ** 2)
  lo, hi = aspect_ratio
  if aspect_sampling == "ibot":
    lo, hi = math.log(lo), math.log(hi)
  elif aspect_sampling != "vissl":
    raise ValueError(f"unknown aspect sampling {aspect_sampling!r}")
  row_index = jnp.arange(rows)[None, :, None]
  col_index = jnp.arange(cols)[None, None, :]

  def one_round(carry):
    mask, count, round_, _ = carry
    u = jax.random.uniform(jax.random.fold_in(loop_key, round_), (ATTEMPTS, 4))
    room = (high - count).astype(jnp.float32)
    area = low + (room - low) * u[:, 0]
    aspect = jnp.exp(lo + (hi - lo) * u[:, 1])
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < rows) & (w < cols)
    top = jnp.floor(u[:, 2] * (rows - h + 1).astype(jnp.float32)).astype(jnp.int32)
    left = jnp.floor(u[:, 3] * (cols - w + 1).astype(jnp.float32)).astype(jnp.int32)
    rects = ((row_index >= top[:, None, None]) & (row_index < (top + h)[:, None, None])
             & (col_index >= left[:, None, None]) & (col_index < (left + w)[:, None, None]))
    new = h * w - jnp.sum(rects & mask[None], axis=(1, 2))
    accepted = fits & (new > 0) & (new <= high - count)
    first = jnp.argmax(accepted)
    any_accepted = jnp.any(accepted)
    mask = jnp.where(any_accepted, mask | rects[first], mask)
    count = count + jnp.where(any_accepted, new[first], 0)
    return mask, count, round_ + 1, any_accepted

  def go_on(carry):
    _, count, _, progressed = carry
    return progressed & (count < high)

  start = (jnp.zeros((rows, cols), bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
           jnp.ones((), bool))
  return jax.lax.while_loop(go_on, one_round, start)[0]


def block_masks(key: jax.Array, shape: tuple[int, ...], grid: tuple[int, int], **options
                ) -> jax.Array:
  """Independent masks for every image: (*shape, H * W) bool, rows flattened row-major.

  Args:
    key: the random key; image i of the flattened `shape` uses `split(key, prod(shape))[i]`.
    shape: leading dimensions, e.g. (global crops, batch).
    grid: the patch grid (H, W).
    **options: `image_mask`'s ratio_mean, ratio_var, aspect_ratio, aspect_sampling.
  """
  count = math.prod(shape)
  keys = jax.random.split(key, count)
  masks = jax.vmap(lambda k: image_mask(k, grid, **options))(keys)
  return masks.reshape(*shape, grid[0] * grid[1])

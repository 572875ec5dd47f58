"""The photometric ops on the CPU: one example at a time, planar, each op only where drawn.

`device_ops.apply_photometric` augments a batch under `jax.vmap` on accelerators. On XLA:CPU
that costs ~3 ms per 224 px view: a per-example choice under vmap runs every branch (e.g. the
blur for every example at p = 0.5), and every op is a pass over the whole batch (~19 MB a
view at batch 32), bound by memory bandwidth.
Here a `lax.map` takes one example at a time: its [3, H, W] float planes (`planar`) stay in
the L2 cache through all its ops, and each random choice is a real `lax.cond` / `lax.switch`,
so an op costs only the examples that draw it.

XLA:CPU does not vectorise a fused loop that reads or writes the batch at the loop's dynamic
index (it reloads the index at every element), so the example is converted once on the way in
and normalised once on the way out, and the ops in between sit inside `cond`s, whose operands
are plain buffers.

The draws are `device_ops.sample_params`'s, made for the whole batch before the loop; the
results equal the vmapped path's up to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from retro_jax.data import color
from retro_jax.data import planar

Params = dict[str, dict[str, jax.Array]]


def maybe(op, fn, image: jax.Array, apply: jax.Array) -> jax.Array:
  """`fn(image)` where the example drew `apply` for `op` (probability `op.p`), else `image`.

  In this loop the `cond` runs one branch; under `vmap` (device_ops) both run and one is
  selected, as any per-example choice would.
  """
  if op.p == 0.0:
    return image
  if op.p == 1.0:
    return fn(image)
  return jax.lax.cond(apply, fn, lambda x: x, image)


def _jitter(image: jax.Array, params: dict[str, jax.Array], spec) -> jax.Array:
  """torchvision's `ColorJitter` in the drawn op order: four switch steps, one op each.

  The steps are unrolled: in a `fori_loop` the carried image is copied at every step, and
  XLA:CPU's copies are scalar loops (the whole jitter took ~45% longer).
  """
  ranges = spec.ranges
  ops = [planar.adjust_brightness, planar.adjust_contrast, planar.adjust_saturation,
         planar.adjust_hue]
  branches = [
      (lambda x, fn=fn, name=name: fn(x, params[name])) if ranges.get(name) is not None
      else (lambda x: x)
      for fn, name in zip(ops, color.JITTER_OPS)]

  def steps(image):
    for step in range(4):
      image = jax.lax.switch(params["order"][step], branches, image)
    return image

  return maybe(spec, steps, image, params["apply"])


def _blur(image: jax.Array, sigma: jax.Array, op) -> jax.Array:
  if op.method == "pil" and not op.quantize:
    return planar.pil_gaussian_blur(image, sigma, op.sigma[1])
  # The other blurs, on channels-last images (each example still its own branch).
  return jnp.transpose(op(jnp.transpose(image, (1, 2, 0)), sigma), (2, 0, 1))


def apply_example(image: jax.Array, params: Params, spec: Any) -> jax.Array:
  """One example's ops (`device_ops.apply_params` and normalisation) on an [H, W, 3] image.

  Args:
    image: uint8 or float [H, W, 3] (float in [0, 1]).
    params: this example's draw (`device_ops.sample_params`).
    spec: the `device_ops.PhotometricSpec`.

  Returns:
    float32 [H, W, 3]: normalised if the spec says so.
  """
  if image.dtype == jnp.uint8:
    image = image.astype(jnp.float32) / 255.0
  image = jnp.transpose(image.astype(jnp.float32), (2, 0, 1))
  if spec.color_jitter is not None and spec.color_jitter.p > 0.0:
    image = _jitter(image, params["color_jitter"], spec.color_jitter)
  if spec.grayscale is not None:
    image = maybe(spec.grayscale, planar.grayscale, image, params["grayscale"]["apply"])
  if spec.gaussian_blur is not None:
    op, drawn = spec.gaussian_blur, params["gaussian_blur"]
    image = maybe(op, lambda x: _blur(x, drawn["sigma"], op), image, drawn["apply"])
  if spec.solarize is not None:
    threshold = spec.solarize.threshold
    image = maybe(spec.solarize, lambda x: color.solarize(x, threshold), image,
                   params["solarize"]["apply"])
  if spec.normalize is not None:
    image = planar.normalize(image, spec.normalize.mean, spec.normalize.std)
  return jnp.transpose(image, (1, 2, 0))


def apply_batch(images: jax.Array, params: Params, spec: Any) -> jax.Array:
  """`apply_example` for each example of a [B, H, W, 3] batch, in a loop; float32 out."""
  return jax.lax.map(lambda args: apply_example(*args, spec), (images, params))

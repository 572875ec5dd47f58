"""iBOT block masks against VISSL's `create_mask` / `get_pred_ratio` transcribed to NumPy, fed
the same uniform numbers as the device version draws."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.data import block_masks

RATIO = dict(ratio_mean=(0.0, 0.3), ratio_var=(0.0, 0.2))  # RoB's MaskedImageModeling
MAX_ROUNDS = 99  # each round masks at least one more patch, at most int(196 * 0.5) = 98


@jax.jit
def device_uniforms(keys):
  """Per image key: the ratio's 2 uniforms and each round's (10, 4), as block_masks draws them."""
  def one(key):
    ratio_key, loop_key = jax.random.split(key)
    rounds = jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(loop_key, r), (10, 4)))
    return jax.random.uniform(ratio_key, (2,)), rounds(jnp.arange(MAX_ROUNDS))
  return jax.vmap(one)(keys)


def vissl_mask(u, rounds, grid, *, aspect_sampling, ratio_mean=(0.0, 0.3),
               ratio_var=(0.0, 0.2), aspect_ratio=(0.3, 1 / 0.3)):
  """VISSL's get_pred_ratio + create_mask, its `random` calls replaced by these uniforms."""
  u = np.asarray(u, np.float64)
  idx = min(int(u[0] * len(ratio_mean)), len(ratio_mean) - 1)  # random.randint(0, n - 1)
  prm, prv = ratio_mean[idx], ratio_var[idx]
  pred_ratio = prm - prv + 2 * prv * u[1] if prv > 0 else prm  # random.uniform
  H, W = grid  # pylint: disable=invalid-name
  high = int(H * W * pred_ratio)
  bounds = aspect_ratio if aspect_sampling == "vissl" else tuple(map(math.log, aspect_ratio))
  mask = np.zeros(grid, dtype=bool)
  mask_count, round_ = 0, 0
  while mask_count < high:
    max_mask_patches = high - mask_count
    draws = rounds[round_]
    round_ += 1
    delta = 0
    for attempt in range(10):
      low = (min(grid) // 3) ** 2
      target_area = low + (max_mask_patches - low) * draws[attempt, 0]
      aspect_ratio_ = math.exp(bounds[0] + (bounds[1] - bounds[0]) * draws[attempt, 1])
      h = int(round(math.sqrt(target_area * aspect_ratio_)))
      w = int(round(math.sqrt(target_area / aspect_ratio_)))
      if w < W and h < H:
        top = int(draws[attempt, 2] * (H - h + 1))  # random.randint(0, H - h)
        left = int(draws[attempt, 3] * (W - w + 1))
        num_masked = mask[top: top + h, left: left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
      if delta > 0:
        break
    if delta == 0:
      break
    mask_count += delta
  return mask


@pytest.mark.parametrize("aspect_sampling", ["vissl", "ibot"])
def test_masks_are_vissls_for_the_same_random_numbers(aspect_sampling):
  grid = (14, 14)
  options = dict(RATIO, aspect_ratio=(0.3, 1 / 0.3), aspect_sampling=aspect_sampling)
  key = jax.random.key(7)
  masks = np.asarray(jax.jit(lambda k: block_masks.block_masks(k, (2, 24), grid, **options))(
      key))
  assert masks.shape == (2, 24, 196) and masks.dtype == bool
  ratio_uniforms, round_uniforms = map(np.asarray, device_uniforms(jax.random.split(key, 48)))
  expected = np.stack([vissl_mask(u, r, grid, aspect_sampling=aspect_sampling)
                       for u, r in zip(ratio_uniforms, round_uniforms)])
  np.testing.assert_array_equal(masks.reshape(48, 14, 14), expected)
  # Half the images unmasked (ratio 0), the others up to int(196 * 0.5) patches.
  counts = masks.reshape(48, -1).sum(-1)
  assert 0 < np.sum(counts == 0) < 48 and counts.max() <= 98
  if aspect_sampling == "vissl":  # exp(U(0.3, 3.33)) > 1: every block is taller than wide
    assert np.all(expected.any(axis=1).sum(-1) <= expected.any(axis=2).sum(-1))


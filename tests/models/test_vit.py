"""ViTs against timm's own code: parity at 224 px and at other sizes, parameter counts,
position-embedding resampling (VISSL/timm and DINO conventions), drop-path, registry.

timm's random init leaves LayerNorms at (1, 0) and biases at 0, which would hide a swapped
scale/bias or a missing bias; the torch model's every 1-D parameter and both tokens are
therefore re-drawn before comparing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from retro_jax.convert.state_dict import load_state_dict
from retro_jax.models import backbone_names
from retro_jax.models import create_backbone
from retro_jax.models import vit

from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import random_images
from torch_reference import relative_error

TIMM_NAMES = {"vit_tiny_patch16": "vit_tiny_patch16_224",
              "vit_small_patch16": "vit_small_patch16_224",
              "vit_base_patch16": "vit_base_patch16_224",
              "vit_large_patch16": "vit_large_patch16_224"}


def _timm_vit(name: str = "vit_small_patch16_224", **kwargs) -> torch.nn.Module:
  return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """LayerNorm scales ~ U(0.5, 1.5), every other 1-D parameter ~ N(0, 0.1^2), tokens ~ N(0, 0.5^2).

  A ViT has no batch norm: this, not `torch_reference.randomise`, is its randomisation.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
        param.uniform_(0.5, 1.5, generator=gen)
      elif param.ndim == 1:
        param.normal_(0.0, 0.1, generator=gen)
      elif name in ("cls_token", "pos_embed"):
        param.normal_(0.0, 0.5, generator=gen)
  return model.eval()


def _dino_interpolate_pos_encoding(pos_embed: torch.Tensor, height: int, width: int,
                                   patch_size: int = 16) -> torch.Tensor:
  """DINO's `VisionTransformer.interpolate_pos_encoding` (facebookresearch/dino), as a function.

  DINO names the input's dims 2 and 3 `w` and `h`; here they are `height` and `width`.
  """
  num_patches = pos_embed.shape[1] - 1
  side = int(math.sqrt(num_patches))
  class_pos_embed = pos_embed[:, 0]
  patch_pos_embed = pos_embed[:, 1:]
  dim = pos_embed.shape[-1]
  h0 = height // patch_size + 0.1
  w0 = width // patch_size + 0.1
  patch_pos_embed = torch.nn.functional.interpolate(
      patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
      scale_factor=(h0 / math.sqrt(num_patches), w0 / math.sqrt(num_patches)),
      mode="bicubic")
  assert int(h0) == patch_pos_embed.shape[-2] and int(w0) == patch_pos_embed.shape[-1]
  patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
  return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.fixture(scope="module")
def timm_vit_small() -> torch.nn.Module:
  return _randomise(_timm_vit(), seed=0)


def _flax_vit(state_dict) -> vit.VisionTransformer:
  model = nnx.eval_shape(lambda: vit.vit_small_patch16(rngs=nnx.Rngs(0)))
  load_state_dict(model, state_dict)
  model.eval()
  return model


@pytest.fixture(scope="module")
def flax_vit_small(timm_vit_small) -> vit.VisionTransformer:
  return _flax_vit(timm_vit_small.state_dict())


def _small_config(**overrides) -> dict:
  return {"embed_dim": 32, "depth": 4, "num_heads": 2, "img_size": 64, **overrides}


@pytest.fixture(scope="module")
def timm_vit_tiny_config() -> torch.nn.Module:
  """A 4-block, 32-wide timm ViT for checks that need no full-size model."""
  return _randomise(VisionTransformer(num_classes=0, **_small_config()), seed=9)


def _small_vit(timm_model: torch.nn.Module, **kwargs) -> vit.VisionTransformer:
  # Filled from torch rather than initialised: random init compiles one XLA kernel per
  # parameter shape, which costs more on CPU than the checks themselves.
  model = nnx.eval_shape(lambda: vit.VisionTransformer(rngs=nnx.Rngs(0), **_small_config(),
                                                       **kwargs))
  load_state_dict(model, timm_model.state_dict())
  return model


@nnx.jit
def _forward(model, images):
  return model(images)


def _torch_tokens(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model.forward_features(nchw(images)).numpy()


def test_matches_timm_at_224(timm_vit_small, flax_vit_small):
  images = random_images(224, seed=1)
  expected = _torch_tokens(timm_vit_small, images)
  out = _forward(flax_vit_small, jnp.asarray(images))
  assert out.feature_map.shape == (2, 197, 384)
  assert relative_error(out.feature_map, expected) <= RTOL
  assert relative_error(out.pooled, expected[:, 0]) <= RTOL


def _two_blocks(name: str) -> dict:
  """The registered architecture `name` (the table its factory builds from) with 2 blocks."""
  return {**vit.ARCHITECTURES[name], "depth": 2}


def test_vit_large_matches_timm_with_two_of_its_blocks():
  # ViT-L/16's width, heads, MLP and patches with two blocks, against timm's
  # vit_large_patch16_224 built with two: the architecture's parity without 300 M parameters
  # (the 24 blocks' depth: the parameter-count test below).
  reference = _randomise(_timm_vit("vit_large_patch16_224", depth=2), seed=4)
  model = nnx.eval_shape(lambda: vit.VisionTransformer(**_two_blocks("vit_large_patch16"),
                                                       rngs=nnx.Rngs(0)))
  load_state_dict(model, reference.state_dict())
  model.eval()
  images = random_images(224, seed=5)
  expected = _torch_tokens(reference, images)
  out = _forward(model, jnp.asarray(images))
  assert out.feature_map.shape == (2, 197, 1024)
  assert relative_error(out.feature_map, expected) <= RTOL


def test_matches_timm_at_96_with_its_resampled_pos_embed(timm_vit_small, flax_vit_small):
  # timm's model built for 96 px, holding the 224 embedding resampled by timm's own function;
  # the Flax model keeps the 224 embedding and resamples it at run time.
  state = dict(timm_vit_small.state_dict())
  state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], [6, 6], [14, 14],
                                              antialias=False)
  reference = _timm_vit(img_size=96).eval()
  reference.load_state_dict(state)
  images = random_images(96, seed=2)
  expected = _torch_tokens(reference, images)
  out = _forward(flax_vit_small, jnp.asarray(images))
  assert out.feature_map.shape == (2, 37, 384)
  assert relative_error(out.feature_map, expected) <= RTOL
  assert relative_error(out.pooled, expected[:, 0]) <= RTOL


def test_dino_offset_matches_dino_in_a_small_timm_vit(timm_vit_tiny_config):
  # The resampling itself is checked against DINO below; this checks the model applies it.
  model = _small_vit(timm_vit_tiny_config, pos_embed_offset=0.1)
  model.train()  # without drop-path, train mode has nothing random: it must match eval torch
  state = dict(timm_vit_tiny_config.state_dict())
  state["pos_embed"] = _dino_interpolate_pos_encoding(state["pos_embed"], 48, 80)
  resized = VisionTransformer(num_classes=0, **_small_config(img_size=(48, 80))).eval()
  resized.load_state_dict(state)
  images = np.random.RandomState(3).randn(2, 48, 80, 3).astype(np.float32)
  out = _forward(model, jnp.asarray(images))
  assert relative_error(out.feature_map, _torch_tokens(resized, images)) <= RTOL


@pytest.mark.parametrize("grid", [(6, 6), (7, 7), (4, 9), (14, 10), (20, 20)])
def test_resample_matches_timm_without_antialias(grid):
  pos_embed = torch.randn(1, 197, 8, generator=torch.Generator().manual_seed(4))
  expected = resample_abs_pos_embed(pos_embed, list(grid), [14, 14], antialias=False)
  actual = vit.resample_pos_embed(jnp.asarray(pos_embed.numpy()), grid, (14, 14))
  assert actual.shape == (1, 1 + grid[0] * grid[1], 8)
  np.testing.assert_array_equal(actual[:, 0], pos_embed[:, 0].numpy())
  assert relative_error(actual, expected.numpy()) <= RTOL


@pytest.mark.parametrize("image_size", [(96, 96), (112, 112), (64, 160)])
def test_resample_with_offset_matches_dino(image_size):
  pos_embed = torch.randn(1, 197, 8, generator=torch.Generator().manual_seed(5))
  expected = _dino_interpolate_pos_encoding(pos_embed, *image_size)
  grid = (image_size[0] // 16, image_size[1] // 16)
  actual = vit.resample_pos_embed(jnp.asarray(pos_embed.numpy()), grid, (14, 14), offset=0.1)
  assert relative_error(actual, expected.numpy()) <= RTOL


def test_native_grid_is_not_resampled():
  pos_embed = jnp.arange(197 * 2, dtype=jnp.float32).reshape(1, 197, 2)
  for offset in (0.0, 0.1):
    assert vit.resample_pos_embed(pos_embed, (14, 14), (14, 14), offset=offset) is pos_embed


@pytest.mark.parametrize("name,width", [("vit_tiny_patch16", 192), ("vit_small_patch16", 384),
                                        ("vit_base_patch16", 768), ("vit_large_patch16", 1024),
                                        ("vit_large_patch7", 1024)])
def test_registered_with_timm_parameter_count_and_width(name, width):
  assert name in backbone_names()
  # ViT-Ls are compared with 2 blocks (24 cost seconds to trace) and their depth on its own.
  large = name.startswith("vit_large")
  with torch.device("meta"):  # shapes only: no time spent on a random init
    # timm has no ViT-L/7: its ViT-L/16 with 7 px patches is MSN's deit_large_p7.
    reference = (_timm_vit("vit_large_patch16_224", patch_size=7) if name == "vit_large_patch7"
                 else _timm_vit(TIMM_NAMES[name]))
    if large:
      assert vit.ARCHITECTURES[name]["depth"] == len(reference.blocks) == 24
      reference.blocks = reference.blocks[:2]
    expected = sum(p.numel() for p in reference.parameters())
  model = nnx.eval_shape(
      lambda: vit.VisionTransformer(**_two_blocks(name), rngs=nnx.Rngs(0)) if large else
      create_backbone(name, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == expected
  assert model.feature_width == width


def test_drop_path_rates_increase_linearly():
  model = nnx.eval_shape(lambda: vit.VisionTransformer(rngs=nnx.Rngs(0), drop_path_rate=0.3,
                                                       **_small_config()))
  np.testing.assert_allclose([b.drop_path.rate for b in model.blocks], [0.0, 0.1, 0.2, 0.3])


def test_drop_path_drops_whole_branches_per_sample_in_train_mode_only():
  block = nnx.jit(lambda: vit.Block(16, 2, 4.0, 0.5, dtype=None,
                                    rngs=nnx.Rngs(params=0, dropout=1)))()
  x = jnp.asarray(np.random.RandomState(6).randn(16, 5, 16).astype(np.float32))

  @nnx.jit
  def outputs(block, x):
    # Both drop patterns of each branch, and two independent draws of the block.
    attn = block.attn(block.norm1(x))
    options = []
    for keep_attn in (False, True):
      h = x + attn / 0.5 if keep_attn else x
      mlp = block.mlp(block.norm2(h))
      options += [h, h + mlp / 0.5]
    return jnp.stack(options), block(x), block(x), x + attn + block.mlp(block.norm2(x + attn))

  block.train()
  options, first, second, no_drop = outputs(block, x)
  errors = jnp.max(jnp.abs(options - first[None]), axis=(2, 3))  # (4 patterns, batch)
  assert float(jnp.max(jnp.min(errors, axis=0))) < 1e-5, "a sample is not one drop pattern"
  assert len(set(np.asarray(jnp.argmin(errors, axis=0)).tolist())) > 1, "mask not per sample"
  assert not np.allclose(second, first), "each call must draw a new mask"
  block.eval()
  np.testing.assert_allclose(_forward(block, x), no_drop, rtol=1e-6, atol=1e-6)


def test_token_layout_for_non_square_input(timm_vit_tiny_config):
  model = _small_vit(timm_vit_tiny_config)
  model.eval()
  out = _forward(model, jnp.zeros((2, 48, 80, 3), jnp.float32))  # 3 x 5 patches
  assert out.feature_map.shape == (2, 1 + 15, 32)
  np.testing.assert_array_equal(out.pooled, out.feature_map[:, 0])


def test_bfloat16_compute_stays_close_to_float32(timm_vit_tiny_config):
  model = _small_vit(timm_vit_tiny_config)
  low = _small_vit(timm_vit_tiny_config, dtype=jnp.bfloat16)
  model.eval()
  low.eval()
  images = jnp.asarray(random_images(64, seed=8))
  out, out_low = _forward(model, images), _forward(low, images)
  assert out_low.feature_map.dtype == jnp.bfloat16
  assert relative_error(out_low.feature_map.astype(jnp.float32), out.feature_map) < 3e-2

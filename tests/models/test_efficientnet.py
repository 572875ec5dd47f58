"""EfficientNet-B0/B1 against the real torchvision and timm models (random weights, eval mode)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import timm
import torch
import torchvision

from retro_jax.convert.state_dict import StateDictMismatchError
from retro_jax.convert.state_dict import load_state_dict
from retro_jax.convert.timm_layout import timm_backbone_kwargs
from retro_jax.convert.timm_layout import timm_to_torchvision_keys
from retro_jax.models import create_backbone
from retro_jax.models.efficientnet import MBConv

from torch_reference import assert_feature_parity
from torch_reference import backbone_state
from torch_reference import num_params
from torch_reference import random_images
from torch_reference import randomise


def _build(name: str, torch_model: torch.nn.Module, **kwargs) -> nnx.Module:
  """The backbone built abstractly and filled from `torch_model`, in eval mode.

  Building abstractly skips the ~100 small XLA compiles of random initialisation (most of
  this file's run time otherwise); without stochastic depth the model then holds nothing
  but parameters and batch statistics, which loading fills.
  """
  model = nnx.eval_shape(
      lambda: create_backbone(name, rngs=nnx.Rngs(0), drop_path_rate=0.0, **kwargs))
  load_state_dict(model, backbone_state(torch_model))
  model.eval()
  return model


@pytest.fixture(scope="module")
def b0_torch() -> torch.nn.Module:
  torch.manual_seed(0)
  return randomise(torchvision.models.efficientnet_b0(), seed=1)


@pytest.fixture(scope="module")
def b0(b0_torch) -> nnx.Module:
  return _build("efficientnet_b0", b0_torch)


def test_b0_matches_torchvision_at_224(b0, b0_torch):
  assert b0.feature_width == b0_torch.classifier[1].in_features == 1280
  assert num_params(b0) == sum(p.numel() for k, p in b0_torch.named_parameters()
                                if not k.startswith("classifier."))
  assert_feature_parity(b0, b0_torch.features, random_images(224))


def test_b1_matches_torchvision_at_low_resolution():
  torch.manual_seed(2)
  reference = randomise(torchvision.models.efficientnet_b1(), seed=3)
  model = _build("efficientnet_b1", reference)
  assert model.feature_width == 1280
  assert num_params(model) == sum(p.numel() for k, p in reference.named_parameters()
                                   if not k.startswith("classifier."))
  assert_feature_parity(model, reference.features, random_images(64, seed=1))


def test_b0_matches_timm_through_key_renaming(b0):
  torch.manual_seed(4)
  reference = randomise(timm.create_model("efficientnet_b0", pretrained=False), seed=5)
  renamed = timm_to_torchvision_keys("efficientnet_b0", reference.state_dict())
  assert sorted(renamed.head) == ["classifier.bias", "classifier.weight"]
  assert timm_backbone_kwargs("efficientnet_b0") == {}
  model = nnx.clone(b0)  # Same graph as the torchvision-loaded model: no new compile.
  load_state_dict(model, renamed.backbone)
  assert_feature_parity(model, reference.forward_features, random_images(224, seed=2))


def test_timm_b1_keys_and_shapes_equal_torchvision():
  timm_state = timm.create_model("efficientnet_b1", pretrained=False).state_dict()
  ours = backbone_state(torchvision.models.efficientnet_b1())
  renamed = timm_to_torchvision_keys("efficientnet_b1", timm_state)
  assert {k: tuple(v.shape) for k, v in renamed.backbone.items()} == {
      k: tuple(v.shape) for k, v in ours.items()}


def test_unrecognised_timm_key_is_refused_by_strict_loading(b0):
  timm_state = timm.create_model("efficientnet_b0", pretrained=False).state_dict()
  timm_state["blocks.3.1.conv_dww.weight"] = timm_state.pop("blocks.3.1.conv_dw.weight")
  renamed = timm_to_torchvision_keys("efficientnet_b0", timm_state)
  with pytest.raises(StateDictMismatchError) as error:
    load_state_dict(nnx.clone(b0), renamed.backbone)
  assert error.value.unexpected == ["blocks.3.1.conv_dww.weight"]
  assert error.value.missing == ["features.4.1.block.1.0.weight"]


def test_batch_norm_and_stochastic_depth_follow_torchvision(b0, b0_torch):
  ours = [m for _, m in nnx.iter_modules(b0) if isinstance(m, nnx.BatchNorm)]
  theirs = [m for m in b0_torch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert len(ours) == len(theirs)
  assert [m.epsilon for m in ours] == [m.eps for m in theirs]
  assert [m.momentum for m in ours] == pytest.approx([1 - m.momentum for m in theirs])
  default = nnx.eval_shape(lambda: create_backbone("efficientnet_b0", rngs=nnx.Rngs(0)))
  our_rates = [m.stochastic_depth.rate for _, m in nnx.iter_modules(default)
               if isinstance(m, MBConv)]
  their_rates = [m.stochastic_depth.p for m in b0_torch.modules()
                 if isinstance(m, torchvision.models.efficientnet.MBConv)]
  assert our_rates == pytest.approx(their_rates)
  assert their_rates[-1] > 0.18


def test_stochastic_depth_drops_whole_rows_in_train_mode_only():
  block = MBConv(8, 8, expand_ratio=1, kernel=3, stride=1, drop_path_rate=0.5,
                 rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 4, 4, 8), dtype=np.float32))

  @nnx.jit
  def branch_and_output(block, x):
    branch = x
    for layer in block.block:
      branch = layer(branch)
    return branch, block(x)

  block.train()
  branch, y = branch_and_output(block, x)
  delta = np.asarray(y - x)
  kept = np.abs(delta).reshape(32, -1).max(axis=1) > 0
  assert 4 <= kept.sum() <= 28  # Rows are dropped and kept; p = 0.5, 32 rows, fixed seed.
  np.testing.assert_allclose(delta[kept], 2 * np.asarray(branch)[kept], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(delta[~kept], 0)
  block.eval()
  assert block.stochastic_depth(x) is x

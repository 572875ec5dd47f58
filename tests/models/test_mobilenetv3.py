"""MobileNetV3-Large/Small against the real torchvision and timm models (random weights, eval)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
import timm
import torch
import torchvision

from retro_jax.convert.state_dict import load_state_dict
from retro_jax.convert.timm_layout import timm_backbone_kwargs
from retro_jax.convert.timm_layout import timm_to_torchvision_keys
from retro_jax.models import create_backbone

from torch_reference import assert_feature_parity
from torch_reference import backbone_state
from torch_reference import nchw
from torch_reference import num_params
from torch_reference import random_images
from torch_reference import randomise
from torch_reference import relative_error


def _abstract(name: str, **kwargs) -> nnx.Module:
  # Building abstractly skips the many small XLA compiles of random initialisation; loading
  # a state dict then fills every variable (MobileNetV3 holds no random streams).
  return nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), **kwargs))


def _build(name: str, state: dict[str, torch.Tensor], **kwargs) -> nnx.Module:
  model = _abstract(name, **kwargs)
  load_state_dict(model, state)
  model.eval()
  return model


@pytest.mark.parametrize("name, width, size", [("mobilenet_v3_large", 960, 224),
                                               ("mobilenet_v3_small", 576, 64)])
def test_matches_torchvision(name, width, size):
  torch.manual_seed(0)
  reference = randomise(getattr(torchvision.models, name)(), seed=1)
  model = _build(name, backbone_state(reference))
  assert model.feature_width == reference.classifier[0].in_features == width
  assert num_params(model) == sum(p.numel() for k, p in reference.named_parameters()
                                   if not k.startswith("classifier."))
  assert_feature_parity(model, reference.features, random_images(size))


def test_large_matches_timm_and_timm_head_sits_after_our_pool():
  torch.manual_seed(2)
  reference = randomise(timm.create_model("mobilenetv3_large_100", pretrained=False), seed=3)
  renamed = timm_to_torchvision_keys("mobilenetv3_large_100", reference.state_dict())
  assert sorted(renamed.head) == ["classifier.bias", "classifier.weight", "conv_head.bias",
                                  "conv_head.weight"]
  model = _build("mobilenet_v3_large", renamed.backbone,
                 **timm_backbone_kwargs("mobilenetv3_large_100"))
  images = random_images(64, seed=1)
  pooled = assert_feature_parity(model, reference.forward_features, images)
  # timm's conv_head is a Linear on our pooled feature (torchvision's classifier.0): the
  # full timm forward is head(pooled).
  with torch.no_grad():
    hidden = torch.nn.functional.linear(torch.from_numpy(np.array(pooled)),
                                        reference.conv_head.weight.flatten(1),
                                        reference.conv_head.bias)
    logits = reference.classifier(torch.nn.functional.hardswish(hidden))
    assert relative_error(logits, reference(nchw(images))) <= 1e-5


def test_timm_small_keys_and_shapes_equal_torchvision():
  timm_state = timm.create_model("mobilenetv3_small_100", pretrained=False).state_dict()
  renamed = timm_to_torchvision_keys("mobilenetv3_small_100", timm_state)
  assert sorted(renamed.head) == ["classifier.bias", "classifier.weight", "conv_head.bias",
                                  "conv_head.weight"]
  ours = backbone_state(torchvision.models.mobilenet_v3_small())
  assert {k: tuple(v.shape) for k, v in renamed.backbone.items()} == {
      k: tuple(v.shape) for k, v in ours.items()}


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_batch_norm_eps_and_momentum_follow_the_source(source):
  if source == "torchvision":
    reference = torchvision.models.mobilenet_v3_large()
    model = _abstract("mobilenet_v3_large")
  else:
    reference = timm.create_model("mobilenetv3_large_100", pretrained=False)
    model = _abstract("mobilenet_v3_large", **timm_backbone_kwargs("mobilenetv3_large_100"))
  ours = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
  theirs = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert len(ours) == len(theirs)
  assert [m.epsilon for m in ours] == [m.eps for m in theirs]
  assert [m.momentum for m in ours] == pytest.approx([1 - m.momentum for m in theirs])


def test_conv_head_is_timms_forward_features_of_the_retro_code():
  """`conv_head=True`: the (B, 1, 1, 1280) map the Retro code's adapter reads.

  The Retro/DisCo student is timm's `mobilenetv3_large_100`, whose `forward_features` in
  their copy of timm pools, then applies `conv_head` (960 -> 1280, with bias) and Hardswish
  (Reused-Teacher-Projector `DisCo/models/mobilenetv3.py` lines 129-136); timm 1.0 does the
  same in `forward_head(..., pre_logits=True)`.
  """
  torch.manual_seed(4)
  reference = randomise(timm.create_model("mobilenetv3_large_100", pretrained=False), seed=5)
  renamed = timm_to_torchvision_keys("mobilenetv3_large_100", reference.state_dict())
  state = dict(renamed.backbone)
  state["classifier.0.weight"] = reference.conv_head.weight.flatten(1)
  state["classifier.0.bias"] = reference.conv_head.bias
  model = _build("mobilenet_v3_large", state, conv_head=True,
                 **timm_backbone_kwargs("mobilenetv3_large_100"))
  assert model.feature_width == reference.conv_head.out_channels == 1280
  assert num_params(model) == sum(p.numel() for k, p in reference.named_parameters()
                                   if not k.startswith("classifier."))

  def timm_head_stage(x):
    x = reference.global_pool(reference.forward_features(x))
    return reference.act2(reference.norm_head(reference.conv_head(x)))

  images = random_images(64, seed=6)
  pooled = assert_feature_parity(model, timm_head_stage, images)  # (2, 1, 1, 1280) maps
  with torch.no_grad():
    expected = reference.forward_head(reference.forward_features(nchw(images)), pre_logits=True)
  assert relative_error(pooled, expected) <= 1e-5
  # Without the head stage the backbone stays torchvision's: 960 channels, stride 32.
  assert _abstract("mobilenet_v3_large").feature_width == 960

"""ResNets against torchvision's own code: parity, parameter counts, BN modes, registry.

Torch models get random weights and random batch-norm statistics, so a wrong epsilon,
padding, stride position or statistics mapping shows up as a large relative error. Flax
models are built abstractly (`nnx.eval_shape`) and filled by `load_state_dict`, which skips
the cost of a random initialisation that is overwritten anyway.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from torch import nn
from torchvision.models.resnet import Bottleneck as TorchBottleneck

from retro_jax.convert.state_dict import load_state_dict
from retro_jax.models import create_backbone
from retro_jax.models import resnet

from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import random_images
from torch_reference import randomise
from torch_reference import relative_error

DEPTHS = {"resnet18": (resnet.BasicBlock, (2, 2, 2, 2)),
          "resnet34": (resnet.BasicBlock, (3, 4, 6, 3)),
          "resnet50": (resnet.Bottleneck, (3, 4, 6, 3)),
          "resnet101": (resnet.Bottleneck, (3, 4, 23, 3)),
          "resnet152": (resnet.Bottleneck, (3, 8, 36, 3)),
          "resnet50x2": (resnet.Bottleneck, (3, 4, 6, 3))}


class SwAVResNet50w2(torchvision.models.resnet.ResNet):
  """torchvision's ResNet built by its own `_make_layer` with every width doubled.

  This is SwAV's `resnet50w2` (stem 128 channels, stages of 128/256/512/1024 planes, 4096
  features) in torchvision's key layout. torchvision's constructor hard-codes a 64-channel
  stem and 64 first-stage planes, so the stem and the stages are rebuilt here from
  torchvision's Bottleneck. `width_per_group` stays 64 as in SwAV's released code (its
  bottleneck width equals `planes`): 93.9 M parameters, SwAV's published "94M" for RN50-w2.
  (An earlier SwAV revision also multiplied `width_per_group`, a 267 M-parameter net that
  matches neither the paper nor the checkpoints.)
  """

  def __init__(self):
    super().__init__(TorchBottleneck, [3, 4, 6, 3])
    self.inplanes = 128
    self.conv1 = nn.Conv2d(3, 128, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(128)
    self.layer1 = self._make_layer(TorchBottleneck, 128, 3)
    self.layer2 = self._make_layer(TorchBottleneck, 256, 4, stride=2)
    self.layer3 = self._make_layer(TorchBottleneck, 512, 6, stride=2)
    self.layer4 = self._make_layer(TorchBottleneck, 1024, 3, stride=2)
    self.fc = nn.Identity()


def _torch_backbone(name: str, *, low_res_stem: bool = False, in_channels: int = 3) -> nn.Module:
  """A torch model with `fc` removed (so its forward returns the pooled feature)."""
  model = SwAVResNet50w2() if name == "resnet50x2" else getattr(torchvision.models, name)()
  model.fc = nn.Identity()
  if low_res_stem:  # the CIFAR-style stem `ResNet(low_res_stem=True)` stands for
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
  return model


def _flax_from_torch(name: str, torch_model: nn.Module, **kwargs) -> resnet.ResNet:
  model = nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0), **kwargs))
  load_state_dict(model, torch_model.state_dict())
  model.eval()
  return model


def _torch_forward(model: nn.Module, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """torchvision's own forward; the last map is caught by a hook on `layer4`."""
  caught = {}
  hook = model.layer4.register_forward_hook(lambda m, i, out: caught.update(map=out))
  try:
    with torch.no_grad():
      pooled = model(nchw(images_nhwc))
  finally:
    hook.remove()
  return caught["map"].numpy().transpose(0, 2, 3, 1), pooled.numpy()


@nnx.jit
def _flax_forward(model: resnet.ResNet, images: jax.Array):
  return model(images)


@functools.cache
def _pair(name: str, low_res_stem: bool = False, in_channels: int = 3):
  """(torch model, flax model) with the same random weights; cached for the module."""
  torch_model = randomise(
      _torch_backbone(name, low_res_stem=low_res_stem, in_channels=in_channels), seed=0)
  kwargs = {"low_res_stem": True, "in_channels": in_channels} if low_res_stem else {}
  return torch_model, _flax_from_torch(name, torch_model, **kwargs)


@pytest.mark.parametrize("name,size,map_size", [
    ("resnet18", 224, 7),
    ("resnet50", 64, 2),
    # 94 M parameters: ~8 s of CPU for building, loading and compiling.
    pytest.param("resnet50x2", 32, 1, marks=pytest.mark.slow),
])
def test_matches_torchvision(name, size, map_size):
  torch_model, model = _pair(name)
  images = random_images(size)
  expected_map, expected_pooled = _torch_forward(torch_model, images)
  out = _flax_forward(model, jnp.asarray(images))
  assert out.feature_map.shape == (2, map_size, map_size, model.feature_width)
  assert out.pooled.shape == (2, model.feature_width)
  assert relative_error(out.feature_map, expected_map) <= RTOL
  assert relative_error(out.pooled, expected_pooled) <= RTOL


def test_low_res_stem_matches_torch_cifar_stem_on_one_channel():
  torch_model, model = _pair("resnet18", low_res_stem=True, in_channels=1)
  images = random_images(28, channels=1)
  expected_map, expected_pooled = _torch_forward(torch_model, images)
  out = _flax_forward(model, jnp.asarray(images))
  assert out.feature_map.shape == (2, 4, 4, 512)
  assert relative_error(out.feature_map, expected_map) <= RTOL
  assert relative_error(out.pooled, expected_pooled) <= RTOL


def test_low_res_stem_keeps_a_4x4_map_at_32px():
  model = nnx.eval_shape(lambda: resnet.resnet18(low_res_stem=True, rngs=nnx.Rngs(0)))
  assert model.conv1.kernel.shape == (3, 3, 3, 64)
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.feature_map.shape == (2, 4, 4, 512)
  assert out.pooled.shape == (2, 512)


def _torch_param_count(name: str) -> int:
  with torch.device("meta"):  # shapes only: nothing is allocated or initialised
    model = _torch_backbone(name)
  return sum(p.numel() for p in model.parameters())


# Tracing a deep NNX constructor costs O(variables^2) in flax 0.12 (every RNG draw under a
# trace builds an error message that scans the whole trace), ~3 s of CPU for ResNet-101 and
# ~6 s for ResNet-152; they run with the slow tests.
@pytest.mark.parametrize("name", [
    "resnet18", "resnet34", "resnet50", "resnet50x2",
    pytest.param("resnet101", marks=pytest.mark.slow),
    pytest.param("resnet152", marks=pytest.mark.slow),
])
def test_registry_builds_the_architecture_with_torch_parameter_count(name):
  block, layers = DEPTHS[name]
  model = nnx.eval_shape(lambda: create_backbone(name, rngs=nnx.Rngs(0)))
  assert isinstance(model, resnet.ResNet)
  stages = (model.layer1, model.layer2, model.layer3, model.layer4)
  assert tuple(len(stage) for stage in stages) == layers
  assert all(isinstance(b, block) for stage in stages for b in stage)
  expected_width = {"resnet18": 512, "resnet34": 512, "resnet50x2": 4096}.get(name, 2048)
  assert model.feature_width == expected_width
  params = nnx.state(model, nnx.Param)
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
  assert count == _torch_param_count(name)  # torch's `fc` was replaced by Identity
  if name == "resnet50x2":
    assert round(count / 1e6) == 94  # SwAV paper, Table: RN50-w2 has 94M parameters


def test_train_mode_uses_and_updates_batch_statistics_like_torch():
  torch_model, model = _pair("resnet18", low_res_stem=True, in_channels=1)
  torch_model, model = copy.deepcopy(torch_model), nnx.clone(model)
  images = random_images(28, channels=1, seed=1)
  before = np.asarray(model.layer2[0].bn1.mean.get_value())

  torch_model.train()
  model.train()
  expected_map, _ = _torch_forward(torch_model, images)
  out = _flax_forward(model, jnp.asarray(images))
  # Batch statistics normalise (and torch agrees; flax computes the variance as
  # E[x^2] - E[x]^2, hence a looser bound), and the running mean moved like torch's (momentum
  # 0.1). Not compared: torch's running_var takes the unbiased batch variance, flax's the
  # biased one (0.3% apart on the 4x4 maps of layer4 here).
  assert relative_error(out.feature_map, expected_map) <= 2e-5
  after = np.asarray(model.layer2[0].bn1.mean.get_value())
  assert np.abs(after - before).max() > 1e-3
  np.testing.assert_allclose(after, torch_model.layer2[0].bn1.running_mean.numpy(),
                             rtol=1e-4, atol=1e-5)

  model.eval()
  first = _flax_forward(model, jnp.asarray(images))
  second = _flax_forward(model, jnp.asarray(images))
  np.testing.assert_array_equal(model.layer2[0].bn1.mean.get_value(), after)
  np.testing.assert_array_equal(first.pooled, second.pooled)
  assert relative_error(first.feature_map, out.feature_map) > 1e-2


def test_initialisation_follows_torchvision():
  # Blocks rather than a whole net: every new kernel shape costs one XLA compile of the
  # random-number generator (seconds on 2 cores); these two blocks need three shapes, and the
  # RBG generator compiles faster than threefry. The init rules do not depend on the stream.
  rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
  bottleneck = resnet.Bottleneck(32, 32, zero_init_residual=True, rngs=rngs)
  basic = resnet.BasicBlock(32, 32, zero_init_residual=True, rngs=rngs)
  plain = resnet.BasicBlock(32, 32, rngs=rngs)
  for block, last_bn in ((bottleneck, "bn3"), (basic, "bn2"), (plain, None)):
    for path, bn in nnx.iter_graph(block):
      if isinstance(bn, nnx.BatchNorm):
        np.testing.assert_array_equal(bn.scale.get_value(), 0.0 if path[0] == last_bn else 1.0)
        np.testing.assert_array_equal(bn.bias.get_value(), 0.0)
  assert bottleneck.downsample is not None and basic.downsample is None
  kernel = np.asarray(bottleneck.conv2.kernel.get_value())  # 3x3, 32 -> 32
  kh, kw, _, out = kernel.shape
  expected_std = np.sqrt(2.0 / (kh * kw * out))  # kaiming normal, fan_out, untruncated
  assert abs(kernel.std() / expected_std - 1.0) < 0.05
  assert np.abs(kernel).max() > 2.5 * expected_std  # a truncated normal stops at 2 std


def test_bfloat16_compute_stays_close_to_float32():
  torch_model, reference = _pair("resnet18", low_res_stem=True, in_channels=1)
  model = _flax_from_torch("resnet18", torch_model, low_res_stem=True, in_channels=1,
                           dtype=jnp.bfloat16)
  images = jnp.asarray(random_images(28, channels=1))
  out, expected = _flax_forward(model, images), _flax_forward(reference, images)
  assert out.pooled.dtype == jnp.bfloat16
  assert model.layer1[0].conv1.kernel.get_value().dtype == jnp.float32
  assert relative_error(out.pooled, expected.pooled) < 3e-2

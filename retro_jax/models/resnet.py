"""ResNet-18/34/50/101/152 and SwAV's ResNet-50w2 in torchvision's layout, without `fc`.

The attribute tree mirrors torchvision's `ResNet` (`conv1`, `bn1`, `layer1`..`layer4`, blocks
with `conv1`/`bn1`/`conv2`/`bn2`[/`conv3`/`bn3`] and `downsample.0`/`downsample.1`), so
torchvision, MoCo, DINO and SwAV state dicts load by rule (see `retro_jax.convert`). The
backbone stops at the global average pool: a checkpoint's `fc` belongs to a head.

Bottlenecks are torchvision's "v1.5" (stride on the 3x3 convolution), which is what MoCo,
DINO and SwAV trained. ResNet-50w2 (`resnet50x2`) is SwAV's: every width doubled, the stem
included (128 channels, 4096 features); torchvision's `wide_resnet50_2` is a different net
(only the inner bottleneck width doubles). As in SwAV's released code (and its published
94 M parameters) the bottleneck width equals the stage's planes. SwAV pads its stem input
by 1 and then convolves with padding 2, which equals the padding 3 used here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.batch_norm import BatchNorm
from retro_jax.models.conv import Conv
from retro_jax.models.registry import BackboneOutput
from retro_jax.models.registry import register_backbone

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch BatchNorm2d: eps 1e-5, running = 0.9 * running + 0.1 * batch (momentum 0.1).
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int, *, dtype: Any,
          rngs: nnx.Rngs) -> Conv:
  # Explicit symmetric padding as torch: 'SAME' pads differently for stride 2 on even sizes.
  # Conv computes the 1x1 ones (bottlenecks, downsample) as dots, much faster on CPU.
  pad = kernel // 2
  return Conv(in_channels, out_channels, (kernel, kernel), strides=(stride, stride),
              padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_CONV_INIT,
              dtype=dtype, rngs=rngs)


def _batch_norm(channels: int, *, dtype: Any, rngs: nnx.Rngs,
                zero_scale: bool = False) -> BatchNorm:
  scale_init = nnx.initializers.zeros if zero_scale else nnx.initializers.ones
  return BatchNorm(channels, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                   scale_init=scale_init, dtype=dtype, rngs=rngs)


def _downsample(in_channels: int, out_channels: int, stride: int, *, dtype: Any,
                rngs: nnx.Rngs) -> nnx.List | None:
  """torchvision's projection shortcut `Sequential(conv1x1, bn)`, or None for identity."""
  if stride == 1 and in_channels == out_channels:
    return None
  return nnx.List([_conv(in_channels, out_channels, 1, stride, dtype=dtype, rngs=rngs),
                   _batch_norm(out_channels, dtype=dtype, rngs=rngs)])


def _shortcut(downsample: nnx.List | None, x: jax.Array) -> jax.Array:
  if downsample is None:
    return x
  conv, bn = downsample
  return bn(conv(x))


class BasicBlock(nnx.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

  expansion = 1

  def __init__(self, in_channels: int, planes: int, stride: int = 1, *,
               zero_init_residual: bool = False, dtype: Any = None, rngs: nnx.Rngs):
    self.conv1 = _conv(in_channels, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, 1, dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(planes, dtype=dtype, rngs=rngs, zero_scale=zero_init_residual)
    self.downsample = _downsample(in_channels, planes, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, residual (ResNet-50+)."""

  expansion = 4

  def __init__(self, in_channels: int, planes: int, stride: int = 1, *,
               zero_init_residual: bool = False, dtype: Any = None, rngs: nnx.Rngs):
    out_channels = planes * self.expansion
    self.conv1 = _conv(in_channels, planes, 1, 1, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(planes, out_channels, 1, 1, dtype=dtype, rngs=rngs)
    self.bn3 = _batch_norm(out_channels, dtype=dtype, rngs=rngs, zero_scale=zero_init_residual)
    self.downsample = _downsample(in_channels, out_channels, stride, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return nnx.relu(y + _shortcut(self.downsample, x))


class ResNet(nnx.Module):
  """A ResNet backbone up to the global average pool.

  Attributes:
    feature_width: channels of the last feature map (512 for ResNet-18/34, 2048 for
      ResNet-50/101/152, 4096 for ResNet-50w2).
    low_res_stem: whether the stem is the small-image one (no downsampling before layer1).
  """

  def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], *,
               width: int = 64, in_channels: int = 3, low_res_stem: bool = False,
               zero_init_residual: bool = False, dtype: Any = None, rngs: nnx.Rngs):
    """Builds the network with torchvision's initialisation.

    Args:
      block: `BasicBlock` or `Bottleneck`.
      layers: number of blocks in each of the four stages.
      width: stem channels and planes of the first stage (64; 128 for SwAV's ResNet-50w2);
        later stages double it.
      in_channels: image channels (1 for Fashion-MNIST).
      low_res_stem: a 3x3 stride-1 first convolution and no max-pool, for 28-32 px images
        (32 px input -> 4x4 final map instead of 1x1). The usual CIFAR stem; torch
        equivalent: `conv1 = Conv2d(in, width, 3, 1, 1, bias=False)`, `maxpool = Identity()`.
      zero_init_residual: start the last BN scale of every block at 0, so each block
        starts as the identity (torchvision's option of the same name).
      dtype: computation dtype (e.g. jnp.bfloat16 for a frozen teacher); parameters and
        batch statistics stay float32.
      rngs: initialisation randomness.
    """
    if len(layers) != 4:
      raise ValueError(f"a ResNet has 4 stages, got layers={tuple(layers)}")
    self.low_res_stem = low_res_stem
    if low_res_stem:
      self.conv1 = _conv(in_channels, width, 3, 1, dtype=dtype, rngs=rngs)
    else:
      self.conv1 = _conv(in_channels, width, 7, 2, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(width, dtype=dtype, rngs=rngs)

    channels = width

    def stage(planes: int, num_blocks: int, stride: int) -> nnx.List:
      nonlocal channels
      blocks = []
      for i in range(num_blocks):
        blocks.append(block(channels, planes, stride if i == 0 else 1,
                            zero_init_residual=zero_init_residual, dtype=dtype, rngs=rngs))
        channels = planes * block.expansion
      return nnx.List(blocks)

    self.layer1 = stage(width, layers[0], 1)
    self.layer2 = stage(width * 2, layers[1], 2)
    self.layer3 = stage(width * 4, layers[2], 2)
    self.layer4 = stage(width * 8, layers[3], 2)
    self.feature_width = channels

  def __call__(self, x: jax.Array) -> BackboneOutput:
    """Maps NHWC images (B, H, W, in_channels) to the last map and its global average."""
    x = nnx.relu(self.bn1(self.conv1(x)))
    if not self.low_res_stem:
      # Pads with -inf, as torch's MaxPool2d(3, 2, padding=1).
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return BackboneOutput(feature_map=x, pooled=jnp.mean(x, axis=(1, 2)))


@register_backbone("resnet18")
def resnet18(*, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-18: 11.18 M parameters, 512 features. `kwargs` go to `ResNet`."""
  return ResNet(BasicBlock, (2, 2, 2, 2), rngs=rngs, **kwargs)


@register_backbone("resnet34")
def resnet34(*, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-34: 21.28 M parameters, 512 features. `kwargs` go to `ResNet`."""
  return ResNet(BasicBlock, (3, 4, 6, 3), rngs=rngs, **kwargs)


@register_backbone("resnet50")
def resnet50(*, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-50: 23.51 M parameters, 2048 features. `kwargs` go to `ResNet`."""
  return ResNet(Bottleneck, (3, 4, 6, 3), rngs=rngs, **kwargs)


@register_backbone("resnet101")
def resnet101(*, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-101: 42.50 M parameters, 2048 features. `kwargs` go to `ResNet`."""
  return ResNet(Bottleneck, (3, 4, 23, 3), rngs=rngs, **kwargs)


@register_backbone("resnet152")
def resnet152(*, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """ResNet-152: 58.14 M parameters, 2048 features. `kwargs` go to `ResNet`."""
  return ResNet(Bottleneck, (3, 8, 36, 3), rngs=rngs, **kwargs)


@register_backbone("resnet50x2")
def resnet50x2(*, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
  """SwAV's ResNet-50w2: 93.91 M parameters, 4096 features. `kwargs` go to `ResNet`."""
  return ResNet(Bottleneck, (3, 4, 6, 3), width=128, rngs=rngs, **kwargs)

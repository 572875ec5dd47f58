"""EfficientNet-B0/B1 in torchvision's layout, up to the global average pool.

The attribute tree mirrors torchvision's `EfficientNet.features`: `features.0` is the stem
(`Conv2dNormActivation`: conv `0`, BatchNorm `1`, SiLU), `features.1`..`features.7` are the
stages of MBConv blocks (`features.S.B.block.L.K`, with the squeeze-excitation as
`block.L.fc1`/`fc2`), and `features.8` is the final 1x1 convolution to 1280 channels. The
classifier (dropout + linear) is a head, not part of the backbone. timm's `efficientnet_b0/b1`
compute the same function under other names; `retro_jax.convert.timm_layout` renames them.

The building blocks here (`ConvNormAct`, `SqueezeExcitation`, `make_divisible`) are
torchvision's `ops.misc` ones and are shared with `retro_jax.models.mobilenetv3`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.batch_norm import BatchNorm
from retro_jax.models.conv import Conv
from retro_jax.models.depthwise import DepthwiseConv
from retro_jax.models.registry import BackboneOutput
from retro_jax.models.registry import register_backbone

Activation = Callable[[jax.Array], jax.Array]

# torchvision: kaiming_normal_(mode="fan_out") for every conv, an untruncated normal.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """torchvision's `_make_divisible`: round to a multiple of `divisor`, losing <= 10%."""
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class ConvNormAct(nnx.List):
  """torchvision's `Conv2dNormActivation`: conv (no bias) `0`, BatchNorm `1`, activation.

  A list, so the parameters sit at `0.weight`, `1.weight`, ... as in torch's Sequential.
  A convolution with as many groups as channels is a `DepthwiseConv`, a dense one a `Conv`
  (1x1 as a dot); both are fast on CPU.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
               *, groups: int = 1, activation: Activation | None, bn_eps: float,
               bn_momentum: float, dtype: Any = None, rngs: nnx.Rngs):
    """Builds the three layers.

    Args:
      in_channels: input channels.
      out_channels: output channels.
      kernel_size: square kernel size; padding is torch's `(kernel_size - 1) // 2`.
      stride: spatial stride.
      groups: 1, or `in_channels == out_channels` for a depthwise convolution.
      activation: applied after the BatchNorm; None for a linear projection.
      bn_eps: BatchNorm epsilon.
      bn_momentum: BatchNorm momentum in torch's convention (weight of the batch statistic).
      dtype: computation dtype of the conv and BatchNorm (parameters stay float32).
      rngs: initialisation randomness.
    """
    pad = (kernel_size - 1) // 2
    if groups == 1:
      conv = Conv(in_channels, out_channels, (kernel_size, kernel_size),
                  strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  use_bias=False, kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)
    elif groups == in_channels == out_channels:
      conv = DepthwiseConv(in_channels, kernel_size, stride, pad, kernel_init=CONV_INIT,
                           dtype=dtype, rngs=rngs)
    else:
      raise ValueError(f"only dense or depthwise convolutions, got groups={groups} for "
                       f"{in_channels}->{out_channels} channels")
    layers: list[Any] = [
        conv,
        BatchNorm(out_channels, epsilon=bn_eps, momentum=1.0 - bn_momentum, dtype=dtype,
                  rngs=rngs),
    ]
    if activation is not None:
      layers.append(activation)
    super().__init__(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self:
      x = layer(x)
    return x


class SqueezeExcitation(nnx.Module):
  """torchvision's `SqueezeExcitation`: x * gate(fc2(act(fc1(mean_hw(x))))), fc1/fc2 1x1 convs."""

  def __init__(self, channels: int, squeeze_channels: int, *, activation: Activation,
               gate: Activation, dtype: Any = None, rngs: nnx.Rngs):
    self.fc1 = Conv(channels, squeeze_channels, (1, 1), kernel_init=CONV_INIT, dtype=dtype,
                    rngs=rngs)
    self.fc2 = Conv(squeeze_channels, channels, (1, 1), kernel_init=CONV_INIT, dtype=dtype,
                    rngs=rngs)
    self.activation = activation
    self.gate = gate

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = jnp.mean(x, axis=(1, 2), keepdims=True)
    scale = self.gate(self.fc2(self.activation(self.fc1(scale))))
    return x * scale


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One row of EfficientNet's table (torchvision's `MBConvConfig`), already scaled."""

  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int
  num_layers: int


# EfficientNet-B0 (Table 1 of the paper): expand ratio, kernel, stride, in, out, layers.
_B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
              (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
              (6, 3, 1, 192, 320, 1))


def stage_configs(width_mult: float = 1.0, depth_mult: float = 1.0) -> tuple[StageConfig, ...]:
  """The seven MBConv stages scaled as torchvision does (channels to /8, depth rounded up)."""
  return tuple(
      StageConfig(expand, kernel, stride, make_divisible(cin * width_mult),
                  make_divisible(cout * width_mult), int(math.ceil(layers * depth_mult)))
      for expand, kernel, stride, cin, cout, layers in _B0_STAGES)


class MBConv(nnx.Module):
  """Inverted residual with squeeze-excitation (torchvision's `MBConv`).

  `block` is [expand 1x1 (absent if expand ratio is 1), depthwise, SE, project 1x1]; the
  residual, when shapes allow, passes the block output through row-wise stochastic depth.
  """

  def __init__(self, in_channels: int, out_channels: int, *, expand_ratio: int, kernel: int,
               stride: int, drop_path_rate: float, dtype: Any = None, rngs: nnx.Rngs):
    norm = dict(bn_eps=1e-5, bn_momentum=0.1, dtype=dtype, rngs=rngs)
    expanded = make_divisible(in_channels * expand_ratio)
    layers: list[nnx.Module] = []
    if expanded != in_channels:
      layers.append(ConvNormAct(in_channels, expanded, 1, activation=nnx.silu, **norm))
    layers.append(ConvNormAct(expanded, expanded, kernel, stride, groups=expanded,
                              activation=nnx.silu, **norm))
    layers.append(SqueezeExcitation(expanded, max(1, in_channels // 4), activation=nnx.silu,
                                    gate=nnx.sigmoid, dtype=dtype, rngs=rngs))
    layers.append(ConvNormAct(expanded, out_channels, 1, activation=None, **norm))
    self.block = nnx.List(layers)
    self.use_residual = stride == 1 and in_channels == out_channels
    # torchvision's StochasticDepth(p, "row"): drop the whole residual branch of a sample
    # with probability p, scale survivors by 1 / (1 - p); identity in eval mode.
    # A block that never drops keeps no random stream.
    self.stochastic_depth = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2, 3),
                                        rngs=rngs if drop_path_rate > 0 else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for layer in self.block:
      y = layer(y)
    if self.use_residual:
      y = self.stochastic_depth(y) + x
    return y


class EfficientNet(nnx.Module):
  """An EfficientNet(-B0..B7) backbone up to the global average pool.

  Attributes:
    features: torchvision's `features`: stem, seven stages, final 1x1 conv.
    feature_width: channels of the last feature map (1280 for B0 and B1).
  """

  def __init__(self, width_mult: float = 1.0, depth_mult: float = 1.0, *,
               drop_path_rate: float = 0.2, in_channels: int = 3, dtype: Any = None,
               rngs: nnx.Rngs):
    """Builds the network with torchvision's initialisation.

    Args:
      width_mult: channel multiplier (1.0 for B0 and B1).
      depth_mult: depth multiplier (1.0 for B0, 1.1 for B1).
      drop_path_rate: torchvision's `stochastic_depth_prob`; block i of n (all blocks
        counted) drops its residual branch with probability `drop_path_rate * i / n` in
        train mode.
      in_channels: image channels.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and batch statistics stay
        float32.
      rngs: initialisation and stochastic-depth randomness.
    """
    stages = stage_configs(width_mult, depth_mult)
    norm = dict(bn_eps=1e-5, bn_momentum=0.1, dtype=dtype, rngs=rngs)
    layers: list[nnx.Module] = [
        ConvNormAct(in_channels, stages[0].in_channels, 3, 2, activation=nnx.silu, **norm)]
    total_blocks = sum(stage.num_layers for stage in stages)
    block_id = 0
    for stage in stages:
      blocks = []
      for i in range(stage.num_layers):
        blocks.append(MBConv(
            stage.in_channels if i == 0 else stage.out_channels, stage.out_channels,
            expand_ratio=stage.expand_ratio, kernel=stage.kernel,
            stride=stage.stride if i == 0 else 1,
            drop_path_rate=drop_path_rate * block_id / total_blocks, dtype=dtype, rngs=rngs))
        block_id += 1
      layers.append(nnx.List(blocks))
    self.feature_width = 4 * stages[-1].out_channels
    layers.append(ConvNormAct(stages[-1].out_channels, self.feature_width, 1,
                              activation=nnx.silu, **norm))
    self.features = nnx.List(layers)

  def __call__(self, x: jax.Array) -> BackboneOutput:
    """Maps NHWC images to the last feature map (stride 32) and its global average."""
    x = self.features[0](x)
    for stage in self.features[1:-1]:
      for block in stage:
        x = block(x)
    x = self.features[-1](x)
    return BackboneOutput(feature_map=x, pooled=jnp.mean(x, axis=(1, 2)))


# Registered name -> (width_mult, depth_mult), torchvision's compound scaling.
SCALING: dict[str, tuple[float, float]] = {
    "efficientnet_b0": (1.0, 1.0),
    "efficientnet_b1": (1.0, 1.1),
}


@register_backbone("efficientnet_b0")
def efficientnet_b0(*, rngs: nnx.Rngs, **kwargs: Any) -> EfficientNet:
  """EfficientNet-B0: 4.01 M parameters, 1280 features. `kwargs` go to `EfficientNet`
  (`width_mult` / `depth_mult` given there replace B0's scaling)."""
  return _scaled("efficientnet_b0", rngs, kwargs)


@register_backbone("efficientnet_b1")
def efficientnet_b1(*, rngs: nnx.Rngs, **kwargs: Any) -> EfficientNet:
  """EfficientNet-B1: 6.51 M parameters, 1280 features. `kwargs` go to `EfficientNet`
  (`width_mult` / `depth_mult` given there replace B1's scaling)."""
  return _scaled("efficientnet_b1", rngs, kwargs)


def _scaled(name: str, rngs: nnx.Rngs, kwargs: dict[str, Any]) -> EfficientNet:
  width, depth = SCALING[name]
  kwargs = {"width_mult": width, "depth_mult": depth, **kwargs}
  return EfficientNet(rngs=rngs, **kwargs)

"""MobileNetV3-Large/Small in torchvision's layout, up to the global average pool (or timm's
conv head after it).

The attribute tree mirrors torchvision's `MobileNetV3.features`: `features.0` is the stem
(conv `0`, BatchNorm `1`, Hardswish), then one `InvertedResidual` per entry
(`features.N.block.L.K`, squeeze-excitation as `block.L.fc1`/`fc2`), and the last entry is
the 1x1 convolution to 6x the last block's width (960 for Large, 576 for Small). torchvision's
classifier (Linear to 1280/1024, Hardswish, dropout, Linear) works on the pooled feature and
is a head, not part of the backbone.

BatchNorm defaults are torchvision's (eps 1e-3, momentum 0.01). timm's
`mobilenetv3_large_100` / `mobilenetv3_small_100` are the same network with eps 1e-5 (and
momentum 0.1): build them with `bn_eps=1e-5, bn_momentum=0.1`
(`retro_jax.convert.timm_layout.timm_backbone_kwargs` says so per architecture).

`conv_head=True` adds timm's head stage to the backbone: after the global pool, `conv_head`
(a 1x1 convolution with bias, 960 -> 1280 for Large, 576 -> 1024 for Small) and `act2`
(Hardswish). The backbone's feature map is then that (B, 1, 1, 1280) output, which is what
the Retro and DisCo code's timm `MobileNetV3.forward_features` returns (`global_pool`,
`conv_head`, `act2`: Reused-Teacher-Projector `DisCo/models/mobilenetv3.py` lines 129-136)
and what their adapter / head consumes. A 1x1 convolution on a 1x1 map is a Linear on the
pooled feature, so the parameters sit where torchvision keeps that same Linear,
`classifier.0` (torchvision's `classifier[:2]` is timm's `conv_head` + `act2`), initialised
as timm initialises `conv_head` (normal, std sqrt(2 / fan_out), zero bias).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.efficientnet import Activation
from retro_jax.models.efficientnet import CONV_INIT
from retro_jax.models.efficientnet import ConvNormAct
from retro_jax.models.efficientnet import SqueezeExcitation
from retro_jax.models.efficientnet import make_divisible
from retro_jax.models.registry import BackboneOutput
from retro_jax.models.registry import register_backbone


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One row of Tables 1/2 of the MobileNetV3 paper (torchvision's `InvertedResidualConfig`)."""

  in_channels: int
  kernel: int
  expanded_channels: int
  out_channels: int
  use_se: bool
  hardswish: bool  # Hardswish ("HS") or ReLU ("RE").
  stride: int


def _table(rows: tuple[tuple[Any, ...], ...]) -> tuple[BlockConfig, ...]:
  return tuple(BlockConfig(cin, k, exp, cout, se, act == "HS", s)
               for cin, k, exp, cout, se, act, s in rows)


BLOCKS: dict[str, tuple[BlockConfig, ...]] = {
    "large": _table((
        (16, 3, 16, 16, False, "RE", 1),
        (16, 3, 64, 24, False, "RE", 2),
        (24, 3, 72, 24, False, "RE", 1),
        (24, 5, 72, 40, True, "RE", 2),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 3, 240, 80, False, "HS", 2),
        (80, 3, 200, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 480, 112, True, "HS", 1),
        (112, 3, 672, 112, True, "HS", 1),
        (112, 5, 672, 160, True, "HS", 2),
        (160, 5, 960, 160, True, "HS", 1),
        (160, 5, 960, 160, True, "HS", 1),
    )),
    "small": _table((
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    )),
}


# timm's `num_features` after `conv_head` (torchvision's classifier hidden width).
HEAD_FEATURES = {"large": 1280, "small": 1024}


class InvertedResidual(nnx.Module):
  """torchvision's MobileNetV3 block: [expand 1x1 (if widened), depthwise, SE?, project 1x1].

  The residual is added when stride is 1 and the width is kept; there is no stochastic depth.
  """

  def __init__(self, config: BlockConfig, *, bn_eps: float, bn_momentum: float,
               dtype: Any = None, rngs: nnx.Rngs):
    norm = dict(bn_eps=bn_eps, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)
    act: Activation = nnx.hard_swish if config.hardswish else nnx.relu
    expanded = config.expanded_channels
    layers: list[nnx.Module] = []
    if expanded != config.in_channels:
      layers.append(ConvNormAct(config.in_channels, expanded, 1, activation=act, **norm))
    layers.append(ConvNormAct(expanded, expanded, config.kernel, config.stride,
                              groups=expanded, activation=act, **norm))
    if config.use_se:
      layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4),
                                      activation=nnx.relu, gate=nnx.hard_sigmoid, dtype=dtype,
                                      rngs=rngs))
    layers.append(ConvNormAct(expanded, config.out_channels, 1, activation=None, **norm))
    self.block = nnx.List(layers)
    self.use_residual = config.stride == 1 and config.in_channels == config.out_channels

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for layer in self.block:
      y = layer(y)
    return y + x if self.use_residual else y


class MobileNetV3(nnx.Module):
  """A MobileNetV3 backbone up to the global average pool.

  Attributes:
    features: torchvision's `features`: stem, inverted residual blocks, final 1x1 conv.
    classifier: with `conv_head`, [Linear(960 -> 1280)] (torchvision's `classifier.0`,
      timm's `conv_head`); otherwise None.
    feature_width: channels of the feature map (960 Large, 576 Small; 1280 / 1024 with
      `conv_head`).
  """

  def __init__(self, variant: str, *, bn_eps: float = 1e-3, bn_momentum: float = 0.01,
               conv_head: bool = False, in_channels: int = 3, dtype: Any = None,
               rngs: nnx.Rngs):
    """Builds the network with torchvision's initialisation.

    Args:
      variant: 'large' or 'small'.
      bn_eps: BatchNorm epsilon (torchvision 1e-3; timm 1e-5).
      bn_momentum: BatchNorm momentum in torch's convention, the weight of the batch
        statistic (torchvision 0.01; timm 0.1).
      conv_head: end with timm's post-pool `conv_head` + Hardswish (module docstring): the
        feature map becomes (B, 1, 1, 1280) for Large (1024 for Small).
      in_channels: image channels.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and batch statistics stay
        float32.
      rngs: initialisation randomness.
    """
    if variant not in BLOCKS:
      raise ValueError(f"unknown MobileNetV3 variant {variant!r}; expected one of "
                       f"{sorted(BLOCKS)}")
    blocks = BLOCKS[variant]
    norm = dict(bn_eps=bn_eps, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)
    layers: list[nnx.Module] = [ConvNormAct(in_channels, blocks[0].in_channels, 3, 2,
                                            activation=nnx.hard_swish, **norm)]
    layers.extend(InvertedResidual(config, **norm) for config in blocks)
    last_width = 6 * blocks[-1].out_channels
    layers.append(ConvNormAct(blocks[-1].out_channels, last_width, 1,
                              activation=nnx.hard_swish, **norm))
    self.features = nnx.List(layers)
    self.feature_width = HEAD_FEATURES[variant] if conv_head else last_width
    self.classifier = nnx.List([nnx.Linear(last_width, self.feature_width,
                                           kernel_init=CONV_INIT, dtype=dtype, rngs=rngs)]
                               ) if conv_head else None

  def __call__(self, x: jax.Array) -> BackboneOutput:
    """Maps NHWC images to the last feature map and its global average.

    The map is the stride-32 one, or with `conv_head` the (B, 1, 1, C) output of timm's
    pool -> conv_head -> Hardswish.
    """
    for layer in self.features:
      x = layer(x)
    if self.classifier is not None:
      pooled = nnx.hard_swish(self.classifier[0](jnp.mean(x, axis=(1, 2))))
      return BackboneOutput(feature_map=pooled[:, None, None, :], pooled=pooled)
    return BackboneOutput(feature_map=x, pooled=jnp.mean(x, axis=(1, 2)))


@register_backbone("mobilenet_v3_large")
def mobilenet_v3_large(*, rngs: nnx.Rngs, **kwargs: Any) -> MobileNetV3:
  """MobileNetV3-Large: 2.97 M parameters, 960 features. `kwargs` go to `MobileNetV3`."""
  return MobileNetV3("large", rngs=rngs, **kwargs)


@register_backbone("mobilenet_v3_small")
def mobilenet_v3_small(*, rngs: nnx.Rngs, **kwargs: Any) -> MobileNetV3:
  """MobileNetV3-Small: 0.93 M parameters, 576 features. `kwargs` go to `MobileNetV3`."""
  return MobileNetV3("small", rngs=rngs, **kwargs)

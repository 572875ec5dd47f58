"""Retro's dimension adapters: student feature map (B, H, W, C_s) -> teacher width (B, H, W, C_t).

Retro (retro.md 1.5) puts a trainable block on the student's pre-pool feature map so the
pooled result has the width of the teacher's frozen projection head. Three variants:

  'inverted_residual'  timm's `InvertedResidual(C_s -> C_t, exp_ratio=2)` without SE or
                       residual, the adapter of the Retro code for EfficientNet, MobileNetV3 and
                       ResNet-18/34 students: 1x1 conv to 2 C_s, BN, act; 3x3 depthwise, BN, act;
                       1x1 conv to C_t, BN; no final activation. Keys `conv_pw`, `bn1`, `conv_dw`,
                       `bn2`, `conv_pwl`, `bn3` (timm's names). act = SiLU; the Retro code uses
                       HardMish for MobileNetV3 (`activation='hard_mish'`).
  'simkd'              SimKD's `transfer` bottleneck, Retro's adapter for ResNet-50+ students: a
                       Sequential of 1x1 conv to C_t / 2, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv
                       to C_t, BN, ReLU (keys `0`, `1`, `3`, `4`, `6`, `7`).
  'conv1x1'            a plain 1x1 convolution (`conv`) and BN (`bn`), no activation; without BN
                       the convolution has a bias.

Convolutions have no bias (except plain 1x1 without BN) and torch's default initialisation,
which is what a freshly built torch block has; batch norms use torch's eps 1e-5 and momentum
0.1. Keys are relative to the adapter (the Retro checkpoints put it under `transfer.`).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.batch_norm import BatchNorm
from retro_jax.models.conv import Conv
from retro_jax.models.depthwise import DepthwiseConv
from retro_jax.models.efficientnet import make_divisible
from retro_jax.models.heads import TorchSequential

_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9
# torch's nn.Conv2d default, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)), fan_in
# counting the receptive field (9 for a depthwise 3x3).
_TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def hard_mish(x: jax.Array) -> jax.Array:
  """timm's HardMish: x * 0.5 * clamp(x + 2, 0, 2)."""
  return x * 0.5 * jnp.clip(x + 2.0, 0.0, 2.0)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "hard_mish": hard_mish,
    "hard_swish": jax.nn.hard_swish,  # x * relu6(x + 3) / 6, torch's Hardswish
    "relu": jax.nn.relu,
}


def _conv(in_features: int, out_features: int, kernel: int, *, use_bias: bool = False,
          dtype: Any, rngs: nnx.Rngs) -> Conv:
  pad = kernel // 2
  bias_bound = 1.0 / math.sqrt(in_features * kernel * kernel)

  def bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bias_bound, bias_bound)

  return Conv(in_features, out_features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
              use_bias=use_bias, kernel_init=_TORCH_CONV_INIT, bias_init=bias_init,
              dtype=dtype, rngs=rngs)


def _batch_norm(features: int, *, dtype: Any, rngs: nnx.Rngs) -> BatchNorm:
  return BatchNorm(features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                   use_fast_variance=False, dtype=dtype, rngs=rngs)


class InvertedResidualAdapter(nnx.Module):
  """timm's InvertedResidual as Retro configures it: expand, depthwise 3x3, project, no skip.

  Attributes:
    in_features: student channels C_s.
    out_features: teacher head width C_t.
    activation: name of the activation after `bn1` and `bn2`.
  """

  def __init__(self, in_features: int, out_features: int, *, expansion: float = 2.0,
               activation: str = "silu", dtype: Any = None, rngs: nnx.Rngs):
    """Builds the block.

    Args:
      in_features: student channels C_s.
      out_features: teacher width C_t.
      expansion: hidden width / C_s (Retro: 2); the hidden width is rounded to a multiple
        of 8 as timm does (a no-op for the students' widths).
      activation: 'silu' (Retro's default), 'hard_mish' (Retro's MobileNetV3 pre-training),
        'hard_swish' (its MobileNetV3 linear evaluation) or 'relu'.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and batch statistics stay
        float32. None: the input's.
      rngs: initialisation randomness.
    """
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    # timm sizes the expanded width with the same rounding as torchvision.
    hidden = make_divisible(in_features * expansion)
    self.in_features, self.out_features = in_features, out_features
    self.activation = activation
    precision = dict(dtype=dtype, rngs=rngs)
    self.conv_pw = _conv(in_features, hidden, 1, **precision)
    self.bn1 = _batch_norm(hidden, **precision)
    self.conv_dw = DepthwiseConv(hidden, 3, 1, 1, kernel_init=_TORCH_CONV_INIT, **precision)
    self.bn2 = _batch_norm(hidden, **precision)
    self.conv_pwl = _conv(hidden, out_features, 1, **precision)
    self.bn3 = _batch_norm(out_features, **precision)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C_s) -> (B, H, W, C_t)."""
    act = ACTIVATIONS[self.activation]
    x = act(self.bn1(self.conv_pw(x)))
    x = act(self.bn2(self.conv_dw(x)))
    return self.bn3(self.conv_pwl(x))


class SimKDAdapter(TorchSequential):
  """SimKD's `transfer` bottleneck: (1x1, BN, ReLU), (3x3, BN, ReLU), (1x1, BN, ReLU)."""

  def __init__(self, in_features: int, out_features: int, *, hidden_features: int | None = None,
               dtype: Any = None, rngs: nnx.Rngs):
    """Builds the bottleneck.

    Args:
      in_features: student channels C_s.
      out_features: teacher width C_t.
      hidden_features: bottleneck width; SimKD's default C_t // 2 (`factor=2`).
      dtype: computation dtype, as `InvertedResidualAdapter`'s.
      rngs: initialisation randomness.
    """
    hidden = out_features // 2 if hidden_features is None else hidden_features
    precision = dict(dtype=dtype, rngs=rngs)
    super().__init__([
        ("0", _conv(in_features, hidden, 1, **precision)),
        ("1", _batch_norm(hidden, **precision)),
        ("2", jax.nn.relu),
        ("3", _conv(hidden, hidden, 3, **precision)),
        ("4", _batch_norm(hidden, **precision)),
        ("5", jax.nn.relu),
        ("6", _conv(hidden, out_features, 1, **precision)),
        ("7", _batch_norm(out_features, **precision)),
        ("8", jax.nn.relu),
    ])
    self.in_features, self.out_features = in_features, out_features


class Conv1x1Adapter(nnx.Module):
  """A 1x1 convolution `conv` to the teacher width, then BN `bn` (or a bias instead)."""

  def __init__(self, in_features: int, out_features: int, *, batch_norm: bool = True,
               dtype: Any = None, rngs: nnx.Rngs):
    """Builds the layer.

    Args:
      in_features: student channels C_s.
      out_features: teacher width C_t.
      batch_norm: follow the convolution with BN; without it the convolution has a bias.
      dtype: computation dtype, as `InvertedResidualAdapter`'s.
      rngs: initialisation randomness.
    """
    self.in_features, self.out_features = in_features, out_features
    self.conv = _conv(in_features, out_features, 1, use_bias=not batch_norm, dtype=dtype,
                      rngs=rngs)
    self.bn = _batch_norm(out_features, dtype=dtype, rngs=rngs) if batch_norm else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C_s) -> (B, H, W, C_t)."""
    x = self.conv(x)
    return x if self.bn is None else self.bn(x)


ADAPTERS: dict[str, Callable[..., nnx.Module]] = {
    "inverted_residual": InvertedResidualAdapter,
    "simkd": SimKDAdapter,
    "conv1x1": Conv1x1Adapter,
}


def create_adapter(kind: str, in_width: int, out_width: int, *, rngs: nnx.Rngs,
                   **kwargs: Any) -> nnx.Module:
  """Builds the adapter `kind` ('inverted_residual', 'simkd' or 'conv1x1').

  Args:
    kind: which variant (module doc).
    in_width: student feature-map channels.
    out_width: the teacher head's input width.
    rngs: initialisation randomness.
    **kwargs: options of the variant's class (e.g. `activation='hard_mish'`, `dtype`).

  Returns:
    An NNX module mapping (B, H, W, in_width) to (B, H, W, out_width).
  """
  try:
    factory = ADAPTERS[kind]
  except KeyError:
    raise ValueError(f"unknown adapter {kind!r}; known adapters: {', '.join(sorted(ADAPTERS))}"
                     ) from None
  return factory(in_width, out_width, rngs=rngs, **kwargs)

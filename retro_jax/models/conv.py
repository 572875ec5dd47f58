"""`nnx.Conv` whose 1x1 convolutions are matrix products, which XLA:CPU runs much faster.

XLA:CPU's convolution kernels handle 1x1 convolutions poorly: on the 2-core EPYC development
machine, at batch 16, the input and kernel gradients of a 1x1 convolution through
`lax.conv_general_dilated` take 1.7-18x as long as the same computation written as a product
of the (B*H*W, C_in) input with the (C_in, C_out) kernel, and the forward pass up to 3.4x as
long (forward + backward, 56x56x64 -> 256: 228 ms against 52 ms; 16 distinct 1x1 layers of our
students and teacher: 0.16-0.61x the time as a dot). Only the forward of ResNet's strided
downsample is faster in XLA (56x56x256 -> 512: 20 ms against 28 ms as a slice and a dot), and
its backward is slower by more (283 ms against 55 ms). Most of the work of EfficientNet-B0 and
MobileNetV3 (expand, project and squeeze-excitation convolutions) and of the ResNet-50
bottlenecks is 1x1 convolutions.

So `Conv` is `nnx.Conv` (a subclass: same constructor, parameters, initialisation, dtype
promotion and bias; converters and `isinstance(m, nnx.Conv)` checks see no difference) that
computes a 1x1 convolution without padding, input dilation or groups as a strided slice
(stride > 1, as ResNet's downsample) and a dot over the channel axis, on every backend (GPU
and TPU compilers rewrite 1x1 convolutions into dots themselves, so nothing changes there).
Both are ordinary differentiable ops: forward and reverse mode work, to any order.

Every other convolution keeps XLA's native kernel. For 3x3 convolutions of 64 or more channels
its forward pass and both gradients run at similar speeds, and im2col was slower. For the
3-channel stems (ResNet's 7x7/2, EfficientNet's and MobileNetV3's 3x3/2) we measured an im2col
kernel gradient (patches as slices, one dot), a dot per tap, an im2col forward, and
space-to-depth into a stride-1 convolution of 12 channels: each lost to XLA on most stems (up
to 4x slower) and won on at most one, by under 25%. The best case, im2col for the kernel
gradient of ResNet's 7x7 stem (0.76x XLA's wall time, though 1.4x its CPU time), left a
ResNet-18 training step unchanged (10.0 against 9.9 img/s), so no custom gradient is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
from flax import nnx

Implementation = Literal["auto", "native"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "native")


def _channels_last_numbers(ndim: int) -> jax.lax.ConvDimensionNumbers:
  """The dimension numbers nnx.Conv passes: (N, spatial..., C) input, (spatial..., I, O) kernel."""
  lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
  return jax.lax.ConvDimensionNumbers(lhs, (ndim - 1, ndim - 2) + tuple(range(ndim - 2)), lhs)


def _zero_padding(padding: str | Sequence[tuple[int, int]]) -> bool:
  # 'SAME' pads a 1x1 kernel by nothing at any stride (out = ceil(in / stride)).
  if isinstance(padding, str):
    return padding in ("VALID", "SAME", "SAME_LOWER")
  return all(tuple(p) == (0, 0) for p in padding)


def is_pointwise(lhs: jax.Array, rhs: jax.Array, padding: Any, lhs_dilation: Any,
                 dimension_numbers: Any, feature_group_count: int, batch_group_count: int,
                 out_sharding: Any) -> bool:
  """Whether `conv_general_dilated` computes this convolution as a dot."""
  spatial = lhs.ndim - 2
  return (rhs.shape[:spatial] == (1,) * spatial
          and feature_group_count == 1 and batch_group_count == 1 and out_sharding is None
          and (lhs_dilation is None or tuple(lhs_dilation) == (1,) * spatial)
          and dimension_numbers == _channels_last_numbers(lhs.ndim)
          and _zero_padding(padding))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None,
                         out_sharding: Any = None) -> jax.Array:
  """`jax.lax.conv_general_dilated` with channels-last 1x1 convolutions as a dot.

  Same arguments and result. A 1x1 kernel (any kernel dilation) with no padding, no input
  dilation and no groups, in nnx.Conv's channels-last dimension numbers, is a strided slice of
  the input and a dot over its channel axis; anything else goes to XLA's convolution.
  """
  if not is_pointwise(lhs, rhs, padding, lhs_dilation, dimension_numbers, feature_group_count,
                      batch_group_count, out_sharding):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)
  x = lhs
  if any(s != 1 for s in window_strides):
    x = jax.lax.slice(x, (0,) * x.ndim, x.shape, (1, *window_strides, 1))
  in_features, out_features = rhs.shape[-2:]
  # A row-major reshape to (pixels, C_in) is free; XLA's dot and its transposes (the
  # gradients) are plain matrix products.
  y = jax.lax.dot_general(x.reshape(-1, in_features), rhs.reshape(in_features, out_features),
                          (((1,), (0,)), ((), ())), precision=precision,
                          preferred_element_type=preferred_element_type)
  return y.reshape(*x.shape[:-1], out_features)


class Conv(nnx.Conv):
  """`nnx.Conv` computing 1x1 convolutions as dots (module docstring).

  Takes nnx.Conv's arguments (except `conv_general_dilated`, which it sets) and:

  Attributes:
    implementation: 'auto' (1x1 convolutions as dots, XLA's convolution otherwise) or
      'native' (always `jax.lax.conv_general_dilated`, i.e. plain nnx.Conv; for comparisons).
      Resolved at trace time, so it may be changed on a built module.
  """

  def __init__(self, *args: Any, implementation: Implementation = "auto", **kwargs: Any):
    if "conv_general_dilated" in kwargs:
      raise TypeError("Conv chooses its convolution function; use nnx.Conv to pass your own")
    super().__init__(*args, conv_general_dilated=_function(implementation), **kwargs)

  @property
  def implementation(self) -> str:
    return "native" if self.conv_general_dilated is jax.lax.conv_general_dilated else "auto"

  @implementation.setter
  def implementation(self, implementation: Implementation) -> None:
    self.conv_general_dilated = _function(implementation)


def _function(implementation: Implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown conv implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  return conv_general_dilated if implementation == "auto" else jax.lax.conv_general_dilated

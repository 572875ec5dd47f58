"""Depthwise 2-D convolution that is fast on CPU and exact everywhere.

XLA:CPU lowers a `feature_group_count == channels` convolution to a slow generic loop
(~0.4 GFLOP/s on the 2-core development machine, about 10x slower than PyTorch), which makes
EfficientNet and MobileNet students impractical to train on CPU. A depthwise convolution is
only kh*kw per-channel multiply-adds of shifted input windows, which XLA fuses into one
loop; on CPU this module computes it that way. GPU and TPU keep the native grouped
convolution, which their compilers handle well.

The parameters and the result are those of
`nnx.Conv(c, c, (k, k), strides=s, padding=((p, p), (p, p)), feature_group_count=c)`, so the
module drops into torchvision-layout models and loads their checkpoints unchanged.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

Implementation = Literal["auto", "grouped", "shifted"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "grouped", "shifted")

# torchvision initialises EfficientNet/MobileNet convs with kaiming_normal_(mode="fan_out").
# For a depthwise weight (C, 1, kh, kw) torch's fan_out is C*kh*kw, which is also what
# variance_scaling computes for the (kh, kw, 1, C) kernel; "normal" is untruncated like torch.
default_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_implementation(implementation: Implementation) -> str:
  """Maps 'auto' to the implementation that is fastest on the default backend."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown depthwise implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    return "shifted" if jax.default_backend() == "cpu" else "grouped"
  return implementation


def depthwise_conv_grouped(x: jax.Array, kernel: jax.Array, stride: int,
                           padding: int) -> jax.Array:
  """Depthwise convolution as XLA's grouped convolution (what nnx.Conv computes).

  Args:
    x: (B, H, W, C) input.
    kernel: (kh, kw, 1, C) per-channel filters.
    stride: spatial stride, both axes.
    padding: zero padding on every side.

  Returns:
    (B, Ho, Wo, C) output.
  """
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int,
                           padding: int) -> jax.Array:
  """Depthwise convolution as a sum of kh*kw shifted, strided windows times weights.

  Same arguments and result as `depthwise_conv_grouped`.
  """
  kh, kw = kernel.shape[:2]
  batch, height, width, channels = x.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (height + 2 * padding - kh) // stride + 1
  out_w = (width + 2 * padding - kw) // stride + 1
  out = None
  for u in range(kh):
    for v in range(kw):
      window = jax.lax.slice(
          xp, (0, u, v, 0),
          (batch, u + (out_h - 1) * stride + 1, v + (out_w - 1) * stride + 1, channels),
          (1, stride, stride, 1))
      term = window * kernel[u, v, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nnx.Module):
  """Depthwise convolution (one kh x kw filter per channel), torch-style explicit padding.

  Attributes:
    kernel: (kh, kw, 1, channels), nnx.Conv's layout for `feature_group_count=channels`.
    bias: (channels,) when `use_bias`, else None.
    implementation: 'auto' (shifted multiply-adds on CPU, the native grouped convolution
      elsewhere), 'grouped' or 'shifted'. Resolved at trace time, so it may be changed on a
      built module.
  """

  def __init__(self, channels: int, kernel_size: int, stride: int = 1,
               padding: int | None = None, *, use_bias: bool = False,
               implementation: Implementation = "auto",
               kernel_init: nnx.Initializer = default_kernel_init,
               rngs: nnx.Rngs):
    """Builds the layer.

    Args:
      channels: input and output channels.
      kernel_size: square filter size.
      stride: spatial stride.
      padding: zero padding on every side; default `kernel_size // 2` (torch's "same" for
        odd kernels at stride 1).
      use_bias: whether to add a per-channel bias (initialised to zero).
      implementation: see the class docstring.
      kernel_init: initialiser of the (kh, kw, 1, channels) kernel.
      rngs: random generators; `rngs.params()` draws the kernel.
    """
    resolve_implementation(implementation)  # Fail at construction on a typo.
    self.channels = channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.implementation = implementation
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (kernel_size, kernel_size, 1, channels), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution to NHWC `x` of `channels` channels."""
    if x.shape[-1] != self.channels:
      raise ValueError(f"expected {self.channels} input channels, got shape {x.shape}")
    kernel = self.kernel[...]
    if resolve_implementation(self.implementation) == "grouped":
      y = depthwise_conv_grouped(x, kernel, self.stride, self.padding)
    else:
      y = depthwise_conv_shifted(x, kernel, self.stride, self.padding)
    if self.bias is not None:
      y = y + self.bias[...]
    return y

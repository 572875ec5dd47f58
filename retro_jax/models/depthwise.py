"""Depthwise 2-D convolution that is fast on CPU and exact everywhere.

XLA:CPU lowers a `feature_group_count == channels` convolution to a dense convolution with a
block-diagonal kernel, i.e. `channels` times the useful work: on the 2-core development machine
a depthwise layer is ~10x slower than in PyTorch and its gradient ~100x slower, which makes
EfficientNet and MobileNet students impractical to train on CPU. A depthwise convolution is
only kh*kw per-channel multiply-adds of shifted input windows; written that way XLA fuses it
into one vectorised, multi-threaded loop. So on CPU this module computes
  * the output as a sum of shifted (strided) windows times per-channel weights;
  * the input gradient the same way, on the output gradient dilated by the stride, with the
    flipped kernel;
  * the kernel gradient as one product-and-partial-sum pass per tap followed by one reduction
    (XLA does not fuse window slices into its reductions, so the partial sums keep what the
    reduction reads small).
GPU and TPU keep the native grouped convolution, which their compilers handle well.

The parameters and the result are those of
`nnx.Conv(c, c, (k, k), strides=s, padding=((p, p), (p, p)), feature_group_count=c)`, so the
module drops into torchvision-layout models and loads their checkpoints unchanged. The shifted
path has a custom VJP: reverse-mode differentiation (any order) works, forward-mode (`jax.jvp`)
does not; use `implementation="grouped"` for that.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

Implementation = Literal["auto", "grouped", "shifted"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "grouped", "shifted")

# torchvision initialises EfficientNet/MobileNet convs with kaiming_normal_(mode="fan_out").
# For a depthwise weight (C, 1, kh, kw) torch's fan_out is C*kh*kw (out_channels times the
# receptive field, groups do not enter), which is also what variance_scaling computes for the
# (kh, kw, 1, C) kernel; "normal" is an untruncated normal like torch's.
default_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# Output rows summed inside each per-tap pass of the kernel gradient. Measured on the 2-core
# Xeon: 8 is the sweet spot (fewer leaves a large tensor to reduce, more slows the fused loop).
_KERNEL_GRAD_ROWS = 8


def resolve_implementation(implementation: Implementation) -> str:
  """Maps 'auto' to the implementation that is fastest on the default backend."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"unknown depthwise implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
  if implementation == "auto":
    return "shifted" if jax.default_backend() == "cpu" else "grouped"
  return implementation


def output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
  """Spatial output size of a convolution with symmetric padding."""
  return (size + 2 * padding - kernel_size) // stride + 1


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


def _tap_axis(size: int, offset: int, stride: int, out: int):
  """One axis of out[i] = x[offset + stride*i] (zero outside x), for i < out.

  Returns ((start, limit, stride) of the slice of x, (low, high, 0) padding of the slice), or
  None when every index falls outside x.
  """
  first = 0 if offset >= 0 else (stride - 1 - offset) // stride  # First i inside x.
  last = min(out - 1, (size - 1 - offset) // stride) if offset <= size - 1 else -1
  if first > last:
    return None
  start = offset + stride * first
  return (start, start + stride * (last - first) + 1, stride), (first, out - 1 - last, 0)


def _shifted_window(x: jax.Array, u: int, v: int, stride: int, padding: int, out_h: int,
                    out_w: int) -> jax.Array | None:
  """Window (u, v) of x zero-padded by `padding`, as slice-then-pad of x (None if all zero).

  Unlike slicing one padded copy of x, every tap's pad has a single user, so XLA fuses it into
  the consuming loop instead of materialising a padded copy of the input.
  """
  rows = _tap_axis(x.shape[1], u - padding, stride, out_h)
  cols = _tap_axis(x.shape[2], v - padding, stride, out_w)
  if rows is None or cols is None:
    return None
  (r0, r1, rs), row_pad = rows
  (c0, c1, cs), col_pad = cols
  part = jax.lax.slice(x, (0, r0, c0, 0), (x.shape[0], r1, c1, x.shape[3]), (1, rs, cs, 1))
  return jax.lax.pad(part, jnp.zeros((), x.dtype), ((0, 0, 0), row_pad, col_pad, (0, 0, 0)))


def _forward(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Sum over taps of shifted, strided windows times per-channel weights: one fused loop."""
  kh, kw = kernel.shape[:2]
  out_h = output_size(x.shape[1], kh, stride, padding)
  out_w = output_size(x.shape[2], kw, stride, padding)
  out = jnp.zeros((x.shape[0], out_h, out_w, x.shape[3]), x.dtype)
  for u in range(kh):
    for v in range(kw):
      window = _shifted_window(x, u, v, stride, padding, out_h, out_w)
      if window is not None:
        out = out + window * kernel[u, v, 0]
  return out


def _input_grad(g: jax.Array, kernel: jax.Array, stride: int, padding: int,
                in_h: int, in_w: int) -> jax.Array:
  """The transpose of `_forward` in x: a stride-1 correlation of the dilated `g`.

  With gd the output gradient dilated by the stride (interior zeros) and padded by
  kh-1-padding on the low side, dx[n] = sum_u gd[n + u] * kernel[kh-1-u] for n < H, each axis
  alike. Tap u's window of gd is itself one lax.pad of g (negative edges crop), fused like the
  forward's windows.
  """
  kh, kw = kernel.shape[:2]
  out_h, out_w = g.shape[1:3]

  def axis_padding(k: int, size: int, out: int, tap: int) -> tuple[int, int, int]:
    low = k - 1 - padding - tap
    return (low, size - low - stride * (out - 1) - 1, stride - 1)

  dx = jnp.zeros((g.shape[0], in_h, in_w, g.shape[3]), g.dtype)
  for u in range(kh):
    for v in range(kw):
      window = jax.lax.pad(g, jnp.zeros((), g.dtype),
                           ((0, 0, 0), axis_padding(kh, in_h, out_h, u),
                            axis_padding(kw, in_w, out_w, v), (0, 0, 0)))
      dx = dx + window * kernel[kh - 1 - u, kw - 1 - v, 0]
  return dx


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, stride: int,
                 padding: int) -> jax.Array:
  """dkernel[u, v, 0, c] = sum over b, i, j of xp[b, s*i+u, s*j+v, c] * g[b, i, j, c].

  Each tap is one fused pass that multiplies and sums groups of `rows` output rows (without
  materialising the shifted window), leaving 1/rows of the data; one reduction finishes all taps.
  """
  batch, out_h, out_w, channels = g.shape
  rows = _largest_divisor_at_most(batch * out_h, _KERNEL_GRAD_ROWS)
  taps = []
  for u in range(kh):
    for v in range(kw):
      window = _shifted_window(x, u, v, stride, padding, out_h, out_w)
      if window is None:  # The tap only ever sees padding.
        taps.append(jnp.zeros((batch * out_h // rows, out_w, channels), g.dtype))
        continue
      prod = (window * g).reshape(batch * out_h // rows, rows, out_w, channels)
      partial = prod[:, 0]
      for r in range(1, rows):
        partial = partial + prod[:, r]
      taps.append(partial)
  return jnp.stack(taps).sum(axis=(1, 2)).reshape(kh, kw, 1, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shifted(x: jax.Array, kernel: jax.Array, stride: int,
                           padding: int) -> jax.Array:
  """Depthwise convolution as kh*kw shifted multiply-adds, with a matching custom VJP.

  Same arguments and result as `depthwise_conv_grouped`; `x` and `kernel` must share a dtype.
  """
  return _forward(x, kernel, stride, padding)


def _shifted_fwd(x, kernel, stride, padding):
  return _forward(x, kernel, stride, padding), (x, kernel)


def _shifted_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  dx = _input_grad(g, kernel, stride, padding, x.shape[1], x.shape[2])
  dkernel = _kernel_grad(x, g, kh, kw, stride, padding)
  return dx, dkernel


depthwise_conv_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0,
                   implementation: Implementation = "auto") -> jax.Array:
  """Depthwise convolution of NHWC `x` with a (kh, kw, 1, C) kernel, by `implementation`."""
  if x.shape[-1] != kernel.shape[-1] or kernel.shape[2] != 1:
    raise ValueError(f"kernel of shape {kernel.shape} is not depthwise for input {x.shape}")
  dtype = jnp.result_type(x, kernel)  # As nnx.Conv promotes (bf16 input, f32 kernel -> f32).
  x, kernel = x.astype(dtype), kernel.astype(dtype)
  if resolve_implementation(implementation) == "grouped":
    return depthwise_conv_grouped(x, kernel, stride, padding)
  return depthwise_conv_shifted(x, kernel, stride, padding)


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
    y = depthwise_conv(x, self.kernel[...], self.stride, self.padding, self.implementation)
    if self.bias is not None:
      y = y + self.bias[...]
    return y

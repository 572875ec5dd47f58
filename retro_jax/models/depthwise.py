"""Depthwise 2-D convolution that is fast on CPU and exact everywhere.

XLA:CPU lowers a `feature_group_count == channels` convolution to a dense convolution with a
block-diagonal kernel, i.e. `channels` times the useful work: on the 2-core development machine
a depthwise layer is ~10x slower than in PyTorch and its gradient ~100x slower, which makes
EfficientNet and MobileNet students impractical to train on CPU. A depthwise convolution is
only kh*kw per-channel multiply-adds of shifted input windows; written that way XLA fuses it
into one vectorised, multi-threaded loop. So on CPU this module computes
  * the output as a sum of shifted (strided) windows times per-channel weights;
  * the input gradient the same way on the output gradient: per phase of the stride (one
    phase at stride 1), a stride-1 sum of windows of the output gradient with the taps of the
    flipped kernel that land on that phase, the phases then interleaved; computing the
    dilated gradient instead wastes (s*s - 1)/(s*s) of the work at stride s;
  * the kernel gradient over chunks of the batch (a `lax.scan`), each chunk small enough to
    stay in the CPU's caches while every tap reads it: per tap one fused pass of
    products summed over groups of output rows, then one reduction of all taps. One pass per
    tap over the whole batch instead streams the input and the output gradient from memory
    kh*kw times, which is what made the kernel gradient the slowest part.
Windows are slices of one zero-padded copy (no bounds checks in the fused loops) wherever that
copy is no larger than what the loop writes: the input at stride 1, the output gradient, each
batch chunk. A strided forward instead pads each tap's window inside the loop, as a padded
copy of the input would cost more than the s*s times smaller output.
GPU and TPU keep the native grouped convolution, which their compilers handle well.

The parameters and the result are those of
`nnx.Conv(c, c, (k, k), strides=s, padding=((p, p), (p, p)), feature_group_count=c)`, so the
module drops into torchvision-layout models and loads their checkpoints unchanged. The shifted
path has a custom VJP: reverse-mode differentiation (any order) works, forward-mode (`jax.jvp`)
does not; use `implementation="grouped"` for that.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

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

# Output rows summed inside each per-tap pass of the kernel gradient (the largest divisor of
# the output height up to this), which leaves a small partial sum to reduce. Measured on the
# 2-core EPYC, all depthwise layers of EfficientNet-B0 and MobileNetV3-Large: 32 (28 rows at
# 112 and 56 px, whole maps below) beats 16 by 15-30% in total; whole training steps run 4%
# faster than with 8 and 12% than with 4, for ~2 s and ~4 s more compilation (B0, 224 px).
_KERNEL_GRAD_ROWS = 32
# Bytes of input plus output gradient per batch chunk of the kernel gradient. The chunk is
# read once per tap, so it should stay in cache: of 4, 8, 12 and 24 MiB (the L3 is 32 MiB),
# 12 gave the smallest total over the same layers (1.2x faster than 8 or 24, 1.8x than 4).
_KERNEL_GRAD_CHUNK_BYTES = 12 * 2**20


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


def _pad(x: jax.Array, rows: tuple[int, int], cols: tuple[int, int]) -> jax.Array:
  """Zero padding (negative widths crop) of the spatial axes of NHWC `x`."""
  return jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (*rows, 0), (*cols, 0), (0, 0, 0)))


def _window(xp: jax.Array, row: int, col: int, out_h: int, out_w: int, row_step: int = 1,
            col_step: int = 1) -> jax.Array:
  """xp[:, row + row_step*i, col + col_step*j] for i < out_h, j < out_w: a plain slice."""
  batch, _, _, channels = xp.shape
  return jax.lax.slice(
      xp, (0, row, col, 0),
      (batch, row + row_step * (out_h - 1) + 1, col + col_step * (out_w - 1) + 1, channels),
      (1, row_step, col_step, 1))


def _forward(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """Sum over taps of shifted, strided windows times per-channel weights: one fused loop.

  At stride 1 the windows are slices of one padded copy of x (no bounds checks in the loop,
  ~2x faster than padding each window); at larger strides the output is s*s times smaller
  than that copy, so each window is padded on its own inside the loop instead.
  """
  kh, kw = kernel.shape[:2]
  out_h = output_size(x.shape[1], kh, stride, padding)
  out_w = output_size(x.shape[2], kw, stride, padding)
  if stride == 1:
    xp = _pad(x, (padding, out_h + kh - 1 - x.shape[1] - padding),
              (padding, out_w + kw - 1 - x.shape[2] - padding))
    out = None
    for u in range(kh):
      for v in range(kw):
        term = _window(xp, u, v, out_h, out_w) * kernel[u, v, 0]
        out = term if out is None else out + term
    return out
  out = jnp.zeros((x.shape[0], out_h, out_w, x.shape[3]), x.dtype)
  for u in range(kh):
    for v in range(kw):
      window = _shifted_window(x, u, v, stride, padding, out_h, out_w)
      if window is not None:
        out = out + window * kernel[u, v, 0]
  return out


def _phase_taps(k: int, stride: int, padding: int, phase: int) -> list[tuple[int, int]]:
  """Taps u reaching input positions n = stride*m + phase, with their output offset d.

  dx[n] = sum over (i, u) with stride*i + u - padding = n of g[i] * kernel[u]; for n on this
  phase, i = m + d with d = (phase + padding - u) / stride, an integer only for some u.
  """
  return [(u, (phase + padding - u) // stride) for u in range(k)
          if (phase + padding - u) % stride == 0]


def _input_grad(g: jax.Array, kernel: jax.Array, stride: int, padding: int,
                in_h: int, in_w: int) -> jax.Array:
  """The transpose of `_forward` in x, phase by phase of the stride.

  Each of the stride*stride phases of dx (rows n = s*m + r, columns s*l + t) is a stride-1 sum
  of windows of g, padded once, times the taps that land on that phase (`_phase_taps`); the
  phases are then interleaved. Every tap is used once in all, so the work is that of the
  forward, not s*s times it as on the dilated g.
  """
  kh, kw = kernel.shape[:2]
  batch, out_h, out_w, channels = g.shape
  rows = [_phase_taps(kh, stride, padding, r) for r in range(stride)]
  cols = [_phase_taps(kw, stride, padding, t) for t in range(stride)]
  # Phase sizes, and the padding of g that keeps every window inside it.
  rows_n = [-(-(in_h - r) // stride) for r in range(stride)]
  cols_n = [-(-(in_w - t) // stride) for t in range(stride)]
  offsets_r = [d for taps in rows for _, d in taps] or [0]
  offsets_c = [d for taps in cols for _, d in taps] or [0]
  low_r, low_c = max(0, -min(offsets_r)), max(0, -min(offsets_c))
  gp = _pad(g, (low_r, max(0, rows_n[0] - 1 + max(offsets_r) - (out_h - 1))),
            (low_c, max(0, cols_n[0] - 1 + max(offsets_c) - (out_w - 1))))
  phases = []
  for r in range(stride):
    phase_row = []
    for t in range(stride):
      acc = jnp.zeros((batch, rows_n[r], cols_n[t], channels), g.dtype)
      for u, du in rows[r]:
        for v, dv in cols[t]:
          window = _window(gp, du + low_r, dv + low_c, rows_n[r], cols_n[t])
          acc = acc + window * kernel[u, v, 0]
      phase_row.append(acc)
    phases.append(phase_row)
  if stride == 1:
    return phases[0][0]
  if in_h % stride == 0 and in_w % stride == 0:
    # Equal phases interleave by a reshape of their stack.
    stacked = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    return stacked.reshape(batch, in_h, in_w, channels)
  dx = None  # Otherwise spread each phase with interior padding and add them up.
  for r, phase_row in enumerate(phases):
    for t, phase in enumerate(phase_row):
      spread = jax.lax.pad(phase, jnp.zeros((), g.dtype),
                           ((0, 0, 0), (r, in_h - r - stride * (rows_n[r] - 1) - 1, stride - 1),
                            (t, in_w - t - stride * (cols_n[t] - 1) - 1, stride - 1),
                            (0, 0, 0)))
      dx = spread if dx is None else dx + spread
  return dx


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _kernel_grad_chunk(x: jax.Array, g: jax.Array, kh: int, kw: int, stride: int,
                       padding: int) -> jax.Array:
  """dkernel[u, v, 0, c] = sum over b, i, j of xp[b, s*i+u, s*j+v, c] * g[b, i, j, c].

  Per tap, one fused loop multiplies strided slices of the padded x with g and sums `rows`
  output rows (slices, not a reduction: XLA does not fuse slices into reductions); one
  reduction finishes all taps.
  """
  batch, out_h, out_w, channels = g.shape
  rows = _largest_divisor_at_most(out_h, _KERNEL_GRAD_ROWS)
  groups = out_h // rows
  xp = _pad(x, (padding, stride * (out_h - 1) + kh - x.shape[1] - padding),
            (padding, stride * (out_w - 1) + kw - x.shape[2] - padding))
  # A sum over the batch and the map: accumulated in float32 whatever the inputs' dtype, as
  # XLA's own convolutions accumulate bfloat16 products (a no-op for float32 inputs).
  accumulate = jnp.promote_types(g.dtype, jnp.float32)
  taps = []
  for u in range(kh):
    for v in range(kw):
      partial = None
      for r in range(rows):
        # Output rows r, r + rows, ...: input rows u + s*r, u + s*(r + rows), ...
        term = (_window(xp, u + stride * r, v, groups, out_w, stride * rows, stride)
                .astype(accumulate) * _window(g, r, 0, groups, out_w, rows, 1).astype(accumulate))
        partial = term if partial is None else partial + term
      taps.append(partial)
  return jnp.stack(taps).sum(axis=(1, 2, 3)).reshape(kh, kw, 1, channels)


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, stride: int,
                 padding: int) -> jax.Array:
  """`_kernel_grad_chunk` summed over batch chunks of at most `_KERNEL_GRAD_CHUNK_BYTES`."""
  batch = x.shape[0]
  per_image = (math.prod(x.shape[1:]) + math.prod(g.shape[1:])) * x.dtype.itemsize
  chunk = _largest_divisor_at_most(batch, _KERNEL_GRAD_CHUNK_BYTES // per_image)
  if chunk == batch:
    return _kernel_grad_chunk(x, g, kh, kw, stride, padding).astype(g.dtype)

  def step(total, chunk_xg):
    return total + _kernel_grad_chunk(*chunk_xg, kh, kw, stride, padding), None

  chunks = (x.reshape(batch // chunk, chunk, *x.shape[1:]),
            g.reshape(batch // chunk, chunk, *g.shape[1:]))
  total = jnp.zeros((kh, kw, 1, x.shape[3]), jnp.promote_types(g.dtype, jnp.float32))
  return jax.lax.scan(step, total, chunks)[0].astype(g.dtype)


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
                   implementation: Implementation = "auto", dtype: Any = None) -> jax.Array:
  """Depthwise convolution of NHWC `x` with a (kh, kw, 1, C) kernel, by `implementation`.

  `dtype`: the computation dtype both are cast to; None promotes them, as nnx.Conv does
  (bfloat16 input, float32 kernel -> float32).
  """
  if x.shape[-1] != kernel.shape[-1] or kernel.shape[2] != 1:
    raise ValueError(f"kernel of shape {kernel.shape} is not depthwise for input {x.shape}")
  dtype = jnp.result_type(x, kernel) if dtype is None else dtype
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
               kernel_init: nnx.Initializer = default_kernel_init, dtype: Any = None,
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
      dtype: computation dtype (e.g. jnp.bfloat16: input and kernel are cast to it, the
        output has it); None promotes input and kernel, as nnx.Conv. The parameters stay
        float32.
      rngs: random generators; `rngs.params()` draws the kernel.
    """
    resolve_implementation(implementation)  # Fail at construction on a typo.
    self.channels = channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.implementation = implementation
    self.dtype = dtype
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (kernel_size, kernel_size, 1, channels), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the convolution to NHWC `x` of `channels` channels."""
    if x.shape[-1] != self.channels:
      raise ValueError(f"expected {self.channels} input channels, got shape {x.shape}")
    y = depthwise_conv(x, self.kernel[...], self.stride, self.padding, self.implementation,
                       self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y

"""Vision Transformers ViT-Tiny/Small/Base/Large in the timm / DINO / MSN layout.

Registered: ViT-Ti/16, ViT-S/16, ViT-B/16 and ViT-L/16 (timm's `vit_*_patch16_224`), and
ViT-L/7 (MSN's `deit_large_p7`, facebookresearch/msn `src/deit.py`: ViT-L with 7x7 patches,
a 32x32 grid at 224 px; timm has no such model).

The attribute tree mirrors timm's `VisionTransformer` (and DINO's copy of it): `cls_token`
(1, 1, D), `pos_embed` (1, 1 + N, D), `patch_embed.proj`, `blocks.i.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}` and the final `norm`, so timm, DINO and VISSL backbone
state dicts load by rule. LayerNorm epsilon is 1e-6 and GELU the exact (erf) one, as in those
codebases. There is no classifier: the backbone ends at the final norm.

Other input sizes: the patch part of `pos_embed` is resampled bicubically to the input's patch
grid, as torch's `F.interpolate(mode="bicubic", align_corners=False)` without antialiasing
(Keys' cubic with a = -0.75, border samples clamped). By default the sampling ratio is
old_grid / new_grid, which is what RoB's VISSL trunk does (`scale_factor=sqrt(npatch / N)`)
and equals timm's `resample_abs_pos_embed(..., antialias=False)`. DINO's own
`interpolate_pos_encoding` instead asks torch for the scale factor (new_grid + 0.1) / old_grid
(a work-around for a rounding issue), which shifts the sample points slightly; set
`pos_embed_offset=0.1` to reproduce DINO's code exactly. timm's default at run time
(`dynamic_img_size`) antialiases when shrinking the grid and matches neither.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retro_jax.models.registry import BackboneOutput
from retro_jax.models.registry import register_backbone

# DINO, VISSL and timm: trunc_normal_(std=0.02) for Linear weights and both tokens, zero biases.
_TRUNC_NORMAL = nnx.initializers.truncated_normal(stddev=0.02)
# The patch projection keeps torch's Conv2d default, kaiming_uniform_(a=sqrt(5)).
_TORCH_CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_LN_EPSILON = 1e-6
# torch's upsample_bicubic2d uses Keys' cubic convolution kernel with this coefficient.
_CUBIC_A = -0.75


def _cubic_weight(distance: np.ndarray) -> np.ndarray:
  d = np.abs(distance)
  near = ((_CUBIC_A + 2.0) * d - (_CUBIC_A + 3.0)) * d * d + 1.0
  far = ((_CUBIC_A * d - 5.0 * _CUBIC_A) * d + 8.0 * _CUBIC_A) * d - 4.0 * _CUBIC_A
  return np.where(d <= 1.0, near, np.where(d < 2.0, far, 0.0))


def bicubic_resize_matrix(in_size: int, out_size: int, offset: float = 0.0) -> np.ndarray:
  """The (out_size, in_size) matrix of torch's 1-D bicubic resampling (align_corners=False).

  Args:
    in_size: input length.
    out_size: output length.
    offset: 0 for torch's `size=` mode (ratio in/out); DINO's 0.1 reproduces
      `scale_factor=(out_size + 0.1) / in_size`, for which torch maps output i to input
      `(i + 0.5) * in_size / (out_size + 0.1) - 0.5`.

  Returns:
    float64 weights; row i holds the four taps of output i (indices clamped to the border,
    so taps that fall outside add onto the edge samples, as torch's clamped access does).
  """
  ratio = in_size / (out_size + offset)
  source = (np.arange(out_size) + 0.5) * ratio - 0.5  # not clamped at 0 for cubic, as torch
  base = np.floor(source)
  frac = source - base
  matrix = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  for tap in range(-1, 3):
    index = np.clip(base + tap, 0, in_size - 1).astype(np.int64)
    np.add.at(matrix, (rows, index), _cubic_weight(frac - tap))
  return matrix


def resample_pos_embed(pos_embed: jax.Array, new_grid: tuple[int, int],
                       old_grid: tuple[int, int], *, num_prefix_tokens: int = 1,
                       offset: float = 0.0) -> jax.Array:
  """Resamples the patch part of a (1, prefix + H*W, D) position embedding to `new_grid`.

  Args:
    pos_embed: the embedding, prefix tokens (the class token) first, then the patch grid in
      row-major order.
    new_grid: (rows, cols) of the target patch grid.
    old_grid: (rows, cols) the embedding was trained for.
    num_prefix_tokens: leading entries that are copied, not resampled.
    offset: see `bicubic_resize_matrix` (0: VISSL/timm ratio, 0.1: DINO's).

  Returns:
    (1, prefix + rows*cols, D), in the dtype of `pos_embed`.
  """
  if tuple(new_grid) == tuple(old_grid):
    return pos_embed
  prefix = pos_embed[:, :num_prefix_tokens]
  grid = pos_embed[0, num_prefix_tokens:].reshape(*old_grid, -1).astype(jnp.float32)
  rows = jnp.asarray(bicubic_resize_matrix(old_grid[0], new_grid[0], offset), jnp.float32)
  cols = jnp.asarray(bicubic_resize_matrix(old_grid[1], new_grid[1], offset), jnp.float32)
  grid = jnp.einsum("ah,hwd,bw->abd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
  grid = grid.reshape(1, new_grid[0] * new_grid[1], -1).astype(pos_embed.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


def _uniform(bound: float) -> nnx.Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _linear(in_features: int, out_features: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=_TRUNC_NORMAL,
                    bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


def _layer_norm(dim: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance like torch; the one-pass E[x^2] - E[x]^2 loses digits on the residual
  # stream, whose mean is large relative to its spread.
  return nnx.LayerNorm(dim, epsilon=_LN_EPSILON, use_fast_variance=False, dtype=dtype,
                       rngs=rngs)


class PatchEmbed(nnx.Module):
  """Non-overlapping patches to tokens: a patch-size, patch-stride convolution `proj`."""

  def __init__(self, patch_size: int, in_channels: int, embed_dim: int, *, dtype: Any,
               rngs: nnx.Rngs):
    self.patch_size = patch_size
    fan_in = in_channels * patch_size * patch_size
    bound = 1.0 / math.sqrt(fan_in)
    self.proj = nnx.Conv(in_channels, embed_dim, (patch_size, patch_size),
                         strides=(patch_size, patch_size), padding="VALID",
                         kernel_init=_TORCH_CONV_INIT,
                         bias_init=_uniform(bound),
                         dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) images -> (B, H // p, W // p, D) patch embeddings (remainders cropped)."""
    return self.proj(x)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused `qkv` projection (timm's layout)."""

  def __init__(self, dim: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"embedding width {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.qkv = _linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    # The qkv output is ordered (3, heads, head_dim), as torch's reshape reads it.
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, dim)
    return self.proj(y)


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2."""

  def __init__(self, dim: int, hidden_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden_dim, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(hidden_dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block; both residual branches carry stochastic depth.

  `drop_path` is an `nnx.Dropout` whose mask is shared by all tokens and channels of a sample
  (broadcast over axes 1 and 2): it zeroes a sample's whole branch with probability `rate`
  and scales kept branches by 1 / (1 - rate), which is DINO/timm's `drop_path`. Each call
  draws a fresh mask, so the two branches drop independently, as in DINO.
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float, *,
               dtype: Any, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    # Without drop-path the block holds no RNG state, so a model built abstractly with
    # nnx.eval_shape and filled from a checkpoint (a frozen teacher) is complete.
    self.drop_path = nnx.Dropout(drop_path_rate, broadcast_dims=(1, 2),
                                 rngs=rngs if drop_path_rate > 0 else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nnx.Module):
  """A ViT backbone with a class token, up to and including the final LayerNorm.

  The forward pass is split so that later token operations (MSN token dropping, iBOT
  masking) can sit between `embed_tokens` and `encode`: both work on any token sequence
  whose first entry is the class token.

  Attributes:
    feature_width: the embedding width D.
    patch_size: patch side in pixels.
    grid_size: (rows, cols) of the patch grid `pos_embed` was built for.
    pos_embed_offset: 0 (VISSL/timm resampling ratio) or 0.1 (DINO's); see the module doc.
  """

  def __init__(self, *, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16,
               img_size: int = 224, in_channels: int = 3, mlp_ratio: float = 4.0,
               drop_path_rate: float = 0.0, pos_embed_offset: float = 0.0, dtype: Any = None,
               rngs: nnx.Rngs):
    """Builds the network with DINO's initialisation.

    Args:
      embed_dim: token width D.
      depth: number of transformer blocks.
      num_heads: attention heads per block.
      patch_size: patch side in pixels.
      img_size: the square image side `pos_embed` is built for (224: a 14x14 grid).
      in_channels: image channels.
      mlp_ratio: MLP hidden width / D.
      drop_path_rate: stochastic-depth rate of the last block; block i gets
        `drop_path_rate * i / (depth - 1)` (DINO's linear rule). Active in train mode only.
      pos_embed_offset: resampling convention for other input sizes (module doc).
      dtype: computation dtype (e.g. jnp.bfloat16 for a frozen teacher); parameters stay
        float32.
      rngs: initialisation randomness; the `dropout` stream (or `default`) drives drop-path.
    """
    if img_size % patch_size:
      raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
    self.feature_width = embed_dim
    self.patch_size = patch_size
    self.grid_size = (img_size // patch_size, img_size // patch_size)
    self.pos_embed_offset = pos_embed_offset
    num_patches = self.grid_size[0] * self.grid_size[1]
    self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(_TRUNC_NORMAL(rngs.params(), (1, 1, embed_dim), jnp.float32))
    self.pos_embed = nnx.Param(
        _TRUNC_NORMAL(rngs.params(), (1, 1 + num_patches, embed_dim), jnp.float32))
    rates = np.linspace(0.0, drop_path_rate, depth)
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, mlp_ratio, float(rate), dtype=dtype, rngs=rngs)
        for rate in rates
    ])
    self.norm = _layer_norm(embed_dim, dtype=dtype, rngs=rngs)

  def embed_tokens(self, x: jax.Array, mask: jax.Array | None = None,
                   mask_token: jax.Array | None = None) -> jax.Array:
    """(B, H, W, C) images -> (B, 1 + h*w, D): class token, then patches, plus positions.

    With `mask` ((B, h*w) bool) the masked patch embeddings are replaced by `mask_token`
    ((1, D)) before the positions are added: iBOT's `mask_model` (bytedance/ibot
    models/vision_transformer.py) and VISSL's `IBOTMaskedModeling`.
    """
    patches = self.patch_embed(x)
    batch, rows, cols, dim = patches.shape
    if rows == 0 or cols == 0:
      raise ValueError(f"input {x.shape} is smaller than one {self.patch_size}px patch")
    dtype = patches.dtype
    patches = patches.reshape(batch, rows * cols, dim)
    if mask is not None:
      patches = jnp.where(mask[..., None], mask_token.astype(dtype), patches)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, dim))
    tokens = jnp.concatenate([cls, patches], axis=1)
    pos = resample_pos_embed(self.pos_embed[...], (rows, cols), self.grid_size,
                             offset=self.pos_embed_offset)
    return tokens + pos.astype(dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """Runs the blocks and the final norm on (B, T, D) tokens."""
    for block in self.blocks:
      tokens = block(tokens)
    return self.norm(tokens)

  def __call__(self, x: jax.Array) -> BackboneOutput:
    """NHWC images -> all tokens after the final norm (B, 1 + N, D) and the class token."""
    tokens = self.encode(self.embed_tokens(x))
    return BackboneOutput(feature_map=tokens, pooled=tokens[:, 0])


# The registered architectures: timm's `vit_*_patch16_224` and MSN's `deit_large_p7`
# (facebookresearch/msn `src/deit.py`). Tests build them with fewer blocks from this table.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch7": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=7),
}


@register_backbone("vit_tiny_patch16")
def vit_tiny_patch16(*, rngs: nnx.Rngs, **kwargs: Any) -> VisionTransformer:
  """ViT-Tiny/16: D=192, 12 blocks, 3 heads, 5.52 M parameters. `kwargs` go to the class."""
  return VisionTransformer(**ARCHITECTURES["vit_tiny_patch16"], rngs=rngs, **kwargs)


@register_backbone("vit_small_patch16")
def vit_small_patch16(*, rngs: nnx.Rngs, **kwargs: Any) -> VisionTransformer:
  """ViT-Small/16: D=384, 12 blocks, 6 heads, 21.67 M parameters. `kwargs` go to the class."""
  return VisionTransformer(**ARCHITECTURES["vit_small_patch16"], rngs=rngs, **kwargs)


@register_backbone("vit_base_patch16")
def vit_base_patch16(*, rngs: nnx.Rngs, **kwargs: Any) -> VisionTransformer:
  """ViT-Base/16: D=768, 12 blocks, 12 heads, 85.80 M parameters. `kwargs` go to the class."""
  return VisionTransformer(**ARCHITECTURES["vit_base_patch16"], rngs=rngs, **kwargs)


@register_backbone("vit_large_patch16")
def vit_large_patch16(*, rngs: nnx.Rngs, **kwargs: Any) -> VisionTransformer:
  """ViT-Large/16: D=1024, 24 blocks, 16 heads, 303.30 M parameters (MSN's `deit_large`)."""
  return VisionTransformer(**ARCHITECTURES["vit_large_patch16"], rngs=rngs, **kwargs)


@register_backbone("vit_large_patch7")
def vit_large_patch7(*, rngs: nnx.Rngs, **kwargs: Any) -> VisionTransformer:
  """ViT-Large/7: ViT-L/16 with 7x7 patches (MSN's `deit_large_p7`), 303.51 M parameters."""
  return VisionTransformer(**ARCHITECTURES["vit_large_patch7"], rngs=rngs, **kwargs)

"""The photometric half of the SSL augmentations, run on the accelerator inside the jitted step.

The host decodes, crops and flips (uint8); here each view's batch gets torchvision's
`RandomApply(ColorJitter)`, `RandomGrayscale`, a Gaussian blur, `RandomSolarize` and
`Normalize`, every example with its own random draw. A preset is plain data, e.g. MoCo-v2's
`aug_plus` and DINO's second global view:

    MOCO_V2 = {
        "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                         "hue": 0.1},
        "grayscale": {"p": 0.2},
        "gaussian_blur": {"p": 0.5, "sigma": (0.1, 2.0)},
        "normalize": {},  # ImageNet mean and std
    }
    DINO_GLOBAL_2 = {
        "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2,
                         "hue": 0.1},
        "grayscale": {"p": 0.2},
        "gaussian_blur": {"p": 0.1},
        "solarize": {"p": 0.2},
        "normalize": {},
    }
    views = apply_photometric(key, images, PhotometricSpec.from_config(DINO_GLOBAL_2))

Ops run in the fixed order of `OPS` (the order of the MoCo-v2, DINO and MSN pipelines; a
horizontal flip on the host commutes with all of them); an op left out is not applied. Every
op takes `p`, the probability that an example gets it (default 1). Parameters:
  color_jitter: brightness, contrast, saturation (a strength v: factors ~ U[max(0, 1 - v),
    1 + v], or a (min, max) range), hue (v: offsets ~ U[-v, v], v <= 0.5), each default None
    (op skipped); the four ops run in a random order per example, as torchvision's.
  grayscale: no parameters (torchvision's luma, repeated over the 3 channels).
  gaussian_blur: sigma (min, max), default (0.1, 2.0), drawn uniformly; method "pil"
    (default: Pillow's `ImageFilter.GaussianBlur`, used by MoCo-v2, DINO and MSN) or
    "gaussian" (torchvision's `gaussian_blur`, kernel_size taps, default 2 ceil(3 max) + 1);
    quantize (pil only): round to uint8 levels like Pillow. See `blur.py`.
  solarize: threshold (default 0.5, PIL's 128 on uint8; values >= threshold are inverted).
  normalize: mean, std (per channel; default ImageNet's), applied to every example.

Where: on accelerators every example's ops run at once under `jax.vmap` (`apply_vmapped`; a
per-example choice then costs every branch), on the CPU one example at a time with real
branches (`example_loop`, several times faster there); the two agree up to float32 rounding.

Randomness: `key` is the key of one view of one step (derive it from the run seed, the step
and the view with `jax.random.fold_in`); example i draws from `fold_in(key, indices[i])`, op k
from `fold_in(example_key, k)` with k its place in `OPS`. `indices` defaults to the batch
positions 0..B-1; pass the examples' indices in the dataset to make each draw a function of
(seed, step, view, example) alone. So an example's draw does not depend on the batch size, on
its place in the batch, on the other ops of the preset, or on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from retro_jax.data import blur
from retro_jax.data import color
from retro_jax.data import example_loop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OPS = ("color_jitter", "grayscale", "gaussian_blur", "solarize", "normalize")
BLUR_METHODS = ("pil", "gaussian")


@dataclasses.dataclass(frozen=True)
class ColorJitter:
  """`RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)`."""
  p: float = 1.0
  brightness: float | color.Range | None = None
  contrast: float | color.Range | None = None
  saturation: float | color.Range | None = None
  hue: float | color.Range | None = None

  def __post_init__(self):
    for name in color.JITTER_OPS:  # strengths become ranges, as torchvision's _check_input
      object.__setattr__(self, name, color.jitter_range(getattr(self, name), name))

  @property
  def ranges(self) -> dict[str, color.Range | None]:
    return {name: getattr(self, name) for name in color.JITTER_OPS}


@dataclasses.dataclass(frozen=True)
class Grayscale:
  """`RandomGrayscale(p)`."""
  p: float = 1.0


@dataclasses.dataclass(frozen=True)
class GaussianBlur:
  """A blur with sigma ~ U(sigma), applied with probability p (MoCo-v2's `GaussianBlur`)."""
  p: float = 1.0
  sigma: tuple[float, float] = (0.1, 2.0)
  method: str = "pil"
  quantize: bool = False
  kernel_size: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "sigma", tuple(float(s) for s in self.sigma))
    low, high = self.sigma
    if not 0.0 < low <= high:
      raise ValueError(f"gaussian_blur sigma must be (min, max) with 0 < min <= max, "
                       f"got {self.sigma}")
    if self.method not in BLUR_METHODS:
      raise ValueError(f"gaussian_blur method must be one of {BLUR_METHODS}, "
                       f"got {self.method!r}")
    if self.method != "pil" and self.quantize:
      raise ValueError("gaussian_blur quantize only applies to method 'pil'")
    if self.kernel_size is not None and self.method != "gaussian":
      raise ValueError("gaussian_blur kernel_size only applies to method 'gaussian'")
    if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 != 1):
      raise ValueError(f"gaussian_blur kernel_size must be odd and positive, "
                       f"got {self.kernel_size}")

  def __call__(self, image: jax.Array, sigma: jax.Array) -> jax.Array:
    if self.method == "pil":
      return blur.pil_gaussian_blur(image, sigma, self.sigma[1], quantize=self.quantize)
    kernel_size = self.kernel_size or blur.default_kernel_size(self.sigma[1])
    return blur.gaussian_blur(image, sigma, kernel_size)


@dataclasses.dataclass(frozen=True)
class Solarize:
  """`RandomSolarize(threshold, p)`; DINO's `Solarization(p)` is threshold 0.5."""
  p: float = 1.0
  threshold: float = 0.5


@dataclasses.dataclass(frozen=True)
class Normalize:
  """`Normalize(mean, std)` over the channels."""
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD

  def __post_init__(self):
    object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
    object.__setattr__(self, "std", tuple(float(s) for s in self.std))
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"normalize needs 3 means and 3 positive stds, got mean={self.mean}, "
                       f"std={self.std}")


_OP_TYPES = {"color_jitter": ColorJitter, "grayscale": Grayscale,
             "gaussian_blur": GaussianBlur, "solarize": Solarize, "normalize": Normalize}


@dataclasses.dataclass(frozen=True)
class PhotometricSpec:
  """A validated, hashable preset for one view; build it with `from_config`."""
  color_jitter: ColorJitter | None = None
  grayscale: Grayscale | None = None
  gaussian_blur: GaussianBlur | None = None
  solarize: Solarize | None = None
  normalize: Normalize | None = None

  def __post_init__(self):
    for name in OPS[:-1]:
      op = getattr(self, name)
      if op is not None and not 0.0 <= op.p <= 1.0:
        raise ValueError(f"{name}: p must be in [0, 1], got {op.p}")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> PhotometricSpec:
    """Validates a preset given as plain data (a dict or a ConfigDict).

    Args:
      config: op name (one of `OPS`) -> its parameters (a mapping; None leaves the op out).

    Returns:
      The spec.

    Raises:
      ValueError: an unknown op or parameter, or a value out of range.
    """
    ops = {}
    for name in config.keys():
      if name not in _OP_TYPES:
        raise ValueError(f"unknown photometric op {name!r}; expected some of {OPS}")
      params = config[name]
      if params is None:
        continue
      params = dict(params.items())
      fields = {f.name for f in dataclasses.fields(_OP_TYPES[name])}
      unknown = sorted(set(params) - fields)
      if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; expected some of "
                         f"{sorted(fields)}")
      ops[name] = _OP_TYPES[name](**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in params.items()})
    return cls(**ops)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 images as float32 in [0, 1] (`ToTensor`); float images as float32, unchanged."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def normalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """(images - mean) / std per channel (the last axis)."""
  return (images - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


# How many U[0, 1) numbers each op draws besides its apply coin.
_UNIFORMS = {"color_jitter": color.JITTER_UNIFORMS, "grayscale": 0, "gaussian_blur": 1,
             "solarize": 0}


def sample_params(key: jax.Array, spec: PhotometricSpec) -> dict[str, dict[str, jax.Array]]:
  """Draws one example's parameters: per op, `apply` (bool) and the op's own values.

  Op k of `OPS` draws u ~ U[0, 1)^n from `fold_in(key, k)`; it applies when u[0] < p
  (torchvision's `RandomApply`, `RandomGrayscale`), and the blur's sigma is
  min + (max - min) u[1] (`random.uniform(min, max)` in MoCo-v2 and DINO).

  Args:
    key: the example's key (`apply_photometric` uses `fold_in(view_key, example_index)`).
    spec: the preset.

  Returns:
    op name -> {"apply": bool, ...}: color_jitter adds the fields of `color.JitterParams`,
    gaussian_blur adds "sigma". Ops the spec leaves out are absent. `jax.vmap` over keys
    for a batch.
  """
  params = {}
  for index, name in enumerate(OPS[:-1]):
    op = getattr(spec, name)
    if op is None:
      continue
    # Drawn in a power-of-two count: XLA:CPU compiles e.g. 9 draws 3x slower than 16.
    count = 1 << _UNIFORMS[name].bit_length()
    u = jax.random.uniform(jax.random.fold_in(key, index), (count,))
    params[name] = {"apply": u[0] < op.p}
    if name == "color_jitter":
      params[name].update(color.jitter_from_uniform(u[1:], op.ranges)._asdict())
    elif name == "gaussian_blur":
      low, high = op.sigma
      params[name]["sigma"] = low + (high - low) * u[1]
  return params


def apply_params(image: jax.Array, params: dict[str, dict[str, jax.Array]],
                 spec: PhotometricSpec) -> jax.Array:
  """Applies one example's drawn parameters to its float HWC image in [0, 1]."""
  jitter = spec.color_jitter
  if jitter is not None:
    drawn = color.JitterParams(**{k: v for k, v in params["color_jitter"].items()
                                  if k != "apply"})
    if jitter.p > 0.0:
      image = color.apply_jitter(image, drawn, jitter.ranges, params["color_jitter"]["apply"])
  maybe = example_loop.maybe
  if spec.grayscale is not None:
    image = maybe(spec.grayscale, lambda x: color.rgb_to_grayscale(x, 3), image,
                  params["grayscale"]["apply"])
  if spec.gaussian_blur is not None:
    sigma = params["gaussian_blur"]["sigma"]
    image = maybe(spec.gaussian_blur, lambda x: spec.gaussian_blur(x, sigma), image,
                  params["gaussian_blur"]["apply"])
  if spec.solarize is not None:
    image = maybe(spec.solarize, lambda x: color.solarize(x, spec.solarize.threshold),
                  image, params["solarize"]["apply"])
  return image


def example_keys(key: jax.Array, batch_size_or_indices: int | jax.Array) -> jax.Array:
  """The keys of the examples of a batch: `fold_in(key, i)` for each example index i.

  Args:
    key: the view's key for this step.
    batch_size_or_indices: a batch size B (the indices are then 0..B-1, the batch
      positions) or an int array [B] of example indices.

  Returns:
    [B] keys.
  """
  if isinstance(batch_size_or_indices, int):
    indices = jnp.arange(batch_size_or_indices)
  else:
    indices = jnp.asarray(batch_size_or_indices)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)


def apply_photometric(key: jax.Array, images: jax.Array,
                      spec: PhotometricSpec | Mapping[str, Any],
                      indices: jax.Array | None = None) -> jax.Array:
  """Augments a batch of one view, each example with its own draw, then normalises.

  Args:
    key: this view's key for this step.
    images: [B, H, W, 3] uint8 (as from the host) or float in [0, 1]; may be sharded over
      devices along B.
    spec: the preset (a `PhotometricSpec`, or plain data for `PhotometricSpec.from_config`).
    indices: optional int [B]: example b draws from `fold_in(key, indices[b])`, e.g. its
      index in the dataset; default the batch positions 0..B-1. May be sharded like images.

  Returns:
    [B, H, W, 3] float32 images: in [0, 1] without "normalize", normalised with it.
  """
  if not isinstance(spec, PhotometricSpec):
    spec = PhotometricSpec.from_config(spec)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected [B, H, W, 3] RGB images, got shape {images.shape} "
                     "(expand grayscale sources to 3 channels on the host)")
  if indices is None:
    indices = images.shape[0]
  else:
    indices = jnp.asarray(indices)
    if indices.shape != images.shape[:1] or not jnp.issubdtype(indices.dtype, jnp.integer):
      raise ValueError(f"indices must be integers of shape [B] = {images.shape[:1]}, got "
                       f"{indices.dtype}{list(indices.shape)}")
  images = jnp.asarray(images)
  keys = example_keys(key, indices)
  # With explicit mesh axes the keys must be sharded over the batch like the images
  # (vmap maps both together); with automatic axes the compiler propagates it.
  sharding = jax.typeof(images).sharding
  batch_axis = sharding.spec[0] if sharding.spec else None
  if batch_axis is not None:
    keys = jax.sharding.reshard(keys, jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(batch_axis)))
  params = jax.vmap(functools.partial(sample_params, spec=spec))(keys)
  # XLA:CPU runs a loop over the examples several times faster (see `example_loop`); a loop
  # cannot run over a sharded axis, so each device loops over its own examples.
  looped = functools.partial(example_loop.apply_batch, spec=spec)
  if batch_axis is not None:
    looped = jax.shard_map(looped, mesh=sharding.mesh,
                           in_specs=jax.sharding.PartitionSpec(batch_axis),
                           out_specs=jax.sharding.PartitionSpec(batch_axis))
  return jax.lax.platform_dependent(images, params, cpu=looped,
                                    default=functools.partial(apply_vmapped, spec=spec))


def apply_vmapped(images: jax.Array, params: dict[str, dict[str, jax.Array]],
                  spec: PhotometricSpec) -> jax.Array:
  """Every example's drawn ops at once under `jax.vmap`, then `normalize`: the accelerator
  path of `apply_photometric` (`example_loop.apply_batch` is the CPU's, equal up to float32
  rounding).

  Args:
    images: [B, H, W, 3] uint8 or float in [0, 1].
    params: the examples' draws, `sample_params` vmapped over their keys.
    spec: the preset.

  Returns:
    [B, H, W, 3] float32.
  """
  images = jax.vmap(functools.partial(apply_params, spec=spec))(to_float(images), params)
  if spec.normalize is not None:
    images = normalize(images, spec.normalize.mean, spec.normalize.std)
  return images

"""Augmentation presets as configuration: every name and number in the config, none in code.

A preset is plain data: `preset("dino")` returns a ConfigDict with one entry per view, each
spelled out in full, which a config file copies and edits:

    config.augmentation = presets.preset("dino", num_local_crops=6)
    config.augmentation.views[1].photometric.solarize.p = 0.3
    config.augmentation.views[0].photometric.gaussian_blur = None      # leave an op out
    for view in config.augmentation.views[2:]:
      view.crop.scale = (0.05, 0.25)

    jitter = config.augmentation.views[0].photometric.color_jitter
    with jitter.ignore_type():     # ConfigDict keeps a field's type: a strength -> a range
      jitter.saturation = (0.5, 1.5)

    augmentation = presets.Augmentation.from_config(config.augmentation)   # validated
    views = augmentation.host_views(image, seed)             # in tf.data.map: uint8 views
    batch = augmentation.device_views(key, views, indices)   # in the jitted step: float32

The layout (`views` is a list, in crop order: globals first):

    views: [                       # one entry per view
      {crop: {size, scale, ratio, flip_prob, interpolation, pil_rounding},   # or:
       eval: {size, crop_fraction, interpolation, pil_rounding},
       photometric: {color_jitter: {p, brightness, contrast, saturation, hue} | None,
                     grayscale: {p} | None,
                     gaussian_blur: {p, sigma, method, quantize, kernel_size} | None,
                     solarize: {p, threshold} | None,
                     normalize: {mean, std} | None}},
      ...]

`crop` is `host_ops.CropSpec` (torchvision's `RandomResizedCrop` + `RandomHorizontalFlip`),
`eval` is `EvalSpec` (`Resize(round(size / crop_fraction))` + `CenterCrop(size)`), and
`photometric` is `device_ops.PhotometricSpec` (see device_ops.py for every parameter; an op set
to None is not applied). Every view is one entry, even the eight identical local crops of DINO,
so that each can be edited alone; `preset(name, **overrides)` rebuilds a preset with other
sizes, scales or numbers of crops. `Augmentation.from_config` rejects unknown keys and values
out of range with the key's path, e.g. "views[1].photometric.solarize.p: must be a probability
in [0, 1], got 1.5".

Presets (the readings of the open points of the papers and their code are in each builder's
docstring below: `_mocov2`, `_mocov2_lowres`, `_dino`, `_rob_dino`, `_msn`, `_rob_swav`,
`_eval`, `_eval_lowres`):
  mocov2         MoCo-v2's `aug_plus` (Retro, DisCo): 2 identical views.
  mocov2_lowres  `mocov2` for 32 px datasets (Fashion-MNIST, CIFAR): no blur.
  dino           DINO's `DataAugmentationDINO`: 2 global + 8 local crops, bicubic.
  rob_dino       RoB-DINO's VISSL config (ViT-B teacher): 2 + 8 crops, DINO's blur and
                 solarisation, VISSL's colour distortion and bilinear crops.
  msn            MSN's `make_transforms` at RoB-MSN's strength 1.0: 2 + 10 crops.
  rob_swav       RoB-SwAV's VISSL config (SwAV's multi-crop): 2 + 4 crops, strength 1.0.
  eval           Resize(256) + CenterCrop(224), ImageNet's protocol.
  eval_lowres    Resize(32) of the whole image (crop_fraction 1), for 28-32 px datasets.
All normalise with ImageNet's mean and std (the teachers were trained with it). Grayscale
sources (Fashion-MNIST) are repeated to 3 channels on the host by `host_ops`, for every preset.

Randomness: view v of example i in step t draws its crop and flip on the host from
`stateless_fold_in(seed, v)`, where the caller derives `seed` from (run seed, epoch or step,
i), and its photometric ops on the device from `fold_in(fold_in(key, v), i)` with
`key = fold_in(jax.random.key(run_seed), t)`: nothing depends on the batch size, on the
example's place in the batch or on the sharding.

Importing this module loads neither TensorFlow nor TFDS (config files import it); the host
ops are imported on first use.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import ml_collections

from retro_jax.data import color
from retro_jax.data import device_ops

if TYPE_CHECKING:
  from retro_jax.data import host_ops

IMAGENET_MEAN = device_ops.IMAGENET_MEAN
IMAGENET_STD = device_ops.IMAGENET_STD
INTERPOLATIONS = ("bilinear", "bicubic")
# torchvision's RandomResizedCrop default ratio range.
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# MoCo-v2's, DINO's and MSN's blur: PIL's GaussianBlur(radius ~ U[0.1, 2.0]) (radius = sigma).
BLUR_SIGMA = (0.1, 2.0)


# --- Plain-data builders ----------------------------------------------------------------------

def _crop(size: int, scale: Sequence[float], interpolation: str) -> dict[str, Any]:
  return {"size": size, "scale": tuple(scale), "ratio": DEFAULT_RATIO, "flip_prob": 0.5,
          "interpolation": interpolation, "pil_rounding": False}


def _jitter(p: float, brightness: float, contrast: float, saturation: float,
            hue: float) -> dict[str, Any]:
  return {"p": p, "brightness": brightness, "contrast": contrast, "saturation": saturation,
          "hue": hue}


def _blur(p: float) -> dict[str, Any]:
  return {"p": p, "sigma": BLUR_SIGMA, "method": "pil", "quantize": False, "kernel_size": None}


def _photometric(jitter: dict[str, Any] | None, grayscale_p: float | None,
                 blur_p: float | None, solarize_p: float | None) -> dict[str, Any]:
  return {
      "color_jitter": jitter,
      "grayscale": None if grayscale_p is None else {"p": grayscale_p},
      "gaussian_blur": None if blur_p is None else _blur(blur_p),
      # PIL's ImageOps.solarize(img) inverts levels >= 128: x >= 0.5 on x = level / 255.
      "solarize": None if solarize_p is None else {"p": solarize_p, "threshold": 0.5},
      "normalize": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
  }


def _view(geometry_kind: str, geometry: dict[str, Any],
          photometric: dict[str, Any]) -> ml_collections.ConfigDict:
  # A ConfigDict per view: ConfigDict does not convert dicts inside lists, and attribute
  # access (views[1].photometric.solarize.p) is what a config file edits.
  return ml_collections.ConfigDict({geometry_kind: geometry, "photometric": photometric})


def _config(views: list[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"views": views})


def _check_count(name: str, value: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ValueError(f"{name} must be a non-negative int, got {value!r}")


# --- The presets ------------------------------------------------------------------------------

def _mocov2(size: int = 224, scale: Sequence[float] = (0.2, 1.0)) -> ml_collections.ConfigDict:
  """MoCo-v2's `aug_plus` (main_moco.py), the augmentation of Retro and DisCo (retro.md §3).

  Both views: RandomResizedCrop(224, scale=(0.2, 1.0)) with torchvision's default bilinear
  interpolation and ratio (3/4, 4/3); RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)
  (torchvision's ColorJitter applies its four ops in a random order); RandomGrayscale(0.2);
  RandomApply(GaussianBlur(sigma ~ U[0.1, 2.0]) with PIL's `ImageFilter.GaussianBlur`,
  p=0.5); RandomHorizontalFlip(0.5); ImageNet mean/std.

  Readings: the flip, done after the blur in MoCo, is done first on the host here; it
  commutes with every photometric op (all are per pixel or symmetric). The blur is PIL's
  (method "pil"), in float without PIL's rounding to uint8 (quantize=False).
  """
  photometric = _photometric(_jitter(0.8, 0.4, 0.4, 0.4, 0.1), 0.2, 0.5, None)
  return _config([_view("crop", _crop(size, scale, "bilinear"), photometric)
                  for _ in range(2)])


def _mocov2_lowres(size: int = 32,
                   scale: Sequence[float] = (0.2, 1.0)) -> ml_collections.ConfigDict:
  """`mocov2` for small images (Fashion-MNIST's 28 px, CIFAR's 32 px): 32 px views, no blur.

  The crops, colour jitter, grayscale, flip and normalisation are MoCo-v2's. The blur is left
  out, as SimCLR leaves it out for CIFAR-10: its sigma, U[0.1, 2.0] px, is chosen for 224 px
  views, and 2 px on a 32 px view (14 px at 224) erases most of a 28 px garment's detail,
  while a sigma scaled by 32/224 (<= 0.3 px) barely changes a pixel. Add
  `gaussian_blur = {"p": 0.5, "sigma": (...)}` to a view to get one back. Grayscale sources
  are repeated to 3 channels on the host; the mean and std stay ImageNet's, which the
  ImageNet-trained teachers expect.
  """
  photometric = _photometric(_jitter(0.8, 0.4, 0.4, 0.4, 0.1), 0.2, None, None)
  return _config([_view("crop", _crop(size, scale, "bilinear"), photometric)
                  for _ in range(2)])


def _multi_crop(global_size: int, local_size: int, global_scale: Sequence[float],
                local_scale: Sequence[float], num_local_crops: int, interpolation: str,
                jitter: dict[str, Any], blur_p: Sequence[float],
                solarize_p: Sequence[float | None]) -> ml_collections.ConfigDict:
  """Two global views (blur_p[0], blur_p[1]) and `num_local_crops` local ones (blur_p[2])."""
  _check_count("num_local_crops", num_local_crops)
  views = [_view("crop", _crop(global_size, global_scale, interpolation),
                 _photometric(jitter, 0.2, blur_p[i], solarize_p[i])) for i in range(2)]
  views += [_view("crop", _crop(local_size, local_scale, interpolation),
                  _photometric(jitter, 0.2, blur_p[2], solarize_p[2]))
            for _ in range(num_local_crops)]
  return _config(views)


def _dino(global_size: int = 224, local_size: int = 96,
          global_scale: Sequence[float] = (0.4, 1.0),
          local_scale: Sequence[float] = (0.05, 0.4),
          num_local_crops: int = 8) -> ml_collections.ConfigDict:
  """DINO's `DataAugmentationDINO` (main_dino.py) with main_dino.py's defaults.

  Global views (2 x 224, scale (0.4, 1)) and local views (`--local_crops_number` 8 x 96,
  scale (0.05, 0.4)): RandomResizedCrop with BICUBIC interpolation and the default ratio;
  flip 0.5; RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8); RandomGrayscale(0.2);
  DINO's `utils.GaussianBlur(p)` (PIL's GaussianBlur, radius ~ U[0.1, 2.0]) with p = 1.0 on
  global 1, 0.1 on global 2 and 0.5 on the locals; `utils.Solarization(0.2)`
  (`ImageOps.solarize`, threshold 128, i.e. 0.5 here) on global 2 only; ImageNet mean/std.

  Readings: DINO applies its blur when `random.random() <= p` and everything else when
  `random() < p`; both are p up to a measure-zero event. The sizes, scales and number of
  local crops are arguments (`preset("dino", num_local_crops=6)`, or 32/16 px for small
  images); the blur's sigma is in output pixels and does not follow the sizes.
  """
  return _multi_crop(global_size, local_size, global_scale, local_scale, num_local_crops,
                     "bicubic", _jitter(0.8, 0.4, 0.4, 0.2, 0.1), (1.0, 0.1, 0.5),
                     (None, 0.2, None))


def _rob_dino(global_size: int = 224, local_size: int = 96,
              global_scale: Sequence[float] = (0.25, 1.0),
              local_scale: Sequence[float] = (0.05, 0.25),
              num_local_crops: int = 8) -> ml_collections.ConfigDict:
  """RoB-DINO (rob.md §2.2 and §4.1: VISSL's `dino_distill_deit_b16_to_deit_s16_on_in1k`).

  2 x 224 at scale (0.25, 1) and 8 x 96 at (0.05, 0.25); flip 0.5; VISSL's
  `ImgPilColorDistortion(strength=0.5)`: RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), 0.8) and
  RandomGrayscale(0.2) (saturation 0.4, where DINO's own code has 0.2); blur radius
  U[0.1, 2.0] with p = 1.0 / 0.1 / 0.5 (global 1 / global 2 / locals); solarise p = 0.2 on
  global 2 only; ImageNet mean/std.

  Readings: rob.md notes that VISSL's RandomResizedCrop keeps torchvision's default
  interpolation, so the crops are bilinear (DINO's are bicubic). With a ViT-S teacher, the
  RoB config uses DINO's scales: `preset("rob_dino", global_scale=(0.4, 1.0),
  local_scale=(0.05, 0.4))`.
  """
  return _multi_crop(global_size, local_size, global_scale, local_scale, num_local_crops,
                     "bilinear", _jitter(0.8, 0.4, 0.4, 0.4, 0.1), (1.0, 0.1, 0.5),
                     (None, 0.2, None))


def _msn(global_size: int = 224, local_size: int = 96,
         global_scale: Sequence[float] = (0.3, 1.0),
         local_scale: Sequence[float] = (0.05, 0.3),
         num_local_crops: int = 10,
         color_jitter_strength: float = 1.0) -> ml_collections.ConfigDict:
  """MSN's `make_transforms` (src/data_manager.py) at RoB-MSN's settings (rob.md §2.3, §4.2).

  2 x 224 at scale (0.3, 1) (MSN's target view and its random anchor view) and 10 x 96
  "focal" views at (0.05, 0.3): RandomResizedCrop with torchvision's default (bilinear)
  interpolation and ratio; flip 0.5; MSN's `get_color_distortion(s)`:
  RandomApply(ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s), p=0.8) and RandomGrayscale(0.2);
  MSN's `GaussianBlur(p=0.5)` (PIL's GaussianBlur, radius ~ U[0.1, 2.0]) on every view; no
  solarisation; ImageNet mean/std.

  Readings: the strength s is 1.0, as in RoB-MSN's config and `make_transforms`' default;
  MSN's own ViT configs use `color_jitter_strength: 0.5` (`preset("msn",
  color_jitter_strength=0.5)`). Interpolation: neither MSN nor VISSL passes one to
  RandomResizedCrop, so bilinear, not DINO's bicubic.
  """
  s = color_jitter_strength
  if not isinstance(s, numbers.Real) or isinstance(s, bool) or s < 0:
    raise ValueError(f"color_jitter_strength must be a non-negative number, got {s!r}")
  return _multi_crop(global_size, local_size, global_scale, local_scale, num_local_crops,
                     "bilinear", _jitter(0.8, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                     (0.5, 0.5, 0.5), (None, None, None))


def _rob_swav(global_size: int = 224, local_size: int = 96,
              global_scale: Sequence[float] = (0.14, 1.0),
              local_scale: Sequence[float] = (0.05, 0.14),
              num_local_crops: int = 4) -> ml_collections.ConfigDict:
  """RoB-SwAV (rob.md §4.4: VISSL's `swav_distill_rn50_to_rn50_on_in1k_8nodes.yaml`).

  SwAV's multi-crop as that config writes it: `ImgPilToMultiCrop` 2 x 224 at scale
  (0.14, 1) and 4 x 96 at (0.05, 0.14) (torchvision's RandomResizedCrop: bilinear, default
  ratio); flip 0.5; `ImgPilColorDistortion(strength=1.0)`: RandomApply(ColorJitter(0.8, 0.8,
  0.8, 0.2), p=0.8) and RandomGrayscale(0.2); `ImgPilGaussianBlur(p=0.5, radius U[0.1, 2.0])`
  on every view; no solarisation; ImageNet mean/std. `crops/eight_crops.yaml` is
  `num_local_crops=6`, `two_crops.yaml` `num_local_crops=0`.
  """
  return _multi_crop(global_size, local_size, global_scale, local_scale, num_local_crops,
                     "bilinear", _jitter(0.8, 0.8, 0.8, 0.8, 0.2), (0.5, 0.5, 0.5),
                     (None, None, None))


def _eval_view(size: int, crop_fraction: float,
               interpolation: str) -> ml_collections.ConfigDict:
  geometry = {"size": size, "crop_fraction": crop_fraction, "interpolation": interpolation,
              "pil_rounding": False}
  return _config([_view("eval", geometry, _photometric(None, None, None, None))])


def _eval(size: int = 224, crop_fraction: float = 224 / 256,
          interpolation: str = "bilinear") -> ml_collections.ConfigDict:
  """ImageNet's evaluation view: Resize(256) + CenterCrop(224), ImageNet mean/std.

  As MoCo's and DisCo's `main_lincls.py` (retro.md §4.1) write it, with torchvision's default
  bilinear resize; DINO's evaluations resize bicubically: `preset("eval",
  interpolation="bicubic")`. One view, no random op.
  """
  return _eval_view(size, crop_fraction, interpolation)


def _eval_lowres(size: int = 32, crop_fraction: float = 1.0,
                 interpolation: str = "bilinear") -> ml_collections.ConfigDict:
  """The evaluation view of small images: the whole image resized to 32 px (crop_fraction 1).

  A centre crop would cut the border of a 28 px Fashion-MNIST garment; resizing it to the
  training views' 32 px keeps all of it. ImageNet mean/std; grayscale repeated to 3 channels.
  """
  return _eval_view(size, crop_fraction, interpolation)


_PRESETS: dict[str, Callable[..., ml_collections.ConfigDict]] = {
    "mocov2": _mocov2,
    "mocov2_lowres": _mocov2_lowres,
    "dino": _dino,
    "rob_dino": _rob_dino,
    "msn": _msn,
    "rob_swav": _rob_swav,
    "eval": _eval,
    "eval_lowres": _eval_lowres,
}
PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> ml_collections.ConfigDict:
  """The named augmentation preset, spelled out in full as an editable ConfigDict.

  Args:
    name: one of `PRESETS`.
    **overrides: the preset's own parameters (see `preset_parameters`): mocov2 and
      mocov2_lowres take size, scale; dino, rob_dino, rob_swav take global_size, local_size,
      global_scale, local_scale, num_local_crops; msn these and color_jitter_strength; eval and
      eval_lowres take size, crop_fraction, interpolation.

  Returns:
    A fresh ConfigDict {"views": [one ConfigDict per view]} (see the module docstring).

  Raises:
    ValueError: an unknown preset or parameter.
  """
  if name not in _PRESETS:
    raise ValueError(f"unknown augmentation preset {name!r}; expected one of {PRESETS}")
  known = preset_parameters(name)
  unknown = sorted(set(overrides) - set(known))
  if unknown:
    raise ValueError(f"preset {name!r} has no parameter(s) {unknown}; it takes {known}")
  return _PRESETS[name](**overrides)


def preset_parameters(name: str) -> dict[str, Any]:
  """The parameters `preset(name, ...)` takes, with their defaults."""
  if name not in _PRESETS:
    raise ValueError(f"unknown augmentation preset {name!r}; expected one of {PRESETS}")
  return {p.name: p.default for p in inspect.signature(_PRESETS[name]).parameters.values()}


# --- Validation ---------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_mapping(value: Any) -> bool:
  return hasattr(value, "keys") and hasattr(value, "items") and hasattr(value, "__getitem__")


def _positive_int(value):
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"must be a positive int, got {value!r}")
  return int(value)


def _probability(value):
  if not _is_number(value) or not 0.0 <= value <= 1.0:
    raise ValueError(f"must be a probability in [0, 1], got {value!r}")
  return float(value)


def _boolean(value):
  if not isinstance(value, bool):
    raise ValueError(f"must be True or False, got {value!r}")
  return value


def _choice(options: Sequence[str]):
  def check(value):
    if value not in options:
      raise ValueError(f"must be one of {tuple(options)}, got {value!r}")
    return value
  return check


def _pair(description: str, ok: Callable[[float, float], bool]):
  def check(value):
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2
        or not all(_is_number(v) for v in value) or not ok(*value)):
      raise ValueError(f"must be a (min, max) pair with {description}, got {value!r}")
    return tuple(float(v) for v in value)
  return check


def _numbers(count: int, positive: bool):
  def check(value):
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
        or len(value) != count or not all(_is_number(v) for v in value)
        or (positive and min(value) <= 0)):
      kind = "positive numbers" if positive else "numbers"
      raise ValueError(f"must be {count} {kind} (one per channel), got {value!r}")
    return tuple(float(v) for v in value)
  return check


def _crop_fraction(value):
  if not _is_number(value) or not 0.0 < value <= 1.0:
    raise ValueError(f"must lie in (0, 1], got {value!r}")
  return float(value)


def _jitter_strength(name: str):
  def check(value):
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
      value = tuple(value)
    elif value is not None and not _is_number(value):
      raise ValueError(f"must be a strength, a (min, max) pair or None, got {value!r}")
    try:
      color.jitter_range(value, name)
    except (ValueError, TypeError) as e:
      raise ValueError(str(e)) from None
    return value
  return check


def _kernel_size(value):
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1 \
      or value % 2 != 1:
    raise ValueError(f"must be None or an odd positive int, got {value!r}")
  return int(value)


def _threshold(value):
  if not _is_number(value) or not 0.0 <= value <= 1.0:
    raise ValueError(f"must lie in [0, 1] (images are floats in [0, 1]), got {value!r}")
  return float(value)


_INTERPOLATION = _choice(INTERPOLATIONS)
_CROP_FIELDS = {
    "size": _positive_int,
    "scale": _pair("0 < min <= max <= 1", lambda a, b: 0.0 < a <= b <= 1.0),
    "ratio": _pair("0 < min <= max", lambda a, b: 0.0 < a <= b),
    "flip_prob": _probability,
    "interpolation": _INTERPOLATION,
    "pil_rounding": _boolean,
}
_EVAL_FIELDS = {
    "size": _positive_int,
    "crop_fraction": _crop_fraction,
    "interpolation": _INTERPOLATION,
    "pil_rounding": _boolean,
}
_PHOTOMETRIC_FIELDS = {
    "color_jitter": {"p": _probability,
                     **{name: _jitter_strength(name) for name in color.JITTER_OPS}},
    "grayscale": {"p": _probability},
    "gaussian_blur": {"p": _probability,
                      "sigma": _pair("0 < min <= max", lambda a, b: 0.0 < a <= b),
                      "method": _choice(device_ops.BLUR_METHODS),
                      "quantize": _boolean,
                      "kernel_size": _kernel_size},
    "solarize": {"p": _probability, "threshold": _threshold},
    "normalize": {"mean": _numbers(3, positive=False), "std": _numbers(3, positive=True)},
}


def _fields(value: Any, fields: Sequence[str], path: str, required: Sequence[str] = ()
            ) -> dict[str, Any]:
  """`value` as a dict, with only the keys in `fields` and all the `required` ones."""
  if not _is_mapping(value):
    raise ValueError(f"{path}: expected a mapping with keys from {sorted(fields)}, "
                     f"got {type(value).__name__} {value!r}")
  result = dict(value.items())
  for key in result:
    if key not in fields:
      raise ValueError(f"{path}.{key}: unknown key; expected one of {sorted(fields)}")
  for key in required:
    if key not in result:
      raise ValueError(f"{path}.{key}: missing (required)")
  return result


def _checked(value: Any, checks: dict[str, Callable[[Any], Any]], path: str,
             required: Sequence[str] = ()) -> dict[str, Any]:
  params = _fields(value, list(checks), path, required)
  for key, param in params.items():
    try:
      params[key] = checks[key](param)
    except ValueError as e:
      raise ValueError(f"{path}.{key}: {e}") from None
  return params


def _build(path: str, factory: Callable[..., Any], *args, **kwargs) -> Any:
  """factory(...), its ValueError (a constraint between fields) prefixed with `path`."""
  try:
    return factory(*args, **kwargs)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  """A deterministic evaluation view: `Resize(round(size / crop_fraction))`, `CenterCrop(size)`.

  Attributes:
    size: output side in pixels.
    crop_fraction: the centre crop's side over the resized shorter side, in (0, 1]; 224/256 is
      ImageNet's protocol, 1.0 keeps the whole (square) image.
    interpolation: "bilinear" (torchvision's default) or "bicubic".
    pil_rounding: resize with PIL's intermediate rounding (see `host_ops.resize`).
  """
  size: int
  crop_fraction: float = 224 / 256
  interpolation: str = "bilinear"
  pil_rounding: bool = False

  def __post_init__(self):
    _checked(dataclasses.asdict(self), _EVAL_FIELDS, "eval")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One view: its host-side geometry and its device-side photometric ops."""
  geometry: host_ops.CropSpec | EvalSpec
  photometric: device_ops.PhotometricSpec

  @property
  def size(self) -> int:
    return self.geometry.size


def _view_spec(config: Any, path: str) -> ViewSpec:
  from retro_jax.data import host_ops  # pylint: disable=g-import-not-at-top

  view = _fields(config, ("crop", "eval", "photometric"), path, required=("photometric",))
  kinds = [kind for kind in ("crop", "eval") if kind in view]
  if len(kinds) != 1:
    raise ValueError(f"{path}: needs exactly one of 'crop' (a random resized crop) or 'eval' "
                     f"(resize and centre crop), got {kinds or 'neither'}")
  kind = kinds[0]
  if kind == "crop":
    params = _checked(view["crop"], _CROP_FIELDS, f"{path}.crop", required=("size",))
    geometry = _build(f"{path}.crop", host_ops.CropSpec, **params)
  else:
    params = _checked(view["eval"], _EVAL_FIELDS, f"{path}.eval", required=("size",))
    geometry = _build(f"{path}.eval", EvalSpec, **params)

  photometric_path = f"{path}.photometric"
  ops = _fields(view["photometric"], list(_PHOTOMETRIC_FIELDS), photometric_path)
  for name, params in ops.items():
    if params is not None:
      ops[name] = _checked(params, _PHOTOMETRIC_FIELDS[name], f"{photometric_path}.{name}")
  photometric = _build(photometric_path, device_ops.PhotometricSpec.from_config, ops)
  return ViewSpec(geometry, photometric)


# --- The augmentation -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Augmentation:
  """A validated, hashable augmentation: one `ViewSpec` per view, in crop order.

  Build it with `from_config(preset(...))` or `from_preset(...)`. It is hashable, so it can be
  closed over or passed as a static argument of `jax.jit`.
  """
  views: tuple[ViewSpec, ...]

  def __post_init__(self):
    if not self.views:
      raise ValueError("an augmentation needs at least one view")

  @classmethod
  def from_config(cls, config: Any) -> Augmentation:
    """Validates plain data (a ConfigDict or a dict) of the layout of the module docstring.

    Raises:
      ValueError: an unknown or missing key, or a value out of range; the message starts with
        the key's path, e.g. "views[1].photometric.solarize.p: ...".
    """
    top = _fields(config, ("views",), "augmentation", required=("views",))
    views = top["views"]
    if isinstance(views, (str, bytes)) or not isinstance(views, Sequence) or not views:
      raise ValueError(f"views: expected a non-empty list of views, got {views!r}")
    return cls(tuple(_view_spec(view, f"views[{i}]") for i, view in enumerate(views)))

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> Augmentation:
    """`from_config(preset(name, **overrides))`."""
    return cls.from_config(preset(name, **overrides))

  @property
  def num_views(self) -> int:
    return len(self.views)

  @property
  def sizes(self) -> tuple[int, ...]:
    """The side of each view in pixels."""
    return tuple(view.size for view in self.views)

  def host_views(self, image, seed, fused_max_views: int = 1) -> tuple:
    """The geometric half on the host, in TensorFlow: usable inside `tf.data.Dataset.map`.

    Crop view v is drawn from `stateless_fold_in(seed, v)` (as `host_ops.multi_crop` does;
    with only crop views, this is `multi_crop`); eval views are deterministic.

    Args:
      image: an encoded image (scalar string) or a decoded uint8 [H, W, C] image, C = 1
        (repeated to 3), 3 or 4 (alpha dropped).
      seed: int tensor [2], derived by the caller from (run seed, epoch or step, example).
      fused_max_views: see `host_ops.multi_crop`.

    Returns:
      One uint8 [size, size, 3] tensor per view.
    """
    from retro_jax.data import host_ops  # pylint: disable=g-import-not-at-top
    tf = host_ops.tf

    geometries = [view.geometry for view in self.views]
    if all(isinstance(g, host_ops.CropSpec) for g in geometries):
      return host_ops.multi_crop(image, seed, geometries, fused_max_views)
    image, seed = tf.convert_to_tensor(image), tf.convert_to_tensor(seed)
    if image.dtype == tf.string:
      image = host_ops.decode_image(image)  # once for all views
    views = []
    for v, g in enumerate(geometries):
      if isinstance(g, EvalSpec):
        views.append(host_ops.eval_view(image, g.size, g.crop_fraction, g.interpolation,
                                        g.pil_rounding))
      else:
        view_seed = tf.random.experimental.stateless_fold_in(seed, tf.constant(v, seed.dtype))
        views.append(host_ops.random_resized_crop(image, view_seed, g))
    return tuple(views)

  def device_views(self, key: jax.Array, views: Sequence[jax.Array],
                   indices: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """The photometric half on the device: jit-friendly, per-example draws.

    View v's batch goes through `device_ops.apply_photometric(fold_in(key, v), views[v],
    spec_v, indices)`: example b of view v draws from `fold_in(fold_in(key, v), indices[b])`.
    With `key = fold_in(jax.random.key(run_seed), step)` and `indices` the examples' indices
    in the dataset, every draw is a function of (run seed, step, view, example) alone.

    Args:
      key: this step's key.
      views: one [B, size_v, size_v, 3] array per view (uint8 from the host, or float in
        [0, 1]), all with the same B; may be sharded along B.
      indices: optional int [B], the examples' indices; default the batch positions.

    Returns:
      One float32 [B, size_v, size_v, 3] array per view, normalised as the view says.
    """
    if len(views) != len(self.views):
      raise ValueError(f"expected {len(self.views)} views, got {len(views)}")
    for v, (spec, images) in enumerate(zip(self.views, views)):
      if images.ndim != 4 or tuple(images.shape[1:]) != (spec.size, spec.size, 3):
        raise ValueError(f"views[{v}]: expected shape [B, {spec.size}, {spec.size}, 3], got "
                         f"{list(images.shape)}")
    return tuple(device_ops.apply_photometric(jax.random.fold_in(key, v), images,
                                              spec.photometric, indices)
                 for v, (spec, images) in enumerate(zip(self.views, views)))

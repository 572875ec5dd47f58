"""Augmentation presets: the papers' numbers, validation, host and device views end to end.

The reference pipelines below are written as the repositories write them (MoCo-v2's
`main_moco.py` `aug_plus` with `moco/loader.py`'s blur, DINO's `DataAugmentationDINO` with
`utils.GaussianBlur` and `utils.Solarization`, MSN's `make_transforms`); every parameter of a
preset is compared with the attributes of those torchvision objects. Images are real: Debian's
Fashion-MNIST and scikit-learn's sample photos.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import math
import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sklearn.datasets
import torch
import torchvision.transforms as transforms
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageFilter, ImageOps

from retro_jax.data import device_ops
from retro_jax.data import host_ops
from retro_jax.data import presets

tf = host_ops.tf

FLOAT_ATOL = 1e-5


# --- The reference pipelines, as the repositories write them ----------------------------------

class MocoGaussianBlur(object):
  """moco/loader.py: Gaussian blur augmentation in SimCLR https://arxiv.org/abs/2002.05709"""

  def __init__(self, sigma=[.1, 2.]):  # noqa: B006 (as written in MoCo)
    self.sigma = sigma

  def __call__(self, x):
    sigma = random.uniform(self.sigma[0], self.sigma[1])
    x = x.filter(ImageFilter.GaussianBlur(radius=sigma))
    return x


def moco_v2_aug_plus():
  """main_moco.py with --aug-plus; TwoCropsTransform applies it to both views."""
  normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406],
                                   std=[0.229, 0.224, 0.225])
  # MoCo v2's aug: similar to SimCLR https://arxiv.org/abs/2002.05709
  augmentation = [
      transforms.RandomResizedCrop(224, scale=(0.2, 1.)),
      transforms.RandomApply([
          transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)  # not strengthened
      ], p=0.8),
      transforms.RandomGrayscale(p=0.2),
      transforms.RandomApply([MocoGaussianBlur([.1, 2.])], p=0.5),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      normalize
  ]
  return transforms.Compose(augmentation)


class DinoGaussianBlur(object):
  """DINO utils.py: apply Gaussian Blur to the PIL image."""

  def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
    self.prob = p
    self.radius_min = radius_min
    self.radius_max = radius_max

  def __call__(self, img):
    do_it = random.random() <= self.prob
    if not do_it:
      return img
    return img.filter(ImageFilter.GaussianBlur(
        radius=random.uniform(self.radius_min, self.radius_max)))


class DinoSolarization(object):
  """DINO utils.py: apply Solarization to the PIL image."""

  def __init__(self, p):
    self.p = p

  def __call__(self, img):
    if random.random() < self.p:
      return ImageOps.solarize(img)
    else:
      return img


class DataAugmentationDINO(object):
  """DINO main_dino.py (defaults: global (0.4, 1.), local (0.05, 0.4), 8 local crops)."""

  def __init__(self, global_crops_scale, local_crops_scale, local_crops_number):
    flip_and_color_jitter = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply(
            [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
            p=0.8
        ),
        transforms.RandomGrayscale(p=0.2),
    ])
    normalize = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    # first global crop
    self.global_transfo1 = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=global_crops_scale,
                                     interpolation=Image.BICUBIC),
        flip_and_color_jitter,
        DinoGaussianBlur(1.0),
        normalize,
    ])
    # second global crop
    self.global_transfo2 = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=global_crops_scale,
                                     interpolation=Image.BICUBIC),
        flip_and_color_jitter,
        DinoGaussianBlur(0.1),
        DinoSolarization(0.2),
        normalize,
    ])
    # transformation for the local small crops
    self.local_crops_number = local_crops_number
    self.local_transfo = transforms.Compose([
        transforms.RandomResizedCrop(96, scale=local_crops_scale, interpolation=Image.BICUBIC),
        flip_and_color_jitter,
        DinoGaussianBlur(p=0.5),
        normalize,
    ])

  def __call__(self, image):
    crops = []
    crops.append(self.global_transfo1(image))
    crops.append(self.global_transfo2(image))
    for _ in range(self.local_crops_number):
      crops.append(self.local_transfo(image))
    return crops

  def views(self):
    return ([self.global_transfo1, self.global_transfo2]
            + [self.local_transfo] * self.local_crops_number)


class MsnGaussianBlur(object):
  """MSN src/data_manager.py."""

  def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
    self.prob = p
    self.radius_min = radius_min
    self.radius_max = radius_max

  def __call__(self, img):
    if torch.bernoulli(torch.tensor(self.prob)) == 0:
      return img
    radius = self.radius_min + torch.rand(1) * (self.radius_max - self.radius_min)
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def msn_make_transforms(rand_size=224, focal_size=96, rand_crop_scale=(0.3, 1.0),
                        focal_crop_scale=(0.05, 0.3), color_jitter=1.0, rand_views=2,
                        focal_views=10):
  """MSN src/data_manager.py `make_transforms` (its defaults); returns the transform of each
  view, in order, as its MultiViewTransform applies them."""

  def get_color_distortion(s=1.0):
    # s is the strength of color distortion.
    color_jitter = transforms.ColorJitter(0.8*s, 0.8*s, 0.8*s, 0.2*s)
    rnd_color_jitter = transforms.RandomApply([color_jitter], p=0.8)
    rnd_gray = transforms.RandomGrayscale(p=0.2)
    color_distort = transforms.Compose([
        rnd_color_jitter,
        rnd_gray])
    return color_distort

  rand_transform = transforms.Compose([
      transforms.RandomResizedCrop(rand_size, scale=rand_crop_scale),
      transforms.RandomHorizontalFlip(),
      get_color_distortion(s=color_jitter),
      MsnGaussianBlur(p=0.5),
      transforms.ToTensor(),
      transforms.Normalize(
          (0.485, 0.456, 0.406),
          (0.229, 0.224, 0.225))
  ])
  focal_transform = transforms.Compose([
      transforms.RandomResizedCrop(focal_size, scale=focal_crop_scale),
      transforms.RandomHorizontalFlip(),
      get_color_distortion(s=color_jitter),
      MsnGaussianBlur(p=0.5),
      transforms.ToTensor(),
      transforms.Normalize(
          (0.485, 0.456, 0.406),
          (0.229, 0.224, 0.225))
  ])
  return [rand_transform] * rand_views + [focal_transform] * focal_views


def rob_dino_vissl(global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), num_local=8):
  """RoB-DINO's VISSL transforms as reference/rob.md §4.1 lists them (VISSL's
  ImgPilColorDistortion(0.5) is ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8 + grayscale 0.2; its
  blur and solarisation are DINO's; crops keep torchvision's default interpolation)."""
  distortion = transforms.Compose([
      transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
      transforms.RandomGrayscale(p=0.2)])
  normalize = transforms.Compose([
      transforms.ToTensor(),
      transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

  def view(size, scale, blur_p, solarize_p):
    return transforms.Compose(
        [transforms.RandomResizedCrop(size, scale=scale), transforms.RandomHorizontalFlip(0.5),
         distortion, DinoGaussianBlur(blur_p)]
        + ([DinoSolarization(solarize_p)] if solarize_p else []) + [normalize])

  return ([view(224, global_scale, 1.0, 0.0), view(224, global_scale, 0.1, 0.2)]
          + [view(96, local_scale, 0.5, 0.0)] * num_local)


def rob_swav_vissl(num_local=4):
  """RoB-SwAV's VISSL transforms (`swav_distill_rn50_to_rn50_on_in1k_8nodes.yaml`):
  ImgPilToMultiCrop 2 x 224 at (0.14, 1) and 4 x 96 at (0.05, 0.14), flip 0.5,
  ImgPilColorDistortion(1.0) (ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8 + grayscale 0.2),
  ImgPilGaussianBlur(p=0.5, radius U[0.1, 2.0]) (DINO's blur), ToTensor, Normalize."""
  def view(size, scale):
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=scale), transforms.RandomHorizontalFlip(0.5),
        transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        transforms.RandomGrayscale(p=0.2), DinoGaussianBlur(0.5), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

  return [view(224, (0.14, 1.0))] * 2 + [view(96, (0.05, 0.14))] * num_local


def eval_transform(interpolation=transforms.InterpolationMode.BILINEAR):
  """MoCo's / DisCo's main_lincls.py validation transform."""
  normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
  return transforms.Compose([
      transforms.Resize(256, interpolation=interpolation),
      transforms.CenterCrop(224),
      transforms.ToTensor(),
      normalize,
  ])


# --- One description for both sides ----------------------------------------------------------

_INTERPOLATION = {transforms.InterpolationMode.BILINEAR: "bilinear",
                  transforms.InterpolationMode.BICUBIC: "bicubic"}
# Solarisation as the first uint8 level that is inverted (PIL's threshold 128).
PIL_SOLARIZE_LEVEL = 128


def describe_torchvision(pipeline) -> dict:
  """The parameters of one view's torchvision pipeline, as plain data."""
  out: dict = {}

  def walk(t, p):
    if isinstance(t, transforms.Compose):
      for u in t.transforms:
        walk(u, p)
    elif isinstance(t, transforms.RandomApply):
      for u in t.transforms:
        walk(u, p * t.p)
    elif isinstance(t, transforms.RandomResizedCrop):
      assert t.size[0] == t.size[1]
      out["crop"] = {"size": t.size[0], "scale": tuple(t.scale), "ratio": tuple(t.ratio),
                     "interpolation": _INTERPOLATION[t.interpolation]}
    elif isinstance(t, transforms.RandomHorizontalFlip):
      out["flip_prob"] = p * t.p
    elif isinstance(t, transforms.Resize):
      out["resize"] = {"size": t.size, "interpolation": _INTERPOLATION[t.interpolation]}
    elif isinstance(t, transforms.CenterCrop):
      out["center_crop"] = t.size[0]
    elif isinstance(t, transforms.ColorJitter):
      out["color_jitter"] = {"p": p, **{name: None if getattr(t, name) is None
                                        else tuple(getattr(t, name))
                                        for name in ("brightness", "contrast", "saturation",
                                                     "hue")}}
    elif isinstance(t, transforms.RandomGrayscale):
      out["grayscale"] = p * t.p
    elif isinstance(t, MocoGaussianBlur):
      out["blur"] = {"p": p, "radius": tuple(t.sigma)}
    elif isinstance(t, (DinoGaussianBlur, MsnGaussianBlur)):
      out["blur"] = {"p": p * t.prob, "radius": (t.radius_min, t.radius_max)}
    elif isinstance(t, DinoSolarization):
      out["solarize"] = {"p": p * t.p, "level": PIL_SOLARIZE_LEVEL}
    elif isinstance(t, transforms.Normalize):
      out["normalize"] = {"mean": tuple(t.mean), "std": tuple(t.std)}
    elif not isinstance(t, transforms.ToTensor):
      raise AssertionError(f"unexpected transform {t!r}")

  walk(pipeline, 1.0)
  return out


def describe_ours(view: presets.ViewSpec) -> dict:
  """The same description of one of our views."""
  out: dict = {}
  g, ph = view.geometry, view.photometric
  if isinstance(g, host_ops.CropSpec):
    out["crop"] = {"size": g.size, "scale": g.scale, "ratio": g.ratio,
                   "interpolation": g.interpolation}
    out["flip_prob"] = g.flip_prob
  else:
    out["resize"] = {"size": round(g.size / g.crop_fraction), "interpolation": g.interpolation}
    out["center_crop"] = g.size
  if ph.color_jitter is not None:
    out["color_jitter"] = {"p": ph.color_jitter.p, **ph.color_jitter.ranges}
  if ph.grayscale is not None:
    out["grayscale"] = ph.grayscale.p
  if ph.gaussian_blur is not None:
    assert ph.gaussian_blur.method == "pil"  # PIL's GaussianBlur(radius), radius = sigma
    out["blur"] = {"p": ph.gaussian_blur.p, "radius": ph.gaussian_blur.sigma}
  if ph.solarize is not None:
    out["solarize"] = {"p": ph.solarize.p,
                       "level": math.ceil(ph.solarize.threshold * 255)}
  if ph.normalize is not None:
    out["normalize"] = {"mean": ph.normalize.mean, "std": ph.normalize.std}
  return out


def assert_same_description(ours: dict, theirs: dict) -> None:
  assert ours.keys() == theirs.keys()
  flat_ours, flat_theirs = (jax.tree_util.tree_flatten_with_path(d)[0] for d in (ours, theirs))
  assert [k for k, _ in flat_ours] == [k for k, _ in flat_theirs]
  for (path, a), (_, b) in zip(flat_ours, flat_theirs):
    if isinstance(a, str) or isinstance(b, str):
      assert a == b, path
    else:
      assert a == pytest.approx(b, abs=1e-12), jax.tree_util.keystr(path)


REFERENCE_CASES = [
    ("mocov2", {}, lambda: [moco_v2_aug_plus()] * 2),
    ("mocov2", {"scale": (0.08, 1.0)}, None),  # overrides change only what they name
    ("dino", {}, lambda: DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 8).views()),
    ("dino", {"num_local_crops": 6, "global_scale": (0.25, 1.0), "local_scale": (0.05, 0.25)},
     lambda: DataAugmentationDINO((0.25, 1.), (0.05, 0.25), 6).views()),
    ("dino", {"num_local_crops": 0}, lambda: DataAugmentationDINO((0.4, 1.), (0.05, 0.4),
                                                                  0).views()),
    ("rob_dino", {}, rob_dino_vissl),
    ("msn", {}, msn_make_transforms),
    ("rob_swav", {}, rob_swav_vissl),
    ("rob_swav", {"num_local_crops": 6}, lambda: rob_swav_vissl(6)),
    ("msn", {"color_jitter_strength": 0.5},
     lambda: msn_make_transforms(color_jitter=0.5)),
    ("eval", {}, lambda: [eval_transform()]),
    ("eval", {"interpolation": "bicubic"},
     lambda: [eval_transform(transforms.InterpolationMode.BICUBIC)]),
]


@pytest.mark.parametrize("name,overrides,reference", REFERENCE_CASES,
                         ids=[f"{n}-{'-'.join(o) or 'default'}" for n, o, _ in REFERENCE_CASES])
def test_preset_parameters_equal_the_reference_pipelines(name, overrides, reference):
  augmentation = presets.Augmentation.from_config(presets.preset(name, **overrides))
  if reference is None:  # mocov2 with another crop scale
    assert augmentation.views[0].geometry.scale == (0.08, 1.0)
    default = presets.Augmentation.from_preset(name)
    assert augmentation.views[0].photometric == default.views[0].photometric
    return
  views = reference()
  assert augmentation.num_views == len(views)
  for ours, theirs in zip(augmentation.views, views):
    assert_same_description(describe_ours(ours), describe_torchvision(theirs))


def test_reference_pipelines_run_and_give_the_sizes_of_our_views():
  """The reference objects above are working pipelines, not just parameter holders.

  MSN's is left out: its blur passes a 1-element tensor as PIL's radius, which Pillow 13
  rejects (older Pillows took it as a number).
  """
  image = Image.fromarray(sklearn.datasets.load_sample_images().images[0][:200, :260])
  random.seed(0)
  torch.manual_seed(0)
  for name, reference in [("mocov2", lambda: [moco_v2_aug_plus()] * 2),
                          ("dino", lambda: DataAugmentationDINO((0.4, 1.), (0.05, 0.4),
                                                                8).views()),
                          ("eval", lambda: [eval_transform()])]:
    shapes = [tuple(t(image).shape) for t in reference()]
    sizes = presets.Augmentation.from_preset(name).sizes
    assert shapes == [(3, s, s) for s in sizes]


def test_solarize_threshold_is_pils_128():
  levels = np.arange(256)
  threshold = presets.preset("dino").views[1].photometric.solarize.threshold
  np.testing.assert_array_equal(levels / 255.0 >= threshold, levels >= PIL_SOLARIZE_LEVEL)


def test_lowres_presets():
  train = presets.Augmentation.from_preset("mocov2_lowres")
  moco = presets.Augmentation.from_preset("mocov2")
  assert train.sizes == (32, 32)
  for ours, full in zip(train.views, moco.views):
    assert ours.geometry == dataclasses.replace(full.geometry, size=32)
    assert ours.photometric == dataclasses.replace(full.photometric, gaussian_blur=None)
  evaluation = presets.Augmentation.from_preset("eval_lowres")
  assert evaluation.views[0].geometry == presets.EvalSpec(32, 1.0, "bilinear")
  assert evaluation.views[0].photometric == device_ops.PhotometricSpec(
      normalize=device_ops.Normalize())


# --- Presets are plain, complete, editable data -----------------------------------------------

def _field_names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def test_the_schema_covers_every_parameter_of_the_ops():
  """A parameter added to CropSpec or a photometric op must be added to the schema too."""
  assert set(presets._CROP_FIELDS) == _field_names(host_ops.CropSpec)
  assert set(presets._EVAL_FIELDS) == _field_names(presets.EvalSpec)
  assert set(presets._PHOTOMETRIC_FIELDS) == set(device_ops.OPS)
  for name, fields in presets._PHOTOMETRIC_FIELDS.items():
    assert set(fields) == _field_names(device_ops._OP_TYPES[name]), name


@pytest.mark.parametrize("name", presets.PRESETS)
def test_every_preset_is_spelled_out_in_full_and_validates(name):
  config = presets.preset(name)
  assert isinstance(config, ml_collections.ConfigDict)
  assert list(config.keys()) == ["views"]
  for view in config.views:
    kind = "crop" if "crop" in view else "eval"
    assert set(view.keys()) == {kind, "photometric"}
    fields = presets._CROP_FIELDS if kind == "crop" else presets._EVAL_FIELDS
    assert set(view[kind].keys()) == set(fields)
    assert set(view.photometric.keys()) == set(device_ops.OPS)
    for op, params in view.photometric.items():
      if params is not None:
        assert set(params.keys()) == set(presets._PHOTOMETRIC_FIELDS[op]), op
  augmentation = presets.Augmentation.from_config(config)
  hash(augmentation)  # a static jit argument
  # JSON (how a run records its config) round-trips to the same augmentation.
  assert presets.Augmentation.from_config(json.loads(config.to_json())) == augmentation
  # Every call builds a fresh config: editing one does not edit the next.
  config.views[0].photometric.normalize.mean = (0.5, 0.5, 0.5)
  assert presets.preset(name).views[0].photometric.normalize.mean == presets.IMAGENET_MEAN


def test_a_config_edits_one_view_at_a_time():
  config = presets.preset("dino", num_local_crops=3)
  config.lock()
  config.views[1].photometric.solarize.p = 0.3
  config.views[0].photometric.gaussian_blur = None
  config.views[0].photometric.solarize = {"p": 0.1, "threshold": 0.6}
  config.views[4].crop.scale = (0.05, 0.25)
  jitter = config.views[3].photometric.color_jitter
  with pytest.raises(TypeError):  # ConfigDict keeps a field's type ...
    jitter.saturation = (0.5, 1.5)
  with jitter.ignore_type():      # ... unless told otherwise
    jitter.saturation = (0.5, 1.5)
  views = presets.Augmentation.from_config(config).views
  assert views[1].photometric.solarize.p == 0.3
  assert views[0].photometric.gaussian_blur is None
  assert views[0].photometric.solarize == device_ops.Solarize(0.1, 0.6)
  assert views[4].geometry.scale == (0.05, 0.25) and views[3].geometry.scale == (0.05, 0.4)
  assert views[3].photometric.color_jitter.saturation == (0.5, 1.5)
  assert views[2].photometric.color_jitter.saturation == (0.8, 1.2)


# --- Mistakes -------------------------------------------------------------------------------

def _node(config, path: str):
  """The parent of the last key of `path` ("views[1].photometric.solarize.p"), and that key."""
  *parents, last = path.split(".")
  node = config
  for part in parents:
    node = node["views"][int(part[6:-1])] if part.startswith("views[") else node[part]
  return node, last


def _set(path: str, value):
  def mutate(config):
    node, key = _node(config, path)
    node[key] = value
  return mutate


def _delete(path: str):
  def mutate(config):
    node, key = _node(config, path)
    del node[key]
  return mutate


CONFIG_MISTAKES = [
    (_set("views[1].photometric.solarize.p", 1.5), r"^views\[1\]\.photometric\.solarize\.p: "),
    (_set("views[0].crop.sise", 32), r"^views\[0\]\.crop\.sise: unknown key"),
    (_set("views[2].crop.scale", (0.5, 0.2)), r"^views\[2\]\.crop\.scale: .*0 < min <= max"),
    (_set("views[0].crop.size", 0), r"^views\[0\]\.crop\.size: must be a positive int"),
    (_set("views[0].crop.size", 32.0), r"^views\[0\]\.crop\.size: must be a positive int"),
    (_set("views[0].crop.interpolation", "nearest"), r"^views\[0\]\.crop\.interpolation: "),
    (_set("views[1].photometric.colour_jitter", {"p": 0.8}),
     r"^views\[1\]\.photometric\.colour_jitter: unknown key"),
    (_set("views[2].photometric.color_jitter.hue", 0.6),
     r"^views\[2\]\.photometric\.color_jitter\.hue: .*within"),
    (_set("views[0].photometric.color_jitter.brightness", "strong"),
     r"^views\[0\]\.photometric\.color_jitter\.brightness: "),
    (_set("views[0].photometric.gaussian_blur.method", "box"),
     r"^views\[0\]\.photometric\.gaussian_blur\.method: must be one of"),
    (_set("views[0].photometric.gaussian_blur.sigma", (0.0, 2.0)),
     r"^views\[0\]\.photometric\.gaussian_blur\.sigma: "),
    (_set("views[0].photometric.gaussian_blur.kernel_size", 13),
     r"^views\[0\]\.photometric: .*kernel_size only applies"),
    (_set("views[1].photometric.normalize.std", (0.2, 0.0, 0.2)),
     r"^views\[1\]\.photometric\.normalize\.std: .*positive"),
    (_set("views[1].photometric.normalize.mean", (0.5, 0.5)),
     r"^views\[1\]\.photometric\.normalize\.mean: must be 3"),
    (_set("views[0].photometric.grayscale.prob", 0.2),
     r"^views\[0\]\.photometric\.grayscale\.prob: unknown key"),
    (_set("views[0].eval", {"size": 32}), r"^views\[0\]: needs exactly one of 'crop'"),
    (_delete("views[0].crop"), r"^views\[0\]: needs exactly one"),
    (_delete("views[1].photometric"), r"^views\[1\]\.photometric: missing"),
    (_set("views[0].photometric", [0.2]), r"^views\[0\]\.photometric: expected a mapping"),
    (_set("views", []), r"^views: expected a non-empty list"),
    (_set("mixup", 0.2), r"^augmentation\.mixup: unknown key"),
]


@pytest.mark.parametrize("as_dict", [False, True], ids=["ConfigDict", "dict"])
@pytest.mark.parametrize("mutate,message", CONFIG_MISTAKES,
                         ids=[m for _, m in CONFIG_MISTAKES])
def test_config_mistakes_name_the_key(mutate, message, as_dict):
  config = presets.preset("dino", num_local_crops=2)
  if as_dict:  # e.g. a config read back from JSON
    config = json.loads(config.to_json())
  try:
    mutate(config)
  except TypeError as e:  # ConfigDict's own type check caught it first; it names the field
    assert not as_dict and "Could not override field" in str(e)
    return
  with pytest.raises(ValueError, match=message):
    presets.Augmentation.from_config(config)


def test_booleans_are_not_numbers_in_plain_data():
  # (A ConfigDict casts True to 1.0 in a float field before we see it.)
  config = json.loads(presets.preset("mocov2").to_json())
  config["views"][0]["crop"]["flip_prob"] = True
  with pytest.raises(ValueError, match=r"^views\[0\]\.crop\.flip_prob: must be a prob"):
    presets.Augmentation.from_config(config)


def test_eval_and_top_level_mistakes():
  config = presets.preset("eval")
  config.views[0].eval.crop_fraction = 0.0
  with pytest.raises(ValueError, match=r"^views\[0\]\.eval\.crop_fraction: must lie in"):
    presets.Augmentation.from_config(config)
  with pytest.raises(ValueError, match=r"^views\[0\]\.eval\.size: missing"):
    presets.Augmentation.from_config({"views": [{"eval": {}, "photometric": {}}]})
  with pytest.raises(ValueError, match=r"augmentation: expected a mapping"):
    presets.Augmentation.from_config([1, 2])
  with pytest.raises(ValueError, match=r"eval\.crop_fraction"):
    presets.EvalSpec(32, crop_fraction=1.5)


def test_preset_mistakes():
  with pytest.raises(ValueError, match="unknown augmentation preset 'moco'.*mocov2"):
    presets.preset("moco")
  with pytest.raises(ValueError, match=r"no parameter\(s\) \['local_crops'\].*num_local_crops"):
    presets.preset("dino", local_crops=6)
  with pytest.raises(ValueError, match="num_local_crops must be a non-negative int"):
    presets.preset("msn", num_local_crops=-1)
  with pytest.raises(ValueError, match="color_jitter_strength"):
    presets.preset("msn", color_jitter_strength=-1.0)
  assert presets.preset_parameters("dino")["num_local_crops"] == 8
  assert presets.preset_parameters("msn")["num_local_crops"] == 10


# --- Host views -----------------------------------------------------------------------------

# Small versions of every preset, for fast tests.
SMALL = {
    "mocov2": {"size": 32},
    "mocov2_lowres": {},
    "dino": {"global_size": 32, "local_size": 16, "num_local_crops": 2},
    "rob_dino": {"global_size": 32, "local_size": 16, "num_local_crops": 2},
    "msn": {"global_size": 32, "local_size": 16, "num_local_crops": 2},
    "rob_swav": {"global_size": 32, "local_size": 16, "num_local_crops": 2},
    "eval": {"size": 32},
    "eval_lowres": {},
}
assert set(SMALL) == set(presets.PRESETS)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
  """A 300 x 400 crop of scikit-learn's china.jpg (CC BY 2.0)."""
  return sklearn.datasets.load_sample_images().images[0][50:350, 100:500]


@pytest.fixture(scope="module")
def fashion_images(fashion_mnist_dir) -> np.ndarray:
  """The first 8 Fashion-MNIST test images, uint8 [8, 28, 28, 1]."""
  with gzip.open(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz") as f:
    data = f.read(16 + 8 * 28 * 28)
  return np.frombuffer(data, np.uint8, offset=16).reshape(8, 28, 28, 1)


def _jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


@pytest.mark.parametrize("name", presets.PRESETS)
def test_host_views_of_real_images_at_the_presets_sizes(name, photo, fashion_images):
  augmentation = presets.Augmentation.from_preset(name)
  seed = tf.constant([0, 7], tf.int32)
  expected = [(s, s, 3) for s in augmentation.sizes]
  for image in (photo, _jpeg(photo), fashion_images[0]):  # decoded, encoded, grey 28 px
    views = augmentation.host_views(tf.constant(image), seed)
    assert [tuple(v.shape) for v in views] == expected
    assert all(v.dtype == tf.uint8 for v in views)


def test_host_views_in_tf_data_with_crop_and_eval_views(photo):
  """A mixed config: crop view v is multi_crop's view v, the eval view is eval_view's."""
  config = presets.preset("dino", global_size=32, local_size=16, num_local_crops=1)
  config.views.insert(1, presets.preset("eval", size=24).views[0])
  augmentation = presets.Augmentation.from_config(config)
  crops = [v.geometry for v in augmentation.views if isinstance(v.geometry, host_ops.CropSpec)]
  seeds = np.array([[0, 0], [0, 1]], np.int32)

  def both(seed):
    ours = augmentation.host_views(tf.constant(photo), seed)
    # multi_crop draws view v from fold_in(seed, v); view 1 (the eval view) is a placeholder.
    theirs = host_ops.multi_crop(tf.constant(photo), seed,
                                 [crops[0], crops[0], crops[1], crops[2]])
    return ours, theirs, host_ops.eval_view(tf.constant(photo), 24)

  ds = tf.data.Dataset.from_tensor_slices(seeds).map(both)
  for ours, theirs, evaluated in ds.as_numpy_iterator():
    assert [v.shape for v in ours] == [(32, 32, 3), (24, 24, 3), (32, 32, 3), (16, 16, 3)]
    for v in (0, 2, 3):
      np.testing.assert_array_equal(ours[v], theirs[v])
    np.testing.assert_array_equal(ours[1], evaluated)


# --- Device views ---------------------------------------------------------------------------

def _host_batch(augmentation: presets.Augmentation, images: np.ndarray,
                run_seed: int = 0) -> tuple[np.ndarray, ...]:
  """Every view of every image through a tf.data pipeline, seeds (run seed, example index)."""
  seeds = np.stack([np.full(len(images), run_seed), np.arange(len(images))], 1).astype(np.int32)
  ds = tf.data.Dataset.from_tensor_slices((images, seeds)).map(augmentation.host_views)
  return ds.batch(len(images)).get_single_element()


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8
  return jax.make_mesh((8,), ("data",))


# One compiled program per (augmentation, shapes, shardings), shared by the tests.
@functools.partial(jax.jit, static_argnums=0)
def _device_views(augmentation, key, views, indices):
  return augmentation.device_views(key, views, indices)


def _sharded(mesh, arrays):
  return jax.device_put(arrays, NamedSharding(mesh, P("data")))


# Every kind of view and op, at one compilation each (~2-5 s on 2 CPU cores): mocov2 is
# mocov2_lowres plus the blur that dino has, rob_dino is dino with other numbers, eval is
# eval_lowres at another size.
DEVICE_PRESETS = ("mocov2_lowres", "dino", "msn", "eval_lowres")


@pytest.mark.parametrize("name", DEVICE_PRESETS)
def test_device_views_under_jit_on_a_sharded_batch(name, fashion_images, mesh):
  """Fashion-MNIST through the host views, then the jitted device views over 8 devices."""
  augmentation = presets.Augmentation.from_preset(name, **SMALL[name])
  host = _sharded(mesh, [np.asarray(v) for v in _host_batch(augmentation, fashion_images)])
  indices = _sharded(mesh, np.arange(1000, 1008, dtype=np.int32))
  key = jax.random.fold_in(jax.random.key(0), 5)  # (run seed, step)
  out = _device_views(augmentation, key, host, indices)
  assert len(out) == augmentation.num_views
  for view, spec in zip(out, augmentation.views):
    assert view.shape == (8, spec.size, spec.size, 3) and view.dtype == jnp.float32
    assert view.sharding.spec[0] == "data"
    assert bool(jnp.all(jnp.isfinite(view)))
    # Normalised with ImageNet's mean and std: [0, 1] maps into [-2.12, 2.64].
    assert -2.2 < float(view.min()) and float(view.max()) < 2.7
  if name.startswith("eval"):  # no random op: the normalised host view, exactly
    expected = (np.asarray(host[0]) / np.float32(255) - np.float32(presets.IMAGENET_MEAN)) / (
        np.float32(presets.IMAGENET_STD))
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=FLOAT_ATOL)


def test_device_draws_follow_the_view_and_the_example_indices(fashion_images, mesh):
  """View v of example indices[b] draws from fold_in(fold_in(key, v), indices[b]): a batch
  permuted along with its indices gives the permuted views; another view, other indices or
  another step give other views."""
  augmentation = presets.Augmentation.from_preset("dino", **SMALL["dino"])
  host = [np.asarray(v) for v in _host_batch(augmentation, fashion_images)]
  indices = np.arange(40, 48, dtype=np.int32)
  perm = np.random.default_rng(0).permutation(8)
  key = jax.random.fold_in(jax.random.key(0), 3)

  def run(views, idx, step_key=key):
    return _device_views(augmentation, step_key, _sharded(mesh, views), _sharded(mesh, idx))

  out = run(host, indices)
  # View 1 (DINO's second global view: blur 0.1, solarise 0.2) is apply_photometric's with
  # the view's key and the indices.
  expected = jax.jit(device_ops.apply_photometric, static_argnums=2)(
      jax.random.fold_in(key, 1), host[1], augmentation.views[1].photometric, indices)
  np.testing.assert_allclose(out[1], expected, rtol=0, atol=FLOAT_ATOL)
  permuted = run([v[perm] for v in host], indices[perm])
  for a, b in zip(out, permuted):
    np.testing.assert_allclose(b, np.asarray(a)[perm], rtol=0, atol=FLOAT_ATOL)
  other_indices = run(host, indices + 8)
  other_step = run(host, indices, jax.random.fold_in(jax.random.key(0), 4))
  for v in range(augmentation.num_views):
    assert float(jnp.max(jnp.abs(out[v] - other_indices[v]))) > 0.1
    assert float(jnp.max(jnp.abs(out[v] - other_step[v]))) > 0.1
  # The two local views, given the same crops, share a spec but not their draws.
  same_crops = run([host[0], host[1], host[2], host[2]], indices)
  assert float(jnp.max(jnp.abs(same_crops[2] - same_crops[3]))) > 0.1


def test_device_views_reject_mismatched_inputs():
  augmentation = presets.Augmentation.from_preset("mocov2_lowres")
  key = jax.random.key(0)
  views = [jnp.zeros((2, 32, 32, 3), jnp.uint8)] * 2
  with pytest.raises(ValueError, match="expected 2 views, got 1"):
    augmentation.device_views(key, views[:1])
  with pytest.raises(ValueError, match=r"views\[1\]: expected shape \[B, 32, 32, 3\]"):
    augmentation.device_views(key, [views[0], jnp.zeros((2, 16, 16, 3), jnp.uint8)])
  with pytest.raises(ValueError, match="indices"):
    augmentation.device_views(key, views, jnp.arange(3))

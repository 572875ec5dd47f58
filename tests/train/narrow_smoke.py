"""A shipped config's `:smoke` run with smaller networks, for the end-to-end tests.

`--config tests/train/narrow_smoke.py:NAME` is `configs/NAME.py:smoke` (`NAME/VARIANT`: another
variant, e.g. `resnet18/reference_smoke`) with the student and the random teacher cut down
where their size does not matter to the wiring the test checks: EfficientNet at a quarter of
B0's width and depth (one block a stage: every block kind still runs), MobileNetV3-Small
instead of Large (the same block kinds), ResNet students and the ResNet-18 teacher of the
MoCo-style runs at 1/8 of their width. Compiling the full EfficientNet-B0 step was the
slowest part of the suite; the shipped networks themselves are checked against torchvision
and timm in tests/models.
"""

from __future__ import annotations

import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
WIDTH = 8
_NARROW_TEACHER = dict(
    architecture="resnet18", backbone_kwargs={"low_res_stem": True, "width": WIDTH},
    head_kind="mlp", head_kwargs={"dims": [8 * WIDTH, 8 * WIDTH, 128]})


def _shipped(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(name: str):
  name, _, variant = name.partition("/")
  config = _shipped(name, variant or "smoke")
  with config.unlocked():
    student = config.student
    if student.name.startswith("efficientnet"):
      student.kwargs.width_mult = 0.25
      student.kwargs.depth_mult = 0.25
    elif student.name == "mobilenet_v3_large":
      student.name = "mobilenet_v3_small"
    elif student.name.startswith("resnet"):
      student.kwargs.width = WIDTH
    random_spec = config.teacher.get("random_spec")
    if random_spec and random_spec.get("architecture") == "resnet18":
      config.teacher.random_spec = _NARROW_TEACHER
  config.lock()
  return config

"""A shipped config's `:smoke` run with smaller networks, for the end-to-end tests.

`--config tests/train/narrow_smoke.py:NAME` is `configs/NAME.py:smoke` with the student and the
random teacher cut down where their size does not matter to the wiring the test checks:
EfficientNet at a quarter of B0's width and depth (one block a stage: every block kind still
runs), MobileNetV3-Small instead of Large (the same block kinds), and the ResNet-18 teacher of
the MoCo-style runs at 1/8 of its width. Compiling the full EfficientNet-B0 step was the
slowest part of the suite; the shipped networks themselves are checked against torchvision
and timm in tests/models.
"""

from __future__ import annotations

import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
TEACHER_WIDTH = 8
_NARROW_TEACHER = dict(
    architecture="resnet18", backbone_kwargs={"low_res_stem": True, "width": TEACHER_WIDTH},
    head_kind="mlp", head_kwargs={"dims": [8 * TEACHER_WIDTH, 8 * TEACHER_WIDTH, 128]})


def _shipped(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("smoke")


def get_config(name: str):
  config = _shipped(name)
  with config.unlocked():
    student = config.student
    if student.name.startswith("efficientnet"):
      student.kwargs.width_mult = 0.25
      student.kwargs.depth_mult = 0.25
    elif student.name == "mobilenet_v3_large":
      student.name = "mobilenet_v3_small"
    random_spec = config.teacher.get("random_spec")
    if random_spec and random_spec.get("architecture") == "resnet18":
      config.teacher.random_spec = _NARROW_TEACHER
  config.lock()
  return config

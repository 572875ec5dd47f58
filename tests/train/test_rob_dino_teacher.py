"""RoB-DINO trains from a teacher that went through `convert --format dino`.

A DINO training checkpoint (the `teacher` entry: timm's ViT as `backbone.*`, DINO's DINOHead as
`head.*`) of the size of the recipe's :smoke teacher (ViT-Tiny at 32 px, head 192 -> 256 -> 64
-> 256), random weights, converted through the CLI; configs/rob_dino_vit_tiny.py:smoke then
trains two steps with it. The conversion's parity with torch: tests/convert/.
"""

from __future__ import annotations

import pathlib

import pytest
import timm
import torch

from retro_jax import checkpoint
from retro_jax import main as main_lib
from retro_jax.convert import cli as convert_cli
from torch_reference import DinoHead
from torch_reference import randomise

CONFIG = pathlib.Path(__file__).parents[2] / "configs" / "rob_dino_vit_tiny.py"


@pytest.mark.slow  # the :smoke run (~the CPU of the config's random-teacher smoke run it replaces)
def test_rob_dino_smoke_trains_from_a_converted_dino_teacher(tmp_path, fashion_mnist_tfds,
                                                             capsys):
  torch.manual_seed(0)
  backbone = randomise(timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                         num_classes=0, img_size=32), seed=1)
  head = DinoHead(192, 256, hidden_dim=256, bottleneck_dim=64)
  state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
           **{f"head.{k}": v for k, v in head.state_dict().items()}}
  source = tmp_path / "dino_vit_tiny.pth"
  torch.save({"teacher": state, "epoch": 100}, source)
  teacher = tmp_path / "teacher"
  assert convert_cli.main(["--src", str(source), "--format", "dino", "--arch",
                           "vit_tiny_patch16", "--out", str(teacher)]) == 0
  description = checkpoint.read_description(teacher)
  assert description["encoder"]["backbone_kwargs"] == {"img_size": 32}

  workdir = tmp_path / "run"
  assert main_lib.main([
      "--config", f"{CONFIG}:smoke", "--workdir", str(workdir),
      f"--config.data.data_dir={fashion_mnist_tfds}", "--config.total_steps=2",
      f"--config.teacher.checkpoint={teacher}", "--config.monitor.every_steps=0"]) == 0
  captured = capsys.readouterr()
  assert "step 2/2" in captured.out and "RANDOMLY INITIALISED" not in captured.err
  record = checkpoint.TrainCheckpoints(workdir, every_steps=2).read_record(2)
  assert record["teacher"]["checkpoint"] == str(teacher.absolute())
  assert record["teacher"]["sha256"] == description["source"]["sha256"]
  _, student = checkpoint.load_model(workdir / "student")
  assert student["source"]["method"] == "rob_dino"

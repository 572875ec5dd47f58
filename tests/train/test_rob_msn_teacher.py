"""RoB-MSN trains from an MSN ViT-L teacher that went through `convert --format msn`.

The recipe's teacher (configs/rob_msn_vit_small.py) is MSN's ViT-L/16. Here a random one in
MSN's file layout (tests/msn_reference.py: deit.py's ViT with `init_model`'s BN head, 1,024
prototypes of width 256, every norm and statistic randomised) has ViT-L's width, heads and
MLP but 2 of its 24 blocks, registered for this test only as `vit_large_patch16_2blocks`: the
full depth would be 300 M parameters (1.2 GB, and a copy per simulated device) for the same
wiring. It is converted through the CLI and the recipe's :smoke run trains two steps with it.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import msn_reference
from retro_jax import checkpoint
from retro_jax import main as main_lib
from retro_jax.convert import cli as convert_cli
from retro_jax.models import registry
from retro_jax.models import vit
from torch_reference import RTOL
from torch_reference import relative_error

CONFIG = pathlib.Path(__file__).parents[2] / "configs" / "rob_msn_vit_small.py"
SHALLOW_VIT_L = "vit_large_patch16_2blocks"


def _shallow_vit_large(*, rngs, **kwargs):
  return vit.VisionTransformer(**{**vit.ARCHITECTURES["vit_large_patch16"], "depth": 2},
                               rngs=rngs, **kwargs)


@pytest.fixture
def msn_vit_large_file(tmp_path, monkeypatch):
  registry.backbone_names()  # every family registered before the test-only name is added
  monkeypatch.setitem(registry._BACKBONES, SHALLOW_VIT_L, _shallow_vit_large)  # pylint: disable=protected-access
  torch.manual_seed(0)
  model = msn_reference.randomise(msn_reference.deit("large", depth=2), seed=1)
  protos = msn_reference.prototypes(1024, 256, torch.Generator().manual_seed(2))
  path = tmp_path / "vitl16_600ep.pth.tar"
  torch.save(msn_reference.msn_checkpoint(model, protos), path)
  return model, protos, path


@pytest.mark.slow  # the :smoke run: ~75 s of CPU time, as the random-teacher smoke run of the config
def test_rob_msn_smoke_trains_from_a_converted_msn_teacher(msn_vit_large_file, tmp_path,
                                                           fashion_mnist_tfds, capsys):
  model, protos, path = msn_vit_large_file
  teacher_dir = tmp_path / "teachers" / "msn_vitl16"
  assert convert_cli.main(["--src", str(path), "--format", "msn", "--arch", SHALLOW_VIT_L,
                           "--out", str(teacher_dir)]) == 0
  teacher, description = checkpoint.load_model(teacher_dir)
  assert description["head"]["num_prototypes"] == 1024
  assert teacher.backbone.feature_width == 1024 and len(teacher.backbone.blocks) == 2
  # The converted head gives MSN's targets (the backbone's parity: test_convert_msn.py).
  teacher.eval()
  features = np.random.default_rng(3).normal(size=(4, 1024)).astype(np.float32)
  with torch.no_grad():
    expected = msn_reference.msn_targets(model.fc(torch.from_numpy(features)), protos).numpy()
  assert relative_error(np.asarray(teacher.head(features)), expected) <= RTOL

  workdir = tmp_path / "run"
  assert main_lib.main([
      "--config", f"{CONFIG}:smoke", "--workdir", str(workdir),
      f"--config.data.data_dir={fashion_mnist_tfds}", "--config.total_steps=2",
      f"--config.teacher.checkpoint={teacher_dir}", "--config.objective.num_prototypes=1024",
      "--config.monitor.every_steps=0"]) == 0
  captured = capsys.readouterr()
  assert "step 2/2" in captured.out and "RANDOMLY INITIALISED" not in captured.err
  record = checkpoint.TrainCheckpoints(workdir, every_steps=2).read_record(2)
  assert record["teacher"]["architecture"] == SHALLOW_VIT_L
  assert record["teacher"]["checkpoint"] == str(teacher_dir.absolute())
  assert record["teacher"]["sha256"] == description["source"]["sha256"]
  student, student_description = checkpoint.load_model(workdir / "student")
  assert student_description["source"]["method"] == "rob_msn"
  # The student's head: VISSL's mlp onto the teacher's 1,024 prototypes.
  assert student_description["encoder"]["head_kwargs"]["dims"][-1] == 1024
  assert student.backbone.feature_width == 192

"""`convert --format ibot`: a teacher written from iBOT's own code (tests/ibot_reference.py) in
iBOT's full-checkpoint layout, converted through the CLI, its CLS and patch outputs against
the torch forward; wrong files refused in one line naming the key, before any model is built."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cli_runner import run_convert
import ibot_reference
from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import random_images
from torch_reference import relative_error

# iBOT's checkpoints hold weight_g/weight_v: the deprecated weight_norm is the faithful layout.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def ibot_teacher(tmp_path_factory):
  """A ViT-Tiny/16 iBOT teacher (224 px, the shared head with 8,192 prototypes), converted."""
  torch.manual_seed(0)
  network = ibot_reference.randomise(ibot_reference.IBOTNetwork(), seed=0)
  folder = tmp_path_factory.mktemp("ibot")
  ibot_reference.save_ibot_checkpoint(folder / "checkpoint.pth", network)
  out = folder / "converted"
  assert run_convert("--src", folder / "checkpoint.pth", "--format", "ibot", "--arch",
                     "vit_tiny_patch16", "--out", out) == 0
  return network, folder / "checkpoint.pth", out


def class_and_patch_logits(model, images):
  """The converted teacher as RoB-iBOT runs it: its head on the class and the patch tokens."""
  tokens = model.backbone(images).feature_map
  return model.head(tokens[:, 0]), model.head(tokens[:, 1:])


def test_cls_and_patch_outputs_match_ibot(ibot_teacher):
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top

  network, _, out = ibot_teacher
  model, description = checkpoint.load_model(out)
  head = description["head"]
  assert (head["kind"], head["out_features"], head["in_features"]) == ("dino", 8192, 192)
  ignored = description["ignored_entries"]
  assert {"student", "ibot_loss", "args", "teacher.head.last_layer2.weight_v"} <= set(ignored)
  images = random_images(224, seed=4)
  with torch.no_grad():
    cls, patches = network(nchw(images))
  got_cls, got_patches = nnx.jit(class_and_patch_logits)(model, jnp.asarray(images))
  assert got_patches.shape == (2, 196, 8192)
  assert relative_error(got_cls, cls.numpy()) <= RTOL
  assert relative_error(got_patches, patches.numpy()) <= RTOL


def refusal(tmp_path, capsys, state) -> str:
  src = tmp_path / "bad.pth"
  torch.save(state, src)
  assert run_convert("--src", src, "--format", "ibot", "--arch", "vit_tiny_patch16", "--out",
                     tmp_path / "out") == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "Traceback" not in err
  assert not (tmp_path / "out").exists()
  return err


def test_wrong_files_are_refused_naming_the_key(ibot_teacher, tmp_path, capsys):
  network, path, _ = ibot_teacher
  teacher = torch.load(path, weights_only=False)["teacher"]
  backbone_only = {k.removeprefix("backbone."): v for k, v in teacher.items()
                   if k.startswith("backbone.")}
  assert "no 'teacher' entry" in refusal(tmp_path, capsys, {"state_dict": backbone_only})
  separate = dict(teacher, **{"head.last_layer2.weight_v": torch.randn_like(
      network.head.last_layer.weight_v)})
  assert "'head.last_layer2.weight_v' differs" in refusal(tmp_path, capsys,
                                                            {"teacher": separate})
  no_head = {k: v for k, v in teacher.items() if k.startswith("backbone.")}
  assert "no 'head.*' entries" in refusal(tmp_path, capsys, {"teacher": no_head})
  src = tmp_path / "resnet.pth"
  torch.save({"teacher": teacher}, src)
  assert run_convert("--src", src, "--format", "ibot", "--arch", "resnet50", "--out",
                     tmp_path / "out") == 1
  assert "is not one (e.g. vit_base_patch16)" in capsys.readouterr().err


def test_a_missing_head_weight_is_named(ibot_teacher, tmp_path, capsys):
  _, path, _ = ibot_teacher
  teacher = torch.load(path, weights_only=False)["teacher"]
  teacher.pop("head.mlp.2.bias")
  src = tmp_path / "bad.pth"
  torch.save({"teacher": teacher}, src)
  assert run_convert("--src", src, "--format", "ibot", "--arch", "vit_tiny_patch16", "--out",
                     tmp_path / "out") == 1
  err = capsys.readouterr().err
  assert "mlp.2.bias" in err and "missing" in err and not (tmp_path / "out").exists()
  np.testing.assert_array_equal(teacher["head.last_layer.weight_g"],
                                teacher["head.last_layer2.weight_g"])

"""Conversion of the other formats end to end: timm, torchvision CNNs and DINO checkpoints.

As in test_convert_cli.py: a file in the real format from a torch/timm model with random
weights (and random BN statistics), `convert`, `embed`, and the torch forward as reference.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch
import torchvision

from cli_runner import run_convert
from cli_runner import run_embed
from torch_reference import DinoHead
from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import random_images
from torch_reference import randomise
from torch_reference import relative_error

# DINO's checkpoints hold weight_g/weight_v: the deprecated weight_norm is the faithful layout.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


def convert_and_embed(tmp_path, state, fmt, arch, images, output="features", extra=()):
  src = tmp_path / "src.pth"
  torch.save(state, src)
  out = tmp_path / "converted"
  assert run_convert("--src", src, "--format", fmt, "--arch", arch, "--out", out, *extra) == 0
  return run_embed(out, images, tmp_path, output)


@pytest.mark.parametrize("torch_name, arch, size", [
    ("efficientnet_b0", "efficientnet_b0", 224),
    ("mobilenet_v3_large", "mobilenet_v3_large", 64),
])
def test_torchvision_cnn_students(tmp_path, torch_name, arch, size):
  torch.manual_seed(0)
  model = randomise(getattr(torchvision.models, torch_name)(), seed=0)
  images = random_images(size)
  with torch.no_grad():
    expected = torch.flatten(model.avgpool(model.features(nchw(images))), 1).numpy()
  got = convert_and_embed(tmp_path, model.state_dict(), "torchvision", arch, images)
  assert relative_error(got, expected) <= RTOL


@pytest.mark.parametrize("timm_name, arch, size", [
    ("efficientnet_b0", "efficientnet_b0", 64),
    ("mobilenetv3_large_100", "mobilenet_v3_large", 64),
    ("vit_small_patch16_224", "vit_small_patch16", 224),
])
def test_timm_models(tmp_path, timm_name, arch, size):
  torch.manual_seed(0)
  model = randomise(timm.create_model(timm_name, pretrained=False), seed=0)
  images = random_images(size)
  with torch.no_grad():
    # The pooled feature before any classifier stage: timm's forward_head(pre_logits) for
    # a ViT (class token after the final norm); the global pool of forward_features for CNNs.
    tokens = model.forward_features(nchw(images))
    expected = (model.forward_head(tokens, pre_logits=True) if arch.startswith("vit") else
                tokens.mean(dim=(2, 3))).numpy()
  got = convert_and_embed(tmp_path, model.state_dict(), "timm", arch, images)
  assert relative_error(got, expected) <= RTOL


class DinoNetwork(torch.nn.Module):
  """DINO's MultiCropWrapper reduced to one crop: `backbone` and `head`."""

  def __init__(self, norm_last_layer):
    super().__init__()
    self.backbone = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    self.head = DinoHead(384, 1000, norm_last_layer=norm_last_layer)
    if not norm_last_layer:  # A trained gain, as in a checkpoint saved after training.
      with torch.no_grad():
        self.head.last_layer.weight_g.uniform_(0.5, 1.5)


@pytest.fixture(scope="module", params=[True, False], ids=["norm_last_layer", "learned_gain"])
def dino_checkpoint(request, tmp_path_factory):
  torch.manual_seed(1)
  teacher, student = DinoNetwork(request.param).eval(), DinoNetwork(request.param)
  args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=1000,
                            norm_last_layer=request.param, momentum_teacher=0.996)
  path = tmp_path_factory.mktemp("dino") / "checkpoint.pth"
  torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()},
              "teacher": teacher.state_dict(), "optimizer": {"state": {}, "param_groups": []},
              "epoch": 100, "args": args, "dino_loss": {"center": torch.zeros(1, 1000)}}, path)
  return teacher, path


def test_dino_full_checkpoint_teacher_and_head(dino_checkpoint, tmp_path):
  # Other input sizes interpolate the position embedding: tests/models/test_vit.py.
  size = 224
  teacher, path = dino_checkpoint
  out = tmp_path / "dino"
  assert run_convert("--src", path, "--format", "dino", "--arch", "vit_small_patch16",
                     "--out", out) == 0
  images = random_images(size, seed=size)
  with torch.no_grad():
    features = teacher.backbone.forward_head(
        teacher.backbone.forward_features(nchw(images)), pre_logits=True)
    embedding = teacher.head.mlp(features)
  got_features = run_embed(out, images, tmp_path, "features")
  got_embedding = run_embed(out, images, tmp_path, "embedding")
  assert got_features.shape == (2, 384) and got_embedding.shape == (2, 256)
  assert relative_error(got_features, features.numpy()) <= RTOL
  assert relative_error(got_embedding, embedding.numpy()) <= RTOL


def test_dino_head_prototypes_match(dino_checkpoint, tmp_path):
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top

  teacher, path = dino_checkpoint
  out = tmp_path / "dino"
  assert run_convert("--src", path, "--format", "dino", "--arch", "vit_small_patch16",
                     "--out", out) == 0
  model, description = checkpoint.load_model(out)
  assert description["head"]["kind"] == "dino" and description["head"]["out_features"] == 1000
  assert "student" in description["ignored_entries"]
  features = np.random.default_rng(3).normal(size=(4, 384)).astype(np.float32)
  with torch.no_grad():
    expected = teacher.head(torch.from_numpy(features)).numpy()
  assert relative_error(np.asarray(model.head(features)), expected) <= RTOL

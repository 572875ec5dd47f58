"""`python -m retro_jax.convert` and `python -m retro_jax.embed`, end to end, against torch.

Each case writes a checkpoint file in a real format from a torch model with random weights and
random batch-norm statistics, converts it, embeds random images with the converted model and
compares with the torch forward pass: ||flax - torch|| / ||torch|| <= 1e-5 in float32.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from retro_jax import embed
from retro_jax.convert import cli as convert_cli

from cli_runner import run_convert
from cli_runner import run_embed
from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import random_images
from torch_reference import randomise
from torch_reference import relative_error


class MocoQueryEncoder(torch.nn.Module):
  """MoCo-v2's encoder_q: a torchvision ResNet whose `fc` is the MLP head."""

  def __init__(self):
    super().__init__()
    torch.manual_seed(0)
    self.net = randomise(torchvision.models.resnet50(), seed=0)
    self.net.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(),
                                      torch.nn.Linear(2048, 128))

  def features(self, x):
    fc, self.net.fc = self.net.fc, torch.nn.Identity()
    try:
      return self.net(x)
    finally:
      self.net.fc = fc


@pytest.fixture(scope="module")
def moco(tmp_path_factory):
  """A MoCo-v2 training checkpoint in the exact key layout of the MoCo/DisCo releases."""
  encoder = MocoQueryEncoder().eval()
  state = {f"module.encoder_q.{k}": v for k, v in encoder.net.state_dict().items()}
  state.update({f"module.encoder_k.{k}": v.clone() for k, v in encoder.net.state_dict().items()})
  state["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 1024), dim=0)
  state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
  path = tmp_path_factory.mktemp("moco") / "checkpoint_0199.pth.tar"
  torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state,
              "optimizer": {"state": {}, "param_groups": []}}, path)
  out = path.parent / "converted"
  assert run_convert("--src", path, "--format", "moco", "--arch", "resnet50", "--out", out) == 0
  return encoder, path, out


@pytest.mark.parametrize("size", [224, 64])
def test_moco_resnet50_features_and_embedding_match_torch(moco, tmp_path, size):
  encoder, _, out = moco
  images = np.random.default_rng(size).normal(size=(3, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    x = nchw(images)
    expected_features = encoder.features(x).numpy()
    expected_embedding = encoder.net(x).numpy()
  features = run_embed(out, images, tmp_path, "features")
  embedding = run_embed(out, images, tmp_path, "embedding")
  assert features.shape == (3, 2048) and embedding.shape == (3, 128)
  assert relative_error(features, expected_features) <= RTOL
  assert relative_error(embedding, expected_embedding) <= RTOL


def test_moco_description_records_source_and_what_was_ignored(moco):
  _, path, out = moco
  description = json.loads((out / "model.json").read_text())
  assert description["encoder"]["architecture"] == "resnet50"
  assert description["feature_width"] == 2048
  assert description["head"] == {"kind": "mlp", "dims": [2048, 2048, 128]}
  assert description["source"]["format"] == "moco"
  assert description["source"]["sha256"] == convert_cli.sha256(path)
  ignored = description["ignored_entries"]
  assert "queue" in ignored and "queue_ptr" in ignored
  assert sum(k.startswith("encoder_k.") for k in ignored) == len(
      MocoQueryEncoder().net.state_dict())
  assert not any(k.startswith("encoder_q.") for k in ignored)


def test_uint8_images_are_normalised_with_the_model_statistics(moco, tmp_path):
  encoder, _, out = moco
  pixels = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
  mean, std = np.array(convert_cli.IMAGENET_MEAN), np.array(convert_cli.IMAGENET_STD)
  normalised = ((pixels / 255.0 - mean) / std).astype(np.float32)
  with torch.no_grad():
    expected = encoder.features(nchw(normalised)).numpy()
  assert relative_error(run_embed(out, pixels, tmp_path, "features"), expected) <= RTOL


# --- failures: a clear message and a non-zero exit, never a traceback, nothing written ----


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  torch.manual_seed(1)
  model = randomise(torchvision.models.resnet18(), seed=0)
  path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
  torch.save(model.state_dict(), path)
  return model, path


def test_torchvision_resnet18_features_match(resnet18_file, tmp_path):
  model, path = resnet18_file
  out = tmp_path / "r18"
  assert run_convert("--src", path, "--format", "torchvision", "--arch", "resnet18",
                     "--out", out) == 0
  images = random_images(64, seed=2)
  model.fc = torch.nn.Identity()
  with torch.no_grad():
    expected = model(nchw(images)).numpy()
  assert relative_error(run_embed(out, images, tmp_path, "features"), expected) <= RTOL
  description = json.loads((out / "model.json").read_text())
  assert description["head"] is None
  assert set(description["ignored_entries"]) == {"fc.weight", "fc.bias"}


def _expect_failure(capsys, args, *fragments):
  assert run_convert(*args) == 1
  err = capsys.readouterr().err
  assert err.startswith("python -m retro_jax.convert: error: ")
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment in err, err
  return err


def test_wrong_arch_names_the_architecture_the_file_looks_like(resnet18_file, tmp_path, capsys):
  _, path = resnet18_file
  out = tmp_path / "out"
  _expect_failure(capsys, ["--src", path, "--format", "torchvision", "--arch", "resnet34",
                           "--out", out],
                  "state dict does not match", "missing from the state dict",
                  "The file's backbone looks like: resnet18 (use --arch resnet18)")
  assert not out.exists()


def test_renamed_key_is_named(resnet18_file, tmp_path, capsys):
  model, _ = resnet18_file
  state = dict(model.state_dict())
  state["layer1.0.conv_1.weight"] = state.pop("layer1.0.conv1.weight")
  path = tmp_path / "renamed.pth"
  torch.save(state, path)
  _expect_failure(capsys, ["--src", path, "--format", "torchvision", "--arch", "resnet18",
                           "--out", tmp_path / "out"],
                  "1 missing from the state dict:\n    layer1.0.conv1.weight",
                  "1 unexpected in the state dict:\n    layer1.0.conv_1.weight",
                  "It matches no registered architecture exactly.")
  assert not (tmp_path / "out").exists()


def test_wrong_shape_is_named(resnet18_file, tmp_path, capsys):
  model, _ = resnet18_file
  state = dict(model.state_dict())
  state["layer2.0.bn1.running_var"] = torch.ones(64)
  path = tmp_path / "shape.pth"
  torch.save(state, path)
  _expect_failure(capsys, ["--src", path, "--format", "torchvision", "--arch", "resnet18",
                           "--out", tmp_path / "out"],
                  "1 shape mismatch:\n    layer2.0.bn1.running_var: file (64,), model expects "
                  "(128,)")


def test_wrong_format_is_explained(resnet18_file, tmp_path, capsys):
  _, path = resnet18_file
  _expect_failure(capsys, ["--src", path, "--format", "moco", "--arch", "resnet18",
                           "--out", tmp_path / "out"],
                  "is not a 'moco' checkpoint for resnet18", "'state_dict'")


def test_truncated_file_fails_cleanly_from_the_command_line(resnet18_file, tmp_path):
  _, path = resnet18_file
  data = path.read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[:len(data) // 2])
  result = subprocess.run(
      [sys.executable, "-m", "retro_jax.convert", "--src", str(truncated), "--format",
       "torchvision", "--arch", "resnet18", "--out", str(tmp_path / "out")],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1
  assert "cannot read" in result.stderr and "truncated, corrupt or not a torch file" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_unknown_arch_lists_known_ones(tmp_path, capsys):
  src = tmp_path / "x.pth"
  src.write_bytes(b"")
  _expect_failure(capsys, ["--src", src, "--format", "timm", "--arch", "resnet5",
                           "--out", tmp_path / "out"], "unknown --arch 'resnet5'", "resnet50")


def test_embed_without_head_asks_for_features(resnet18_file, tmp_path, capsys):
  _, path = resnet18_file
  out = tmp_path / "r18"
  assert run_convert("--src", path, "--format", "torchvision", "--arch", "resnet18",
                     "--out", out) == 0
  images = tmp_path / "x.npy"
  np.save(images, np.zeros((1, 32, 32, 3), np.float32))
  assert embed.main(["--checkpoint", str(out), "--images", str(images), "--out",
                     str(tmp_path / "e.npy"), "--output", "embedding"]) == 1
  assert "no projection head: use --output features" in capsys.readouterr().err

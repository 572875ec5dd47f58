"""`convert --format swav`: SwAV's released ResNet-50 layout, against SwAV's own model code.

A torch ResNet-50 written from facebookresearch/swav `src/resnet50.py` (random weights,
randomised BN statistics and biases, head 2048 -> 2048 (BN, ReLU) -> 128, 3,000 prototypes) is
saved as SwAV's released files are (`module.*`), converted through the CLI, and its features,
projection and prototype scores are compared with torch's at <= 1e-5 relative error.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from retro_jax import checkpoint

from cli_runner import run_convert
from swav_reference import SwAVResNet
from swav_reference import save_released
from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import relative_error


@pytest.fixture(scope="module")
def swav_r50(tmp_path_factory):
  model = SwAVResNet(50).eval()
  path = save_released(model, tmp_path_factory.mktemp("swav") / "swav_800ep_pretrain.pth.tar")
  out = path.parent / "converted"
  assert run_convert("--src", path, "--format", "swav", "--arch", "resnet50", "--out", out) == 0
  return model, path, out


def test_features_projection_and_prototype_scores_match_swav(swav_r50):
  model, _, out = swav_r50
  images = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = [t.numpy() for t in model(nchw(images))]
  converted, _ = checkpoint.load_model(out)

  @nnx.jit
  def forward(encoder, x):
    out = encoder(x)
    return out.features, out.embedding, encoder.head(out.features)

  got = forward(converted, jnp.asarray(images))
  for name, actual, want in zip(("features", "projection", "prototype scores"), got, expected):
    assert actual.shape == want.shape, name
    assert relative_error(actual, want) <= RTOL, name
  np.testing.assert_array_equal(converted.head.prototype_matrix(),
                                model.prototypes.weight.detach().numpy())


def test_description_records_the_swav_head(swav_r50):
  _, _, out = swav_r50
  description = json.loads((out / "model.json").read_text())
  assert description["encoder"]["head_kind"] == "swav"
  assert description["head"] == {"kind": "swav", "in_features": 2048, "num_prototypes": 3000,
                                 "hidden_features": 2048, "out_features": 128,
                                 "batch_norm": True}
  assert description["source"]["format"] == "swav"


def _expect_one_line_failure(capsys, args, *fragments):
  assert run_convert(*args) == 1
  err = capsys.readouterr().err
  assert err.startswith("python -m retro_jax.convert: error: ") and err.count("\n") == 1, err
  for fragment in fragments:
    assert fragment in err, err


@pytest.mark.parametrize("drop, message", [
    ("module.prototypes.weight", "no 'prototypes.weight' entry"),
    ("module.projection_head.0.weight", "no 'projection_head.0.weight' entry"),
])
def test_a_file_without_the_swav_head_is_refused_naming_the_key(swav_r50, tmp_path, capsys,
                                                                 drop, message):
  _, path, _ = swav_r50
  state = torch.load(path, weights_only=True)
  del state[drop]
  broken = tmp_path / "broken.pth"
  torch.save(state, broken)
  _expect_one_line_failure(capsys, ["--src", broken, "--format", "swav", "--arch", "resnet50",
                                    "--out", tmp_path / "out"], "not a 'swav' checkpoint",
                           message)
  assert not (tmp_path / "out").exists()


def test_several_prototype_sets_are_refused(swav_r50, tmp_path, capsys):
  _, path, _ = swav_r50
  state = torch.load(path, weights_only=True)
  state["module.prototypes.prototypes0.weight"] = state.pop("module.prototypes.weight")
  broken = tmp_path / "multi.pth"
  torch.save(state, broken)
  _expect_one_line_failure(capsys, ["--src", broken, "--format", "swav", "--arch", "resnet50",
                                    "--out", tmp_path / "out"],
                           "several prototype sets (prototypes.prototypes0.weight, ...)")

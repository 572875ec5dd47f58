"""Model directories: save/load round trip and the errors a user can run into."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from retro_jax import checkpoint
from retro_jax.convert.state_dict import load_state_dict
from retro_jax.convert.state_dict import model_state_dict
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder

SPEC = EncoderSpec("resnet18", {}, "mlp", {"dims": [512, 64, 16]})


@pytest.fixture(scope="module")
def model():
  """A resnet18 + MLP head filled with torch's random weights (random BN statistics too)."""
  torch.manual_seed(0)
  backbone = torchvision.models.resnet18()
  with torch.no_grad():
    for module in backbone.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  head = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
  encoder = abstract_encoder(SPEC)
  load_state_dict(encoder.backbone, {k: v for k, v in backbone.state_dict().items()
                                     if not k.startswith("fc.")})
  load_state_dict(encoder.head, head.state_dict())
  return encoder


def test_round_trip_restores_every_weight_and_statistic(model, tmp_path):
  saved = checkpoint.save_model(tmp_path / "m", model, SPEC, {"input": {"mean": [0.5] * 3,
                                                                        "std": [0.25] * 3}})
  restored, description = checkpoint.load_model(saved)
  expected, got = model_state_dict(model), model_state_dict(restored)
  assert set(got) == set(expected)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  assert description["encoder"] == SPEC.to_json()
  assert description["feature_width"] == 512
  assert description["input"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
  # Restored in eval mode, ready to embed: running statistics are used.
  assert restored.backbone.bn1.use_running_average


def test_refuses_to_overwrite_unless_asked(model, tmp_path):
  target = tmp_path / "m"
  checkpoint.save_model(target, model, SPEC, {})
  with pytest.raises(checkpoint.ModelDirectoryError, match="exists and is not empty"):
    checkpoint.save_model(target, model, SPEC, {})
  checkpoint.save_model(target, model, SPEC, {"note": "second"}, overwrite=True)
  assert checkpoint.read_description(target)["note"] == "second"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.json").unlink(), "no model.json"),
    (lambda d: (d / "model.json").write_text("{"), "is not valid JSON"),
    (lambda d: (d / "model.json").write_text(json.dumps({"format": "other"})),
     "does not describe a retro_jax model"),
    (lambda d: (d / "model.json").write_text(json.dumps(
        {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION + 1})),
     "upgrade retro_jax"),
])
def test_damaged_directories_are_explained(model, tmp_path, damage, message):
  target = checkpoint.save_model(tmp_path / "m", model, SPEC, {})
  damage(target)
  with pytest.raises(checkpoint.ModelDirectoryError, match=message):
    checkpoint.load_model(target)


def test_missing_directory(tmp_path):
  with pytest.raises(checkpoint.ModelDirectoryError, match="no model directory"):
    checkpoint.load_model(tmp_path / "nowhere")


def test_unfilled_abstract_model_is_caught():
  from retro_jax.models.encoder import materialize_rng_state  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="never given values"):
    materialize_rng_state(abstract_encoder(SPEC))


def test_model_directories_hold_weights_only(model, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  target = checkpoint.save_model(tmp_path / "m", model, SPEC, {})
  with ocp.StandardCheckpointer() as reader:
    raw = reader.restore(target / checkpoint.STATE_DIR)  # No target: whatever is stored.
  # Exactly the torch state dict's entries (parameters and BN statistics), no RNG state.
  assert len(jax.tree.leaves(raw)) == len(model_state_dict(model))

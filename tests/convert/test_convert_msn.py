"""`convert --format msn`: MSN's released checkpoint layout and VISSL's, against MSN's own code.

The network is MSN's deit_tiny with `init_model`'s projection head (BN on) and 1,024
prototypes, transcribed from facebookresearch/msn (tests/msn_reference.py), every norm,
statistic and bias randomised; written in each layout, converted through the CLI and compared
with the torch forward: the class token (features), the projection (embedding) and the
teacher's prototype probabilities, which must equal MSN's own targets, sharpen(snn(h, C,
tau=0.1), T=0.25), and VISSL's msn_head at temperature 0.025. ViT-Tiny keeps it cheap; the
ViT-L layout is the same keys with other widths (tests/train/test_rob_msn_teacher.py converts
a ViT-L-shaped one, and tests/models/test_vit.py checks ViT-L against timm).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cli_runner import run_convert
import msn_reference
from retro_jax import checkpoint
from retro_jax.models import vit
from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import random_images
from torch_reference import relative_error

LAYOUTS = {"msn": msn_reference.msn_checkpoint, "vissl": msn_reference.vissl_checkpoint}


@pytest.fixture(scope="module")
def network():
  torch.manual_seed(0)
  model = msn_reference.randomise(msn_reference.deit("tiny"), seed=1)
  protos = msn_reference.prototypes(1024, 256, torch.Generator().manual_seed(2))
  return model, protos


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def converted(request, network, tmp_path_factory):
  folder = tmp_path_factory.mktemp(f"msn_{request.param}")
  path, out = folder / "checkpoint.pth.tar", folder / "teacher"
  torch.save(LAYOUTS[request.param](*network), path)
  assert run_convert("--src", path, "--format", "msn", "--arch", "vit_tiny_patch16",
                     "--out", out) == 0
  return request.param, out


@nnx.jit
def _forward(model, images):
  out = model(images)
  return out.features, out.embedding, model.head(out.features)


def test_teacher_matches_msn_code(network, converted):
  model, protos = network
  layout, out = converted
  teacher, description = checkpoint.load_model(out)
  assert description["head"] == {"kind": "msn", "in_features": 192, "num_prototypes": 1024,
                                 "hidden_features": 2048, "out_features": 256,
                                 "batch_norm": True, "temperature": 0.025}
  images = random_images(224, seed=3)
  with torch.no_grad():
    features = model.trunk(nchw(images))
    embedding = model.fc(features)
    # MSN's own targets, and RoB's teacher head: the same numbers.
    probs = (msn_reference.msn_targets(embedding, protos) if layout == "msn" else
             msn_reference.vissl_msn_head(embedding, protos))
  got = _forward(teacher, jnp.asarray(images))  # one compile: both layouts build one graph
  for name, actual, expected in zip(("features", "embedding", "probabilities"), got,
                                    (features, embedding, probs)):
    assert actual.shape == tuple(expected.shape), name
    assert relative_error(actual, expected.numpy()) <= RTOL, name
  np.testing.assert_allclose(np.asarray(got[2]).sum(axis=-1), 1.0, rtol=1e-5)
  if layout == "msn":
    # Other input sizes: our resampling is MSN's interpolate_pos_encoding (6 x 6 at 96 px).
    tokens = torch.zeros(1, 1 + 36, 192)
    with torch.no_grad():
      expected = model.interpolate_pos_encoding(tokens, model.pos_embed).numpy()
    actual = vit.resample_pos_embed(teacher.backbone.pos_embed[...], (6, 6), (14, 14))
    assert relative_error(actual, expected) <= RTOL


def test_training_state_is_left_out_and_listed(converted):
  layout, out = converted
  ignored = checkpoint.read_description(out)["ignored_entries"]
  if layout == "msn":
    assert set(ignored) == {"encoder", "opt", "epoch", "loss", "batch_size", "world_size", "lr",
                            "temperature"}
  else:
    assert set(ignored) == {"phase_idx", "iteration", "train_phase_idx",
                            "classy_state_dict.train", "classy_state_dict.loss",
                            "classy_state_dict.optimizer", "classy_state_dict.base_model.meta"}


# Wrong files: each refused with exit 1 before anything is written, naming the entry.
@pytest.fixture(scope="module")
def small_network():
  """A 1-block, narrow-headed network for the files refused before any model is built."""
  model = msn_reference.deit("tiny", depth=1, hidden_dim=16, output_dim=8).eval()
  return model, msn_reference.prototypes(4, 8, torch.Generator().manual_seed(5))


def _without(key, *inner):
  def edit(obj):
    for name in inner:
      obj = obj[name]
    del obj[key]
  return edit


def _narrow_prototypes(obj):
  obj["prototypes"] = obj["prototypes"][:, :128]


def _dino_layout(obj):
  obj["teacher"] = obj.pop("target_encoder")
  obj["student"] = obj.pop("encoder")


def _vissl_without_heads(obj):
  state = obj.pop("target_encoder")
  obj.clear()
  obj["classy_state_dict"] = {"base_model": {"model": {"trunk": state}}}


@pytest.mark.parametrize("network_name, edit, fragments, one_line", [
    ("small_network", _without("prototypes"), ["no 'prototypes' entry"], True),
    ("small_network", _without("module.fc.fc3.weight", "target_encoder"),
     ["no 'target_encoder' 'module.fc.fc3.weight' entry"], True),
    ("small_network", _dino_layout,
     ["no 'target_encoder' entry", "'classy_state_dict' (VISSL)", "'teacher'"], True),
    ("small_network", _vissl_without_heads,
     ["no state dict at 'classy_state_dict.base_model.model.heads'"], True),
    # The strict loader's list (several lines), once the backbone has loaded.
    ("network", _without("module.fc.bn1.running_var", "target_encoder"),
     ["1 missing from the state dict:\n    fc.bn1.running_var"], False),
    ("network", _narrow_prototypes,
     ["shape mismatch", "prototypes: file (1024, 128), model expects (1024, 256)"], False),
], ids=["no_prototypes", "no_fc3", "dino_file", "vissl_no_heads", "missing_bn_statistic",
        "prototype_width"])
def test_wrong_file_is_refused_naming_the_entry(request, tmp_path, capsys, network_name, edit,
                                                fragments, one_line):
  obj = msn_reference.msn_checkpoint(*request.getfixturevalue(network_name))
  edit(obj)
  path, out = tmp_path / "bad.pth.tar", tmp_path / "out"
  torch.save(obj, path)
  assert run_convert("--src", path, "--format", "msn", "--arch", "vit_tiny_patch16",
                     "--out", out) == 1
  err = capsys.readouterr().err
  assert err.startswith("python -m retro_jax.convert: error: ") and "Traceback" not in err
  for fragment in fragments:
    assert fragment in err, err
  if one_line:
    assert err.count("\n") == 1, err
  assert not out.exists()


def test_non_vit_arch_is_refused(small_network, tmp_path, capsys):
  path = tmp_path / "msn.pth.tar"
  torch.save(msn_reference.msn_checkpoint(*small_network), path)
  assert run_convert("--src", path, "--format", "msn", "--arch", "resnet50",
                     "--out", tmp_path / "out") == 1
  err = capsys.readouterr().err
  assert "--arch resnet50 is not one (e.g. vit_large_patch16)" in err and err.count("\n") == 1

"""`python -m retro_jax.export`: workdir resolution, the Orbax and torch exports, user errors.

The source models get torch's random weights with randomised batch-norm statistics
(`torch_reference.randomise`), are saved as a training run's WORKDIR/student would be, and
every export is compared with the source model's own features: Orbax exactly, torch within
`RTOL` after the torch model is rebuilt by the very lines the export's JSON gives.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from flax import nnx

from retro_jax import checkpoint
from retro_jax import cli
from retro_jax import embed
from retro_jax import export
from retro_jax.convert.state_dict import load_state_dict
from retro_jax.models.encoder import Encoder
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder
from retro_jax.models.encoder import materialize_rng_state

from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import random_images
from torch_reference import randomise
from torch_reference import relative_error

INPUT = {"mean": [0.25, 0.5, 0.75], "std": [0.5, 0.25, 0.125]}
HEAD = {"dims": [512, 64, 16]}

_forward = nnx.jit(lambda model, x: model(x))


def save_student(workdir: pathlib.Path, model: Encoder, spec: EncoderSpec) -> pathlib.Path:
  """`model` as WORKDIR/student, described as `train.loop._save_student` describes it."""
  return checkpoint.save_model(
      workdir / "student", model, spec,
      {"source": {"format": "retro_jax.train", "method": "mocov2", "workdir": str(workdir),
                  "step": 4}, "input": INPUT})


def run_export(*args) -> int:
  return export.main([str(a) for a in args])


def torch_backbone(architecture: str) -> torch.nn.Module:
  """A randomised torchvision/timm model without classifier, in the layout of `architecture`."""
  torch.manual_seed(0)
  if architecture == "vit_tiny_patch16":
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                              img_size=32)
    with torch.no_grad():  # LayerNorms and biases start at 1 / 0: re-draw every 1-D parameter.
      for param in model.parameters():
        if param.ndim == 1:
          param.normal_(0.0, 0.5)
    return model.eval()
  model = getattr(torchvision.models, architecture)()
  if architecture.startswith("resnet"):
    model.fc = torch.nn.Identity()
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
  else:
    model.classifier = torch.nn.Identity()
  return randomise(model, seed=1)


KWARGS = {"resnet18": {"low_res_stem": True}, "efficientnet_b0": {}, "mobilenet_v3_large": {},
          "vit_tiny_patch16": {"img_size": 32}}


def encoder_from_torch(architecture: str, head: bool = False) -> tuple[Encoder, EncoderSpec]:
  spec = EncoderSpec(architecture, KWARGS[architecture], *(("mlp", HEAD) if head else ()))
  model = abstract_encoder(spec)
  load_state_dict(model.backbone, torch_backbone(architecture).state_dict())
  if head:
    torch.manual_seed(2)
    mlp = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    load_state_dict(model.head, mlp.state_dict())
  materialize_rng_state(model)  # Drop-path streams (EfficientNet).
  model.eval()
  return model, spec


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run's workdir: ResNet-18 (low-res stem) + MLP head; and the model itself."""
  model, spec = encoder_from_torch("resnet18", head=True)
  workdir = tmp_path_factory.mktemp("run")
  save_student(workdir, model, spec)
  return workdir, model


@pytest.fixture(scope="module")
def images():
  return random_images(32)


def test_orbax_export_is_the_backbone_alone_with_its_description(trained, images, tmp_path):
  workdir, model = trained
  out = tmp_path / "exported"
  assert run_export("--workdir", workdir, "--out", out, "--format", "orbax") == 0
  exported, description = checkpoint.load_model(out)
  assert exported.head is None
  assert description["encoder"] == EncoderSpec("resnet18", {"low_res_stem": True}).to_json()
  assert description["architecture"] == "resnet18"
  assert description["feature_width"] == 512
  assert description["input"] == INPUT
  assert description["head"] is None
  assert description["exported_from"] == {"format": "retro_jax.train", "method": "mocov2",
                                          "workdir": str(workdir), "step": 4}
  assert description["source"]["workdir"] == str(workdir.absolute())
  np.testing.assert_array_equal(_forward(exported, jnp.asarray(images)).features,
                                _forward(model, jnp.asarray(images)).features)

  # The one call the README gives: embed reads it.
  np.save(tmp_path / "x.npy", images)
  assert embed.main(["--checkpoint", str(out), "--images", str(tmp_path / "x.npy"),
                     "--out", str(tmp_path / "f.npy")]) == 0
  np.testing.assert_allclose(np.load(tmp_path / "f.npy"),
                             _forward(model, jnp.asarray(images)).features, rtol=1e-6,
                             atol=1e-6)


def test_orbax_export_with_head_keeps_the_head(trained, images, tmp_path):
  workdir, model = trained
  out = tmp_path / "exported"
  assert run_export("--workdir", workdir, "--out", out, "--format", "orbax", "--with-head") == 0
  exported, description = checkpoint.load_model(out)
  assert description["encoder"]["head_kind"] == "mlp"
  assert description["head"] == {"kind": "mlp", "kwargs": HEAD}
  got, expected = _forward(exported, jnp.asarray(images)), _forward(model, jnp.asarray(images))
  np.testing.assert_array_equal(got.features, expected.features)
  np.testing.assert_array_equal(got.embedding, expected.embedding)


def build_from_json(json_path: pathlib.Path, monkeypatch) -> torch.nn.Module:
  """Runs the export's own `python` lines next to the state dict; returns their `model`."""
  monkeypatch.chdir(json_path.parent)
  namespace: dict = {}
  lines = json.loads(json_path.read_text())["python"]
  exec("\n".join(lines), namespace)  # pylint: disable=exec-used
  return namespace["model"]


@pytest.mark.parametrize("architecture", list(KWARGS))
def test_torch_export_loads_strictly_and_computes_the_same_features(architecture, tmp_path,
                                                                    monkeypatch):
  if architecture == "resnet18":
    model, spec = encoder_from_torch(architecture, head=True)  # The head is left out.
  else:
    model, spec = encoder_from_torch(architecture)
  workdir = tmp_path / "run"
  save_student(workdir, model, spec)
  assert run_export("--workdir", workdir, "--out", tmp_path / "out" / "student.pt",
                    "--format", "torch") == 0
  description = json.loads((tmp_path / "out" / "student.json").read_text())
  assert description["architecture"] == architecture
  assert description["input"] == INPUT
  assert description["state_dict"] == "student.pt"
  reference = build_from_json(tmp_path / "out" / "student.json", monkeypatch)  # strict=True
  assert not reference.training
  images = random_images(32, seed=3)
  with torch.no_grad():
    got = reference(nchw(images)).numpy()
  expected = _forward(model, jnp.asarray(images)).features
  assert got.shape == expected.shape == (2, description["feature_width"])
  assert relative_error(got, expected) <= RTOL


def test_torch_export_to_a_directory_is_named_after_the_architecture(trained, tmp_path):
  workdir, _ = trained
  shutil.copytree(workdir / "student", tmp_path / "run" / "student")
  # The run's own workdir is a fine place for it.
  assert run_export("--workdir", tmp_path / "run", "--out", tmp_path / "run", "--format",
                    "torch") == 0
  assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["resnet18.json",
                                                                   "resnet18.pt", "student"]
  state = torch.load(tmp_path / "run" / "resnet18.pt", weights_only=True)
  assert "bn1.num_batches_tracked" in state and not any(k.startswith("fc.") for k in state)


def test_torch_recipes_for_kwargs_without_a_torchvision_constructor_argument():
  recipe = export.torch_recipe("mobilenet_v3_large", {"bn_eps": 1e-5, "dtype": "bfloat16"})
  assert "eps=1e-05" in recipe["constructor"]
  assert "dtype" in recipe["notes"][0]
  recipe = export.torch_recipe("efficientnet_b0", {"in_channels": 1})
  assert "model.features[0][0] = torch.nn.Conv2d(1, 32," in "\n".join(recipe["lines"])
  with pytest.raises(export.ExportError, match="resnet50x2 has no torchvision or timm model"):
    export.torch_recipe("resnet50x2", {})
  with pytest.raises(export.ExportError, match="kwargs {'width': 32}"):
    export.torch_recipe("resnet18", {"width": 32})


def write_stages(workdir: pathlib.Path) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "stages.json").write_text(json.dumps(
      {"final": "student", "stages": {"teacher": "teacher", "student": "student_retro"}}))


def test_resolve_model_dir(tmp_path):
  write_stages(tmp_path / "multi")
  for sub in ("teacher", "student_retro"):
    (tmp_path / "multi" / sub / "student").mkdir(parents=True)
    (tmp_path / "multi" / sub / "student" / "model.json").write_text("{}")
  assert export.resolve_model_dir(tmp_path / "multi") == tmp_path / "multi/student_retro/student"
  assert export.resolve_model_dir(tmp_path / "multi", "teacher") == (
      tmp_path / "multi/teacher/student")
  single = tmp_path / "multi" / "teacher"
  assert export.resolve_model_dir(single) == single / "student"
  assert export.resolve_model_dir(single / "student") == single / "student"  # A model directory.
  with pytest.raises(export.ExportError, match=r"unknown --stage 'techer'.*teacher, student"):
    export.resolve_model_dir(tmp_path / "multi", "techer")
  with pytest.raises(export.ExportError, match="no stages.json"):
    export.resolve_model_dir(single, "teacher")


def test_multi_stage_workdir_exports_the_final_stage_unless_told(trained, tmp_path):
  workdir, _ = trained
  write_stages(tmp_path / "multi")
  shutil.copytree(workdir / "student", tmp_path / "multi" / "student_retro" / "student")
  assert run_export("--workdir", tmp_path / "multi", "--out", tmp_path / "a",
                    "--format", "orbax") == 0
  assert checkpoint.read_description(tmp_path / "a")["source"]["stage"] == "student"
  # The teacher stage has not started.
  assert run_export("--workdir", tmp_path / "multi", "--stage", "teacher", "--out",
                    tmp_path / "b", "--format", "orbax") == 1
  assert not (tmp_path / "b").exists()


def error_of(capsys, *args, code: int = 1) -> str:
  """Runs the command; asserts exit `code` (2: argparse's usage error) and no output."""
  if code == 2:
    with pytest.raises(SystemExit) as exit_info:
      run_export(*args)
    assert exit_info.value.code == 2
  else:
    assert run_export(*args) == code
  captured = capsys.readouterr()
  assert captured.out == "" and "Traceback" not in captured.err
  return captured.err


def test_user_errors_name_the_problem(trained, tmp_path, capsys):
  workdir, _ = trained
  out = ("--out", tmp_path / "out", "--format", "orbax")
  assert "no such directory" in error_of(capsys, "--workdir", tmp_path / "nothing", *out)

  unfinished = tmp_path / "unfinished"
  (unfinished / "checkpoints" / "8").mkdir(parents=True)
  message = error_of(capsys, "--workdir", unfinished, *out)
  assert "has not finished (last checkpoint: step 8)" in message
  assert "rerun the same command" in message

  assert "not a training workdir" in error_of(capsys, "--workdir", tmp_path, *out)

  write_stages(tmp_path / "multi")
  message = error_of(capsys, "--workdir", tmp_path / "multi", "--stage", "nope", *out)
  assert "unknown --stage 'nope'" in message and "teacher, student" in message
  assert "has not started" in error_of(capsys, "--workdir", tmp_path / "multi", *out)

  assert "invalid choice: 'onnx'" in error_of(capsys, "--workdir", workdir, "--out",
                                              tmp_path / "out", "--format", "onnx", code=2)
  assert "--with-head applies to --format orbax" in error_of(
      capsys, "--workdir", workdir, "--out", tmp_path / "x.pt", "--format", "torch",
      "--with-head", code=2)

  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  assert "exists and is not empty (pass --overwrite" in error_of(capsys, "--workdir", workdir,
                                                                 *out)
  (tmp_path / "x.pt").write_bytes(b"old")
  assert "x.pt exists (pass --overwrite" in error_of(capsys, "--workdir", workdir, "--out",
                                                     tmp_path / "x.pt", "--format", "torch")
  assert (tmp_path / "x.pt").read_bytes() == b"old"
  assert "overlaps the model directory" in error_of(capsys, "--workdir", workdir, "--out",
                                                    workdir / "student", "--format", "orbax")


def test_with_head_on_a_backbone_and_overwrite(trained, tmp_path, capsys):
  workdir, _ = trained
  plain = tmp_path / "plain"
  assert run_export("--workdir", workdir, "--out", plain, "--format", "orbax") == 0
  capsys.readouterr()
  assert "holds a backbone without a head" in error_of(
      capsys, "--workdir", plain, "--out", tmp_path / "again", "--format", "orbax", "--with-head")
  assert "exists and is not empty" in error_of(capsys, "--workdir", workdir, "--out", plain,
                                               "--format", "orbax", "--with-head")
  assert run_export("--workdir", workdir, "--out", plain, "--format", "orbax", "--with-head",
                    "--overwrite") == 0
  assert checkpoint.read_description(plain)["head"]["kind"] == "mlp"


def test_torch_export_without_torch_says_how_to_install_it(trained, tmp_path, capsys,
                                                           monkeypatch):
  workdir, _ = trained
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  assert "pip install torch" in error_of(capsys, "--workdir", workdir, "--out",
                                         tmp_path / "x.pt", "--format", "torch")
  assert not (tmp_path / "x.pt").exists()


def test_registered_in_the_front_door():
  assert "export" in cli.SUBCOMMANDS


def test_torch_export_of_mobilenet_v3_with_conv_head(tmp_path, monkeypatch):
  """`conv_head=True` (timm's head stage, as Retro's student) exports as classifier[:2]."""
  torch.manual_seed(0)
  reference = torchvision.models.mobilenet_v3_large()
  reference.classifier = reference.classifier[:2]
  reference = randomise(reference, seed=1)
  spec = EncoderSpec("mobilenet_v3_large", {"conv_head": True, "bn_eps": 1e-5,
                                            "bn_momentum": 0.1})
  model = abstract_encoder(spec)
  load_state_dict(model.backbone, reference.state_dict())
  model.eval()
  save_student(tmp_path / "run", model, spec)
  assert run_export("--workdir", tmp_path / "run", "--out", tmp_path / "out" / "student.pt",
                    "--format", "torch") == 0
  description = json.loads((tmp_path / "out" / "student.json").read_text())
  assert "model.classifier = model.classifier[:2]" in description["python"]
  rebuilt = build_from_json(tmp_path / "out" / "student.json", monkeypatch)  # strict=True
  images = random_images(32, seed=3)
  with torch.no_grad():
    got = rebuilt(nchw(images)).numpy()
  expected = _forward(model, jnp.asarray(images)).features
  assert got.shape == expected.shape == (2, description["feature_width"]) == (2, 1280)
  assert relative_error(got, expected) <= RTOL

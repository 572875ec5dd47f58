"""The recipe files in configs/: every variant builds, and the fields that carry the authors'
choices hold (cheap: no model is compiled, except the one reference_smoke run at the end)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from retro_jax import checkpoint
from retro_jax import export
from retro_jax import main as main_lib
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder
from retro_jax.objectives import retro
from retro_jax.train import recipes
from retro_jax.train.contrastive_methods import ContrastiveMethod

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
RETRO = ("effb0", "mobilenetv3", "resnet18")
DISCO = ("disco_effb0",)
OTHERS = ("mocov2_r50", "dino_vit_small", "rob_dino_vit_tiny", "rob_msn_vit_small",
          "rob_ibot_vit_small")


def get_config(name: str, variant: str | None = None):
  spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.mark.parametrize("name", RETRO + DISCO)
def test_reference_is_the_authors_code_form_and_the_default_the_best_reading(name):
  default, reference = get_config(name), get_config(name, "reference")
  assert default.teacher.bn_mode == "eval" and reference.teacher.bn_mode == "batch"
  if default.method == "retro":
    assert default.objective.consistency_pairing == "same_view"
    assert reference.objective.consistency_pairing == "cross_view"
    assert default.student.get("bn_groups", 1) == reference.student.bn_groups == 1  # SyncBN
  else:
    assert default.student.get("bn_groups", 1) == 1
    assert reference.student.bn_groups == 8 == reference.global_batch_size // 32  # per GPU
  # Only those fields differ: the rest of the recipe is shared.
  for config in (default, reference):
    assert config.student.kwargs.get("drop_path_rate", 0.0) == 0.0
  assert default.student.kwargs.to_dict() == reference.student.kwargs.to_dict()
  assert default.optimizer.to_dict() == reference.optimizer.to_dict()
  assert default.objective.consistency_weight == reference.objective.consistency_weight == 32


@pytest.mark.parametrize("name", RETRO + DISCO)
def test_reference_smoke_is_the_reference_form_made_small(name):
  config, smoke = get_config(name, "reference_smoke"), get_config(name, "smoke")
  assert config.teacher.bn_mode == "batch"
  assert (config.global_batch_size, config.total_steps) == (16, 4)
  assert config.teacher.random_spec == smoke.teacher.random_spec
  assert config.student.name == smoke.student.name
  assert config.global_batch_size % config.student.bn_groups == 0


def test_student_networks_are_the_authors():
  effb0, disco, mnv3, r18 = (get_config(n) for n in ("effb0", "disco_effb0", "mobilenetv3",
                                                      "resnet18"))
  # No stochastic depth (timm's drop_path_rate=0. default in the authors' code).
  assert effb0.student.kwargs.drop_path_rate == disco.student.kwargs.drop_path_rate == 0.0
  # timm's MobileNetV3-Large: conv head after the pool, torch BN defaults; grad clip 5.
  assert mnv3.student.kwargs.to_dict() == {"conv_head": True, "bn_eps": 1e-5,
                                           "bn_momentum": 0.1}
  assert mnv3.student.adapter_kwargs.activation == "hard_mish"
  assert mnv3.optimizer.clip_grad_norm == 5.0
  # timm's ResNet-18: zero_init_last_bn=True; the torch export takes the kwarg.
  assert r18.student.kwargs.zero_init_residual is True
  assert get_config("disco_effb0", "smoke").student.kwargs.zero_init_residual is True
  recipe = export.torch_recipe(r18.student.name, r18.student.kwargs.to_dict())
  assert recipe["constructor"] == "torchvision.models.resnet18()"
  assert "zero_init_residual" in recipe["notes"][0]


def test_mobilenetv3_adapter_sees_the_1280x1x1_map():
  """Shapes only (abstract): backbone 1 x 1 x 1280 -> adapter 1 x 1 x 2048 -> head 128."""
  config = get_config("mobilenetv3")
  method = ContrastiveMethod("retro", retro.Config(queue_size=32), config.student.name,
                             config.student.kwargs.to_dict(), adapter=config.student.adapter,
                             adapter_kwargs=config.student.adapter_kwargs.to_dict())
  teacher = abstract_encoder(EncoderSpec("resnet50", {}, "mlp", {"dims": [2048, 2048, 128]}))
  model = nnx.eval_shape(lambda: method.build(teacher, rngs=nnx.Rngs(0)))
  assert model.backbone.feature_width == 1280
  images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)

  def shapes(model, teacher, x):
    feature_map = model.backbone(x).feature_map
    embedding = method._student_embedding(model, teacher, x, ema=False)  # pylint: disable=protected-access
    return feature_map, model.adapter(feature_map), embedding

  feature_map, adapted, embedding = nnx.eval_shape(shapes, model, teacher, images)
  assert feature_map.shape == (2, 1, 1, 1280)
  assert adapted.shape == (2, 1, 1, 2048)
  assert embedding.shape == (2, 128)


@pytest.mark.parametrize("name", OTHERS)
def test_reference_is_refused_where_no_authors_form_is_defined(name):
  get_config(name, "smoke")
  with pytest.raises(ValueError, match="'retro' and 'disco'"):
    get_config(name, "reference")


def test_rob_swav_is_vissls_rn50_to_rn50_recipe():
  from retro_jax.train.loop import objective_config  # pylint: disable=g-import-not-at-top
  config = get_config("rob_swav_resnet50")
  assert (config.method, config.student.name, config.epochs, config.global_batch_size) == (
      "rob_swav", "resnet50", 100, 4096)
  assert config.student.head.to_dict() == {"hidden_features": 2048, "batch_norm": True}
  objective = objective_config(config)
  assert (objective.epsilon, objective.num_iters, objective.temperature) == (0.03, 3, 0.1)
  assert objective.use_teacher_prototypes and objective.num_teacher_crops == 1
  assert config.optimizer.name == "larc" and config.optimizer.weight_decay == 1e-6
  assert [v.crop.size for v in config.data.augmentation.views] == [224] * 2 + [96] * 4
  smoke = get_config("rob_swav_resnet50", "smoke")
  assert smoke.teacher.random_spec.head_kind == "swav"
  assert smoke.objective.num_prototypes == smoke.teacher.random_spec.head_kwargs.num_prototypes
  with pytest.raises(ValueError, match="'retro' and 'disco'"):
    get_config("rob_swav_resnet50", "reference")


def test_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="reference_smoke"):
    get_config("effb0", "refrence")
  assert recipes.VARIANTS == ("smoke", "reference", "reference_smoke")


@pytest.mark.slow
def test_resnet18_reference_smoke_trains(fashion_mnist_tfds, tmp_path, capsys):
  """The authors' code form end to end (teacher BN on batch statistics, cross-view pairing)."""
  workdir = tmp_path / "run"
  # At 1/8 of ResNet-18's width (tests/train/narrow_smoke.py): the wiring is the same.
  narrow = pathlib.Path(__file__).parent / "train" / "narrow_smoke.py"
  args = ["--config", f"{narrow}:resnet18/reference_smoke", "--workdir", str(workdir),
          f"--config.data.data_dir={fashion_mnist_tfds}", "--config.total_steps=2"]
  assert main_lib.main(args) == 0
  assert "step 2/2" in capsys.readouterr().out
  resolved = json.loads((workdir / "config.json").read_text())
  assert resolved["teacher"]["bn_mode"] == "batch"
  assert resolved["objective"]["consistency_pairing"] == "cross_view"
  _, description = checkpoint.load_model(workdir / "student")
  assert description["encoder"]["backbone_kwargs"]["zero_init_residual"] is True

"""RoB-iBOT on the engine: the :smoke recipe trained from a teacher written in iBOT's checkpoint
layout and converted with `convert --format ibot`; the method's masking and gradients."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ibot_reference
from retro_jax import checkpoint
from retro_jax import main as main_lib
from retro_jax.convert import cli as convert_cli
from retro_jax.models.encoder import Encoder
from retro_jax.models import registry
from retro_jax.models import vit
from retro_jax.models.heads import DINOHead
from retro_jax.models.vit import VisionTransformer
from retro_jax.objectives import rob_ibot
from retro_jax.train import rob_ibot_method
from retro_jax.train.multicrop_methods import MultiCropMethod

CONFIG = str(pathlib.Path(__file__).parents[2] / "configs" / "rob_ibot_vit_small.py")
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


# The :smoke run's networks at 2 of their 12 blocks (same widths, heads and wiring), registered
# for this module only: the full depths compiled for ~5 minutes on the loaded 2-core CPU.
SHALLOW = {"vit_tiny_patch16_2blocks": "vit_tiny_patch16",
           "vit_small_patch16_2blocks": "vit_small_patch16"}


def _shallow(name):
  return lambda *, rngs, **kwargs: VisionTransformer(
      **{**vit.ARCHITECTURES[name], "depth": 2}, rngs=rngs, **kwargs)


@pytest.fixture(scope="module")
def converted_teacher(tmp_path_factory) -> pathlib.Path:
  """The :smoke teacher's shape (ViT-Tiny at 32 px, 2 blocks, a 64-prototype head) written in
  iBOT's layout from iBOT's code and converted through the CLI."""
  registry.backbone_names()  # every family registered before the test-only names are added
  with pytest.MonkeyPatch.context() as patch:
    for name, full in SHALLOW.items():
      patch.setitem(registry._BACKBONES, name, _shallow(full))  # pylint: disable=protected-access
    torch.manual_seed(0)
    network = ibot_reference.randomise(ibot_reference.IBOTNetwork(
        img_size=32, depth=2, out_dim=64, hidden_dim=256, bottleneck_dim=64), seed=1)
    folder = tmp_path_factory.mktemp("ibot_smoke")
    ibot_reference.save_ibot_checkpoint(folder / "checkpoint.pth", network)
    assert convert_cli.main(["--src", str(folder / "checkpoint.pth"), "--format", "ibot",
                             "--arch", "vit_tiny_patch16_2blocks", "--out",
                             str(folder / "teacher")]) == 0
    yield folder / "teacher"


# ~50 s on the 2-core CPU (under load: ~2 minutes): convert, then two training steps.
@pytest.mark.slow
def test_smoke_recipe_trains_from_a_converted_ibot_teacher(converted_teacher, fashion_mnist_tfds,
                                                           tmp_path, capsys):
  workdir = tmp_path / "run"
  assert main_lib.main(["--config", f"{CONFIG}:smoke", "--workdir", str(workdir),
                        f"--config.data.data_dir={fashion_mnist_tfds}",
                        f"--config.teacher.checkpoint={converted_teacher}",
                        "--config.student.name=vit_small_patch16_2blocks",
                        "--config.total_steps=2", "--config.monitor.every_steps=0"]) == 0
  assert "step 2/2" in capsys.readouterr().out
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert len(records) == 2
  for record in records:
    assert np.isclose(record["loss"], record["cls_loss"] + record["patch_loss"], rtol=1e-5)
    assert 0.0 <= record["masked_fraction"] <= 0.5
  _, description = checkpoint.load_model(workdir / "student")
  assert description["source"]["method"] == "rob_ibot"
  assert description["encoder"]["architecture"] == "vit_small_patch16_2blocks"
  assert description["encoder"]["head_kind"] == "dino"


OBJECTIVE = rob_ibot.Config(num_prototypes=64, pred_ratio_mean=(0.4,), pred_ratio_var=(0.0,),
                            mask_aspect_sampling="ibot")


def one_block_vit():
  """ViT-Tiny's width with one block at 64 px: the wiring, at a fraction of the compile."""
  return VisionTransformer(embed_dim=192, depth=1, num_heads=3, img_size=64, rngs=nnx.Rngs(0))


def method(kind="ibot"):
  return MultiCropMethod("rob_ibot", OBJECTIVE, "vit_tiny_patch16", {"img_size": 64},
                         head={"kind": kind, "hidden_features": 64, "bottleneck_features": 32})


@pytest.fixture(scope="module")
def small_teacher():
  teacher = Encoder(one_block_vit(), DINOHead(192, 64, hidden_features=64,
                                              bottleneck_features=32, rngs=nnx.Rngs(3)))
  teacher.eval()
  return teacher


def test_masked_patches_take_the_mask_token_and_it_learns(small_teacher):
  model = rob_ibot_method.build(one_block_vit(), small_teacher, method().head, OBJECTIVE,
                                rngs=nnx.Rngs(1))
  views = [jax.random.normal(jax.random.key(i), (2, 64, 64, 3)) for i in range(2)]
  views += [jax.random.normal(jax.random.key(9), (2, 32, 32, 3))]
  graphdef, trainable, rest = nnx.split(model, method().trainable_filter(), ...)

  def loss(trainable):
    model = nnx.merge(graphdef, trainable, rest, copy=True)
    value, metrics, _ = method().loss(model, small_teacher, views,
                                      method().init_state(None), step=0, key=jax.random.key(5))
    return value, metrics

  grads, metrics = jax.jit(jax.grad(loss, has_aux=True))(trainable)
  # 0.4 of the 16 patches per global crop asked for, in blocks: at most 6 each.
  assert 0.0 < float(metrics["masked_fraction"]) <= 6 / 16
  assert float(jnp.abs(grads["mask_token"][...]).sum()) > 0  # only masked patches reach it
  for part in ("backbone", "head"):
    assert float(jnp.abs(jax.tree.leaves(grads[part])[0]).sum()) > 0, part
  # The head is exported as a DINO head that rebuilds; the mask token stays behind.
  _, kind, kwargs = method().export_head(model)
  assert kind == "dino" and kwargs["norm_last_layer"] is False and kwargs["out_features"] == 64


def test_wrong_teachers_and_heads_are_named(small_teacher):
  head = method().head
  with pytest.raises(ValueError, match="objective.num_prototypes is 8192"):
    rob_ibot_method.build(one_block_vit(), small_teacher, head, rob_ibot.Config(),
                          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="needs an iBOT teacher"):
    rob_ibot_method.build(one_block_vit(), None, head, OBJECTIVE, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="student.head.kind"):
    rob_ibot_method.build(one_block_vit(), small_teacher, method("mlp").head, OBJECTIVE,
                          rngs=nnx.Rngs(0))
  model = rob_ibot_method.build(one_block_vit(), small_teacher, method("distillation").head,
                                OBJECTIVE, rngs=nnx.Rngs(0))
  _, kind, kwargs = method("distillation").export_head(model)
  assert kind == "mlp" and kwargs == {"dims": [192, 64, 64, 64], "activation": "gelu"}


def test_recipe_carries_vissls_ibot_distillation_config():
  """configs/rob_ibot_vit_small.py against `ibot_distill_deit_b16_to_deit_s16_on_in1k.yaml`."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("rob_ibot_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert (config.method, config.epochs, config.global_batch_size) == ("rob_ibot", 100, 1024)
  assert config.student.name == "vit_small_patch16"
  assert config.student.kwargs.drop_path_rate == 0.1
  assert config.student.head.to_dict() == {"kind": "ibot", "hidden_features": 2048,
                                           "bottleneck_features": 256, "norm_last_layer": False}
  objective = rob_ibot.Config(**config.objective)
  assert (objective.num_prototypes, objective.centering, objective.swapped_assignment) == (
      8192, False, False)
  crops = [view.crop for view in config.data.augmentation.views]
  assert [c.size for c in crops] == [224] * 2 + [96] * 10
  assert tuple(crops[0].scale) == (0.25, 1.0) and tuple(crops[2].scale) == (0.05, 0.25)
  optimizer = config.optimizer
  assert (optimizer.name, optimizer.lr * 1024 / 256, optimizer.warmup_epochs,
          optimizer.warmup_start_lr, optimizer.min_lr, optimizer.weight_decay,
          optimizer.weight_decay_end) == ("adamw", 2e-3, 10, 1e-5, 1e-5, 0.04, 0.48)
  smoke = module.get_config("smoke")
  assert smoke.teacher.random_spec.head_kwargs.out_features == smoke.objective.num_prototypes

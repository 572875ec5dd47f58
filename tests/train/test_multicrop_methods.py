"""DINO / RoB wiring details and the teacher's precision and batch-norm modes.

The loss equations are tested against NumPy in tests/objectives; the configs train end to end
in tests/train/test_engine.py. Here: crop grouping, MSN token dropping, DINO's early freezing
of the head's last layer (in the optimiser), head checks, and the teacher settings of
retro_jax/train/teacher.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder
from retro_jax.models.heads import DINOHead
from retro_jax.objectives import dino
from retro_jax.objectives import rob_dino
from retro_jax.objectives import rob_msn
from retro_jax.train import optim
from retro_jax.train import teacher as teacher_lib
from retro_jax.train.multicrop_methods import MultiCropMethod
from retro_jax.train.multicrop_methods import _size_groups
from retro_jax.train.multicrop_methods import drop_patch_tokens


def test_crops_of_one_size_run_together():
  views = [jnp.zeros((2, s, s, 3)) for s in (32, 32, 16, 16, 16)]
  assert _size_groups(views) == [(0, 2), (2, 5)]
  assert _size_groups(views[:1]) == [(0, 1)]


def test_token_drop_keeps_class_token_and_shares_one_permutation():
  batch, patches, dim = 3, 10, 4
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 1 + patches, dim)),
                       jnp.float32)
  kept = np.asarray(drop_patch_tokens(tokens, 0.15, jax.random.key(1)))
  assert kept.shape == (batch, 1 + int(patches * 0.85), dim)  # floor(10 * 0.85) = 8
  np.testing.assert_array_equal(kept[:, 0], np.asarray(tokens[:, 0]))
  # Every kept token is an original patch token, at the same positions for every example.
  positions = [int(np.argmin(np.abs(np.asarray(tokens[0, 1:]) - row).sum(-1))) + 1
               for row in kept[0, 1:]]
  assert len(set(positions)) == len(positions)
  np.testing.assert_array_equal(kept, np.asarray(tokens)[:, [0] + positions])
  with pytest.raises(ValueError, match="leaves no patch"):
    drop_patch_tokens(tokens[:, :2], 0.5, jax.random.key(0))


class _HeadOnly(nnx.Module):

  def __init__(self):
    self.head = DINOHead(8, 16, hidden_features=8, bottleneck_features=4,
                         norm_last_layer=False, rngs=nnx.Rngs(0))


def test_dino_last_layer_waits_in_the_optimizer_for_the_first_epochs():
  """DINO's cancel_gradients_last_layer as `early_freeze`: the optimiser skips the last
  layer's tensors (retro_jax/train/freeze.py; against torch in tests/train/test_freeze.py)."""
  method = MultiCropMethod("dino", dino.Config(), "vit_tiny_patch16",
                           head={"out_features": 16}, steps_per_epoch=3,
                           freeze_last_layer_epochs=1)
  freeze = method.early_freeze
  assert freeze.steps == 3
  params = nnx.state(_HeadOnly(), nnx.Param)
  flat, _ = jax.tree_util.tree_flatten_with_path(freeze.mask(params))
  assert {optim.parameter_name(path) for path, waits in flat if waits} == {
      "head.last_layer.weight_v", "head.last_layer.weight_g"}

  config = dict(optim.recipe_config("dino"), warmup_epochs=0)
  tx, _ = optim.build_optimizer(config, steps_per_epoch=3, total_steps=12,
                                global_batch_size=256, freeze=freeze)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
  state, current = tx.init(params), params
  for it in range(4):
    updates, state = step(current, state)
    current = optax.apply_updates(current, updates)
    for name, before, after in ((n, params["head"][n], current["head"][n])
                                for n in ("mlp", "last_layer")):
      unchanged = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                           jax.tree.leaves(after)))
      assert unchanged == (name == "last_layer" and it < 3), (name, it)
  assert MultiCropMethod("dino", dino.Config(), "vit_tiny_patch16",
                         head={"out_features": 16}).early_freeze is None


def _vit_teacher(head_kind, head_kwargs):
  spec = EncoderSpec("vit_tiny_patch16", {"img_size": 32}, head_kind, head_kwargs)
  return build_encoder(spec, rngs=nnx.Rngs(0))


def test_rob_students_need_the_matching_teacher_head():
  msn_teacher = _vit_teacher("msn", {"in_features": 192, "num_prototypes": 8,
                                     "hidden_features": 16, "out_features": 8})
  method = MultiCropMethod("rob_dino", rob_dino.Config(), "vit_tiny_patch16",
                           student_kwargs={"img_size": 32})
  with pytest.raises(ValueError, match="DINO teacher"):
    method.build(msn_teacher, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="token dropping needs a ViT"):
    MultiCropMethod("rob_dino", rob_dino.Config(), "resnet18",
                    token_drop_ratio=0.1).build(msn_teacher, rngs=nnx.Rngs(0))
  dino_teacher = _vit_teacher("dino", {"in_features": 192, "out_features": 32,
                                       "hidden_features": 16, "bottleneck_features": 8})
  student = method.build(dino_teacher, rngs=nnx.Rngs(0))
  assert student.head.out_features == 32  # onto the teacher's prototypes


def _teacher_config(**teacher):
  return ml_collections.ConfigDict({
      "method": "retro", "seed": 0,
      "teacher": {"checkpoint": "", "dtype": "float32", "bn_mode": "eval", "random_spec": dict(
          architecture="resnet18", backbone_kwargs={"low_res_stem": True}, head_kind="mlp",
          head_kwargs={"dims": [512, 64, 16]}), **teacher}})


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)


def _embed(teacher, state, images):
  graphdef, _ = nnx.split(teacher)
  model = nnx.merge(graphdef, state)
  return model(teacher_lib.as_input(model, images)).embedding.astype(jnp.float32)


def test_bfloat16_teacher_is_stored_and_run_in_bfloat16(images):
  teacher, _ = teacher_lib.load_teacher(_teacher_config(), needs_teacher=True)
  state = nnx.state(teacher)
  reference = _embed(teacher, state, images)
  half = teacher_lib.cast_state(state, "bfloat16")
  graphdef, _ = nnx.split(teacher)
  merged = nnx.merge(graphdef, half)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(merged, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)}
  assert teacher_lib.compute_dtype(merged) == jnp.bfloat16
  out = merged.backbone(teacher_lib.as_input(merged, images)).pooled
  assert out.dtype == jnp.bfloat16  # not promoted back to float32
  got = _embed(teacher, half, images)
  error = float(jnp.linalg.norm(got - reference) / jnp.linalg.norm(reference))
  assert 0.0 < error < 0.05


def test_batch_mode_teacher_uses_batch_statistics_and_keeps_its_running_ones(images):
  eval_teacher, _ = teacher_lib.load_teacher(_teacher_config(), needs_teacher=True)
  batch_teacher, _ = teacher_lib.load_teacher(_teacher_config(bn_mode="batch"),
                                              needs_teacher=True)
  before = jax.tree.map(np.asarray, nnx.state(batch_teacher, nnx.BatchStat))
  train_copy = nnx.clone(eval_teacher)
  train_copy.train()
  expected = train_copy(images).embedding
  graphdef, state = nnx.split(batch_teacher)

  @jax.jit
  def forward(state, images):  # as in the train step: merged, run, discarded
    return nnx.merge(graphdef, state, copy=True)(images).embedding

  got = forward(state, images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)
  assert not np.allclose(np.asarray(got), np.asarray(eval_teacher(images).embedding))
  after = jax.tree.map(np.asarray, nnx.state(batch_teacher, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("teacher, message", [(dict(dtype="float16"), "teacher.dtype"),
                                              (dict(bn_mode="train"), "teacher.bn_mode")])
def test_unknown_teacher_settings_are_refused(teacher, message):
  with pytest.raises(teacher_lib.TeacherConfigError, match=message):
    teacher_lib.load_teacher(_teacher_config(**teacher), needs_teacher=True)


def test_rob_msn_loss_with_a_bfloat16_teacher_matches_float32():
  teacher = _vit_teacher("msn", {"in_features": 192, "num_prototypes": 16,
                                 "hidden_features": 32, "out_features": 8})
  teacher.eval()
  method = MultiCropMethod("rob_msn", rob_msn.Config(num_prototypes=16), "vit_tiny_patch16",
                           student_kwargs={"img_size": 32}, head={"hidden_features": 32},
                           token_drop_ratio=0.25)
  student = method.build(teacher, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  views = tuple(jnp.asarray(rng.normal(size=(2, s, s, 3)), jnp.float32)
                for s in (32, 32, 16, 16))
  graphdef, state = nnx.split(teacher)
  losses = {}
  for dtype in ("float32", "bfloat16"):
    merged = nnx.merge(graphdef, teacher_lib.cast_state(state, dtype))
    loss, metrics, _ = method.loss(student, merged, views, rob_msn.init_state(),
                                   step=jnp.asarray(0), key=jax.random.key(0))
    losses[dtype] = float(loss)
    assert np.isfinite(float(metrics["teacher_entropy"]))
  assert losses["bfloat16"] != losses["float32"]
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)

"""RoB-SwAV's wiring on the engine (retro_jax/train/multicrop_methods.py): the student head of
each variant, the teacher it needs, and which crops and prototypes reach the objective. The
loss itself is checked against VISSL in tests/objectives/test_rob_swav.py; the :smoke config
trains from a converted teacher in tests/train/test_engine.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder
from retro_jax.models.encoder import build_encoder
from retro_jax.models.heads import MLPHead
from retro_jax.models.heads import SwAVHead
from retro_jax.objectives import rob_swav
from retro_jax.train.multicrop_methods import MultiCropMethod

_SWAV_HEAD = {"in_features": 64, "num_prototypes": 12, "hidden_features": 16, "out_features": 8}
TEACHER = EncoderSpec("resnet18", {"width": 8}, "swav", _SWAV_HEAD)


def _method(**objective):
  return MultiCropMethod("rob_swav", rob_swav.Config(num_prototypes=12, **objective),
                         "resnet18", {"width": 8}, head={"hidden_features": 16})


@pytest.mark.parametrize("use_teacher_prototypes", [True, False])
def test_student_head_of_each_variant(use_teacher_prototypes):
  teacher = abstract_encoder(TEACHER)
  model = nnx.eval_shape(lambda: _method(use_teacher_prototypes=use_teacher_prototypes).build(
      teacher, rngs=nnx.Rngs(0)))
  head = model.head
  if use_teacher_prototypes:  # VISSL's `mlp` [64, 16, 8]: Linear, BN, Linear, no ReLU
    assert isinstance(head, MLPHead) and head.out_features == 8
    assert [type(getattr(head, n)).__name__ for n in head._order] == [
        "Linear", "BatchNorm", "Linear"]
  else:  # its own SwAV head and 12 prototypes
    assert isinstance(head, SwAVHead) and head.prototypes.kernel.shape == (8, 12)


def test_a_teacher_without_a_swav_head_or_with_other_prototypes_is_refused():
  mlp_teacher = abstract_encoder(EncoderSpec("resnet18", {"width": 8}, "mlp",
                                             {"dims": [64, 16, 8]}))
  with pytest.raises(ValueError, match="needs a SwAV teacher"):
    nnx.eval_shape(lambda: _method().build(mlp_teacher, rngs=nnx.Rngs(0)))
  other = abstract_encoder(EncoderSpec("resnet18", {"width": 8}, "swav",
                                       dict(_SWAV_HEAD, num_prototypes=10)))
  with pytest.raises(ValueError, match="the teacher has 10 prototypes"):
    nnx.eval_shape(lambda: _method().build(other, rngs=nnx.Rngs(0)))


def test_teacher_scores_its_first_crop_and_lends_its_prototypes():
  """The main config: the teacher sees crop 0 only (two crops: the objective's tests)."""
  method = _method()
  teacher = build_encoder(TEACHER, rngs=nnx.Rngs(1))
  teacher.eval()
  model = method.build(teacher, rngs=nnx.Rngs(0))
  model.train()
  rng = np.random.default_rng(0)
  views = [jnp.asarray(rng.normal(size=(4, s, s, 3)), jnp.float32) for s in (16, 16, 8, 8)]

  @nnx.jit
  def both(model, teacher):
    value, metrics, _ = method.loss(model, teacher, views, method.init_state(None), step=0,
                                    key=jax.random.key(0))
    student = method._outputs(model.backbone, model.head, views)  # pylint: disable=protected-access
    scores = teacher.head(teacher.backbone(views[0]).pooled)[None]
    expected, _, _ = rob_swav.loss(rob_swav.init_state(), student, scores,
                                   teacher.head.prototype_matrix(), config=method.objective)
    return value, expected, metrics

  value, expected, metrics = both(model, teacher)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert set(metrics) == {"loss", "code_entropy"}

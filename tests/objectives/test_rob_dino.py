"""RoB-DINO against a NumPy transcription of VISSL's DINODistillationCriterion."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.objectives import dino
from retro_jax.objectives import rob_dino
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec


def test_crop_pairs():
  same_view = dino.crop_pairs(2, 10, swapped=False)
  assert same_view[:9] == ((0, 0),) + tuple((0, v) for v in range(2, 10))
  assert same_view[9:] == ((1, 1),) + tuple((1, v) for v in range(2, 10))
  swapped = dino.crop_pairs(2, 10, swapped=True)
  assert set(swapped) == {(i, v) for i in (0, 1) for v in range(10) if v != i}
  assert len(same_view) == len(swapped) == 18  # 2 (V - 1)
  assert dino.crop_pairs(2, 2, swapped=False) == ((0, 0), (1, 1))  # no local crops
  with pytest.raises(ValueError, match="no crop pairs"):
    dino.crop_pairs(1, 1, swapped=True)


def test_defaults():
  config = rob_dino.Config()
  assert (config.teacher_temperature, config.student_temperature,
          config.swapped_assignment) == (0.07, 0.1, False)


@pytest.mark.parametrize("swapped", [False, True])
def test_loss_matches_vissl(rng, swapped):
  num_crops, batch, out_dim = 6, 4, 16
  student = rng.normal(size=(num_crops, batch, out_dim)) * 2.0
  teacher = rng.normal(size=(2, batch, out_dim)) * 2.0
  config = rob_dino.Config(swapped_assignment=swapped)
  state = rob_dino.init_state()
  loss, metrics, new_state = rob_dino.loss(state, jnp.asarray(student, jnp.float32),
                                           jnp.asarray(teacher, jnp.float32), config=config)
  expected = ref.vissl_criterion(
      student.reshape(-1, out_dim), ref.softmax(teacher.reshape(-1, out_dim) / 0.07),
      student_temperature=0.1, student_num_crops=num_crops, teacher_num_crops=2,
      swapped_assignment=swapped)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert new_state == state and jax.tree.leaves(new_state) == []
  probs = ref.softmax(teacher / 0.07)
  np.testing.assert_allclose(metrics["teacher_entropy"],
                             np.mean(-np.sum(probs * np.log(probs), -1)), rtol=1e-4)


def test_no_centring_same_view_pairs_differ_from_dino(rng):
  student = jnp.asarray(rng.normal(size=(4, 4, 16)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)
  same, _, _ = rob_dino.loss(rob_dino.init_state(), student, teacher)
  crossed, _, _ = rob_dino.loss(rob_dino.init_state(), student, teacher,
                                config=rob_dino.Config(swapped_assignment=True))
  assert abs(float(same) - float(crossed)) > 1e-4
  # DINO with a zero centre, no warm-up and the same temperatures is the swapped RoB loss.
  dino_config = dino.Config(warmup_teacher_temperature_epochs=0)
  dino_loss, _, _ = dino.loss(dino.init_state(16), student, teacher, 0, config=dino_config)
  np.testing.assert_allclose(dino_loss, crossed, rtol=1e-6)


def test_no_gradient_into_teacher(rng):
  student = jnp.asarray(rng.normal(size=(4, 4, 16)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)
  g_student, g_teacher = jax.jit(jax.grad(
      lambda s, t: rob_dino.loss(rob_dino.init_state(), s, t)[0], argnums=(0, 1)))(
          student, teacher)
  np.testing.assert_array_equal(g_teacher, 0.0)
  assert float(jnp.abs(g_student).sum()) > 0


def test_sharded_batch_matches_unsharded(rng, data_mesh):
  student = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
  loss_fn = ref.with_aux(functools.partial(rob_dino.loss, config=rob_dino.Config()))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))
  (loss, _), grad = step(rob_dino.init_state(), student, teacher)
  crops = lambda x: ref.put(x, data_mesh, P(None, "data"))
  (s_loss, _), s_grad = step(rob_dino.init_state(), crops(student), crops(teacher))
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(s_grad, grad, rtol=1e-5, atol=1e-8)

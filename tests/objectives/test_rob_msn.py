"""RoB-MSN against a NumPy transcription of VISSL's MSNDistillationLoss and its msn_head targets."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.objectives import rob_msn
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec


def numpy_msn_teacher(z, prototypes, temperature=0.025):
  """msn_head's output: softmax(normalize(z) . normalize(C)^T / 0.025)."""
  return ref.softmax(ref.unit(z) @ ref.unit(prototypes).T / temperature)


def test_constants():
  assert rob_msn.TEACHER_TEMPERATURE == pytest.approx(0.1 * 0.25)  # MSN tau x sharpening T
  assert rob_msn.STUDENT_TEMPERATURE == 0.1 and rob_msn.NUM_PROTOTYPES == 1024
  assert rob_msn.TOKEN_DROP_RATIO == {"vit_small_patch16": 0.15, "vit_tiny_patch16": 0.10}
  config = rob_msn.Config()
  assert (config.student_temperature, config.num_prototypes,
          config.swapped_assignment) == (0.1, 1024, False)


@pytest.mark.parametrize("swapped", [False, True])
def test_loss_matches_vissl(rng, swapped):
  num_crops, batch, num_prototypes, dim = 5, 4, 16, 8
  prototypes = rng.normal(size=(num_prototypes, dim))
  teacher = np.stack([numpy_msn_teacher(rng.normal(size=(batch, dim)), prototypes)
                      for _ in range(2)])
  student = rng.normal(size=(num_crops, batch, num_prototypes)) * 2.0
  config = rob_msn.Config(num_prototypes=num_prototypes, swapped_assignment=swapped)
  loss, metrics, _ = rob_msn.loss(rob_msn.init_state(), jnp.asarray(student, jnp.float32),
                                  jnp.asarray(teacher, jnp.float32), config=config)
  expected = ref.vissl_criterion(
      student.reshape(-1, num_prototypes), teacher.reshape(-1, num_prototypes),
      student_temperature=0.1, student_num_crops=num_crops, teacher_num_crops=2,
      swapped_assignment=swapped)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert set(metrics) == {"loss", "teacher_entropy"}


def test_prototype_count_mismatch_is_an_error():
  with pytest.raises(ValueError, match="must both cover the 1024 prototypes"):
    rob_msn.loss(rob_msn.init_state(), jnp.zeros((4, 2, 16)), jnp.full((2, 2, 16), 1 / 16))


def test_no_gradient_into_teacher(rng):
  config = rob_msn.Config(num_prototypes=16)
  student = jnp.asarray(rng.normal(size=(4, 4, 16)), jnp.float32)
  teacher = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32) / 0.025)
  g_student, g_teacher = jax.jit(jax.grad(
      lambda s, t: rob_msn.loss(rob_msn.init_state(), s, t, config=config)[0],
      argnums=(0, 1)))(student, teacher)
  np.testing.assert_array_equal(g_teacher, 0.0)
  assert float(jnp.abs(g_student).sum()) > 0


def test_sharded_batch_matches_unsharded(rng, data_mesh):
  config = rob_msn.Config(num_prototypes=16)
  student = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
  teacher = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32) / 0.025)
  loss_fn = ref.with_aux(functools.partial(rob_msn.loss, config=config))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))
  (loss, _), grad = step(rob_msn.init_state(), student, teacher)
  crops = lambda x: ref.put(x, data_mesh, P(None, "data"))
  (s_loss, _), s_grad = step(rob_msn.init_state(), crops(student), crops(teacher))
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(s_grad, grad, rtol=1e-5, atol=1e-8)

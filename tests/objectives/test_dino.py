"""DINO against a NumPy transcription of main_dino.py's DINOLoss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.objectives import dino
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec


class NumpyDINOLoss:
  """DINOLoss of facebookresearch/dino, crops concatenated along the batch as there."""

  def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
               warmup_teacher_temp_epochs, nepochs, student_temp=0.1, center_momentum=0.9):
    self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
    self.center = np.zeros((1, out_dim))
    self.teacher_temp_schedule = np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

  def forward(self, student_output, teacher_output, epoch):
    student_out = np.split(student_output / self.student_temp, self.ncrops)
    temp = self.teacher_temp_schedule[epoch]
    teacher_out = np.split(ref.softmax((teacher_output - self.center) / temp), 2)
    total_loss, n_loss_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
      for v in range(len(student_out)):
        if v == iq:
          continue
        total_loss += np.sum(-q * ref.log_softmax(student_out[v]), axis=-1).mean()
        n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = np.sum(teacher_output, axis=0, keepdims=True) / len(teacher_output)
    self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
    return total_loss


@pytest.mark.parametrize("warmup", [0, 1, 5, 30])
def test_teacher_temperature_follows_dino_table(warmup):
  nepochs = 40
  config = dino.Config(warmup_teacher_temperature_epochs=warmup)
  table = np.concatenate((np.linspace(0.04, 0.07, warmup), np.ones(nepochs - warmup) * 0.07))
  got = jax.vmap(lambda e: dino.teacher_temperature(e, config))(jnp.arange(nepochs))
  np.testing.assert_allclose(got, table, rtol=1e-6)
  assert float(dino.teacher_temperature(nepochs + 10, config)) == pytest.approx(0.07)


def test_defaults():
  config = dino.Config()
  assert (config.student_temperature, config.teacher_temperature,
          config.warmup_teacher_temperature, config.warmup_teacher_temperature_epochs,
          config.center_momentum) == (0.1, 0.07, 0.04, 30, 0.9)


def test_loss_and_centre_match_numpy_over_steps(rng):
  num_crops, batch, out_dim = 6, 4, 16  # 2 global + 4 local crops
  config = dino.Config(warmup_teacher_temperature_epochs=3)
  reference = NumpyDINOLoss(out_dim, num_crops, 0.04, 0.07, 3, 10)
  state = dino.init_state(out_dim)
  for epoch in (0, 1, 2, 7):  # warm-up and after; the centre carries over between steps
    student = rng.normal(size=(num_crops, batch, out_dim)) * 2.0
    teacher = rng.normal(size=(2, batch, out_dim)) * 2.0 + rng.normal(size=(out_dim,))
    expected = reference.forward(student.reshape(-1, out_dim), teacher.reshape(-1, out_dim),
                                 epoch)
    crops = [jnp.asarray(s, jnp.float32) for s in student]  # a list of crops works too
    loss, metrics, state = dino.loss(state, crops, jnp.asarray(teacher, jnp.float32), epoch,
                                     config=config)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(state.center, reference.center[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["teacher_temperature"],
                               reference.teacher_temp_schedule[epoch], rtol=1e-6)


def test_no_gradient_into_teacher_or_centre(rng):
  state = dino.State(center=jnp.asarray(rng.normal(size=(16,)), jnp.float32))
  student = jnp.asarray(rng.normal(size=(4, 4, 16)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)
  g_state, g_student, g_teacher = jax.jit(jax.grad(
      lambda s, x, t: dino.loss(s, x, t, 0)[0], argnums=(0, 1, 2)))(state, student, teacher)
  np.testing.assert_array_equal(g_teacher, 0.0)
  np.testing.assert_array_equal(g_state.center, 0.0)
  assert float(jnp.abs(g_student).sum()) > 0


def test_shape_errors(rng):
  with pytest.raises(ValueError, match="teacher outputs have 8 prototypes, the centre 16"):
    dino.loss(dino.init_state(16), jnp.zeros((4, 2, 8)), jnp.zeros((2, 2, 8)), 0)
  with pytest.raises(ValueError, match="1 <= teacher crops <= student crops"):
    dino.loss(dino.init_state(8), jnp.zeros((1, 2, 8)), jnp.zeros((2, 2, 8)), 0)
  with pytest.raises(ValueError, match="expected crops of shape"):
    dino.loss(dino.init_state(8), jnp.zeros((2, 8)), jnp.zeros((2, 2, 8)), 0)


def test_sharded_batch_matches_unsharded(rng, data_mesh):
  state = dino.State(center=jnp.asarray(rng.normal(size=(16,)), jnp.float32))
  student = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 8, 16)) + 1.0, jnp.float32)
  loss_fn = ref.with_aux(functools.partial(dino.loss, config=dino.Config()))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))
  (loss, (_, new_state)), grad = step(state, student, teacher, 3)
  crops = lambda x: ref.put(x, data_mesh, P(None, "data"))
  s_state = jax.tree.map(lambda x: ref.put(x, data_mesh, P()), state)
  (s_loss, (_, s_new_state)), s_grad = step(s_state, crops(student), crops(teacher), 3)
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(s_new_state.center, new_state.center, rtol=1e-6)
  np.testing.assert_allclose(s_grad, grad, rtol=1e-5, atol=1e-8)
  # The centre is the mean over the whole global batch (DINO's all_reduce), not one shard's.
  np.testing.assert_allclose(
      s_new_state.center, 0.9 * state.center + 0.1 * np.mean(teacher, axis=(0, 1)), rtol=1e-5)

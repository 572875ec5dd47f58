"""RoB-SwAV against a NumPy (float64) transcription of VISSL's SwAVDistillationLoss.

The transcription follows `vissl/losses/swav_distillation_loss.py` and
`vissl/losses/distibuted_sinkhornknopp.py` (commit 04788de9) line by line, with crops
concatenated along the batch as VISSL's heads output them; its gradient is written by hand
(softmax(s / T) - q) / T per pair, chained through the teacher's prototypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.objectives import rob_swav
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec


def vissl_sinkhorn(teacher_scores, epsilon, num_iters):
  """compute_teacher_assignements + distributed_sinkhornknopp (world size 1, float32 path)."""
  if num_iters == 0:
    return ref.softmax(teacher_scores / epsilon)
  assignments = teacher_scores / epsilon
  assignments = np.exp(assignments - assignments.max()).T
  q = assignments / assignments.sum()
  k, n = q.shape
  r, c = np.ones(k) / k, np.ones(n) / n
  for _ in range(num_iters):
    u = q.sum(axis=1)
    if np.any(u == 0):
      q = q + 1e-12
      u = q.sum(axis=1)
    u = r / u
    q = q * u[:, None]
    q = q * (c / q.sum(axis=0))[None, :]
  return (q / q.sum(axis=0, keepdims=True)).T


def vissl_loss(student_outputs, teacher_scores, teacher_prototypes, *, num_crops,
               temperature=0.1, epsilon=0.03, num_iters=3, swapped=False):
  """SwAVDistillationCriterion.forward; also returns d loss / d student_outputs."""
  batch = student_outputs.shape[0] // num_crops
  num_assign = teacher_scores.shape[0] // batch
  scores = student_outputs if teacher_prototypes is None else (
      student_outputs @ teacher_prototypes.T)
  grad_scores = np.zeros_like(scores)
  loss = 0.0
  for i in range(num_assign):
    assignments = vissl_sinkhorn(teacher_scores[i * batch:(i + 1) * batch], epsilon, num_iters)
    if num_assign == 1:
      crop_ids = list(range(1 if swapped else 0, num_crops))
    elif swapped:
      crop_ids = [p for p in range(num_crops) if p != i]
    else:
      crop_ids = [i] + list(range(2, num_crops))
    crop_loss = 0.0
    for p in crop_ids:
      crop_scores = scores[batch * p:batch * (p + 1)] / temperature
      crop_loss -= np.mean(np.sum(assignments * ref.log_softmax(crop_scores), axis=1))
      grad_scores[batch * p:batch * (p + 1)] += (
          (ref.softmax(crop_scores) - assignments) / temperature
          / (batch * len(crop_ids) * num_assign))
    loss += crop_loss / len(crop_ids)
  grad = grad_scores if teacher_prototypes is None else grad_scores @ teacher_prototypes
  return loss / num_assign, grad


def _case(rng, num_crops=4, num_teacher=1, batch=6, num_prototypes=12, dim=5):
  prototypes = ref.unit(rng.normal(size=(num_prototypes, dim))) * 1.1  # as stored, not unit
  teacher = ref.unit(rng.normal(size=(num_teacher, batch, dim))) @ prototypes.T
  student = rng.normal(size=(num_crops, batch, dim))
  return student, teacher, prototypes


def _jax_loss_and_grad(student, teacher, prototypes, config):
  fn = ref.with_aux(functools.partial(rob_swav.loss, config=config))
  (value, (metrics, _)), grad = jax.value_and_grad(fn, argnums=1, has_aux=True)(
      rob_swav.init_state(), jnp.asarray(student, jnp.float32),
      jnp.asarray(teacher, jnp.float32),
      None if prototypes is None else jnp.asarray(prototypes, jnp.float32))
  return value, grad, metrics


def test_defaults_are_the_main_config():
  config = rob_swav.Config()
  assert (config.temperature, config.epsilon, config.num_iters, config.num_prototypes) == (
      0.1, 0.03, 3, 3000)
  assert config.use_teacher_prototypes and not config.use_two_crops_for_teacher
  assert not config.normalize_student_feats and not config.swapped_assignment
  assert config.num_teacher_crops == 1


@pytest.mark.parametrize("num_teacher, swapped, num_iters, own_prototypes", [
    (1, False, 3, False),  # the main config
    (1, True, 3, False),
    (2, False, 3, False),  # VISSL's default use_two_crops_for_teacher
    (2, True, 0, False),   # no Sinkhorn: softmax(t / eps)
    (2, False, 3, True),   # student/resnet*_swav.yaml: its own prototypes
])
def test_loss_and_gradient_match_vissl(rng, num_teacher, swapped, num_iters, own_prototypes):
  student, teacher, prototypes = _case(rng, num_teacher=num_teacher)
  if own_prototypes:  # the student hands over its own prototype scores
    student = student @ rng.normal(size=(5, 12))
  config = rob_swav.Config(num_prototypes=12, num_iters=num_iters, swapped_assignment=swapped,
                           use_teacher_prototypes=not own_prototypes,
                           use_two_crops_for_teacher=num_teacher == 2)
  given = None if own_prototypes else prototypes
  value, grad, metrics = _jax_loss_and_grad(student, teacher, given, config)
  expected, expected_grad = vissl_loss(
      student.reshape(-1, student.shape[-1]), teacher.reshape(-1, 12), given, num_crops=4,
      num_iters=num_iters, swapped=swapped)
  np.testing.assert_allclose(value, expected, rtol=2e-5)
  np.testing.assert_allclose(grad, expected_grad.reshape(grad.shape), rtol=2e-4, atol=1e-7)
  assert set(metrics) == {"loss", "code_entropy"}


def test_sinkhorn_balances_the_prototypes(rng):
  scores = ref.unit(rng.normal(size=(16, 5))) @ ref.unit(rng.normal(size=(8, 5))).T
  codes = np.asarray(rob_swav.sinkhorn_knopp(jnp.asarray(scores, jnp.float32), epsilon=0.03,
                                             num_iters=3))
  np.testing.assert_allclose(codes, vissl_sinkhorn(scores, 0.03, 3), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)
  # Iterated to convergence, every prototype holds 1/K of the batch's mass.
  balanced = rob_swav.sinkhorn_knopp(jnp.asarray(scores, jnp.float32), epsilon=0.3,
                                     num_iters=100)
  np.testing.assert_allclose(np.sum(balanced, axis=0) / 16, 1 / 8, rtol=1e-3)


def test_normalize_student_feats(rng):
  student, teacher, prototypes = _case(rng)
  config = rob_swav.Config(num_prototypes=12, normalize_student_feats=True)
  value, _, _ = _jax_loss_and_grad(student, teacher, prototypes, config)
  expected, _ = vissl_loss(ref.unit(student).reshape(-1, 5), teacher.reshape(-1, 12),
                           prototypes, num_crops=4)
  np.testing.assert_allclose(value, expected, rtol=2e-5)


def test_no_gradient_into_teacher_scores_or_prototypes(rng):
  student, teacher, prototypes = (jnp.asarray(x, jnp.float32) for x in _case(rng))
  config = rob_swav.Config(num_prototypes=12)
  grads = jax.jit(jax.grad(
      lambda s, t, c: rob_swav.loss(rob_swav.init_state(), s, t, c, config=config)[0],
      argnums=(0, 1, 2)))(student, teacher, prototypes)
  np.testing.assert_array_equal(grads[1], 0.0)
  np.testing.assert_array_equal(grads[2], 0.0)
  assert float(jnp.abs(grads[0]).sum()) > 0


@pytest.mark.parametrize("config, prototypes_shape, message", [
    (rob_swav.Config(num_prototypes=10), (12, 5), "config.num_prototypes is 10"),
    (rob_swav.Config(num_prototypes=12), None, "needs the teacher's prototypes"),
    (rob_swav.Config(num_prototypes=12), (12, 4), "do not score student outputs of width 5"),
    (rob_swav.Config(num_prototypes=12, use_teacher_prototypes=False), None, "width 5"),
])
def test_mismatched_widths_are_errors(config, prototypes_shape, message):
  prototypes = None if prototypes_shape is None else jnp.zeros(prototypes_shape)
  with pytest.raises(ValueError, match=message):
    rob_swav.loss(rob_swav.init_state(), jnp.zeros((4, 2, 5)), jnp.zeros((1, 2, 12)),
                  prototypes, config=config)


def test_bad_config_values_are_errors():
  with pytest.raises(ValueError, match="num_iters"):
    rob_swav.Config(num_iters=-1)
  with pytest.raises(ValueError, match="epsilon"):
    rob_swav.Config(epsilon=0.0)


@pytest.mark.parametrize("num_teacher", [1, 2])
def test_sharded_batch_matches_unsharded(rng, data_mesh, num_teacher):
  student, teacher, prototypes = (jnp.asarray(x, jnp.float32) for x in _case(
      rng, num_teacher=num_teacher, batch=16))
  config = rob_swav.Config(num_prototypes=12, use_two_crops_for_teacher=num_teacher == 2)
  loss_fn = ref.with_aux(functools.partial(rob_swav.loss, config=config))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))
  (loss, _), grad = step(rob_swav.init_state(), student, teacher, prototypes)
  crops = lambda x: ref.put(x, data_mesh, P(None, "data"))
  (s_loss, _), s_grad = step(rob_swav.init_state(), crops(student), crops(teacher),
                             ref.put(prototypes, data_mesh, P()))
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(s_grad, grad, rtol=1e-5, atol=1e-8)

"""RoB-iBOT against a NumPy transcription of VISSL's IBOTDistillationLoss.criterion (and, with
centring, iBOT's iBOTLoss.update_center): values, gradients, sharded == unsharded."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.objectives import rob_ibot
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec
GLOBAL, CROPS, BATCH, PATCHES, K = 2, 5, 4, 6, 16


def vissl_criterion(student_cls, student_patch, teacher_cls, teacher_patch, masks, *,
                    swapped, center=0.0, patch_center=0.0, student_temp=0.1, teacher_temp=0.07,
                    teacher_patch_temp=0.07, lambda1=1.0, lambda2=1.0):
  """`IBOTDistillationLoss.criterion` in float64 with its gradients in the student outputs.

  Inputs as VISSL's: crops concatenated along the batch (student_cls (V*B, K), the patches
  (G*B, N, K), masks (G*B, N)); `center`/`patch_center` are iBOT's (0: VISSL's RoB loss).

  Returns:
    (loss, cls_loss, patch_loss, d loss / d student_cls, d loss / d student_patch).
  """
  s_cls = np.split(student_cls / student_temp, CROPS)
  s_patch = np.split(student_patch / student_temp, GLOBAL)
  t_cls = np.split(ref.softmax((teacher_cls - center) / teacher_temp), GLOBAL)
  t_patch = np.split(ref.softmax((teacher_patch - patch_center) / teacher_patch_temp), GLOBAL)
  m = np.split(masks.astype(np.float64), GLOBAL)
  g_cls = [np.zeros_like(x) for x in s_cls]
  g_patch = [np.zeros_like(x) for x in s_patch]
  total1, n1, total2, n2 = 0.0, 0, 0.0, 0
  cls_terms, patch_terms = [], []
  for q in range(GLOBAL):
    for v in range(CROPS):
      if v == q:
        loss2 = np.sum(-t_patch[q] * ref.log_softmax(s_patch[v]), axis=-1)
        denominator = np.maximum(m[v].sum(-1), 1.0)
        total2 += (np.sum(loss2 * m[v], -1) / denominator).mean()
        n2 += 1
        patch_terms.append((q, v, denominator))
      if v >= GLOBAL or (swapped and v != q) or (not swapped and v == q):
        total1 += np.sum(-t_cls[q] * ref.log_softmax(s_cls[v]), axis=-1).mean()
        n1 += 1
        cls_terms.append((q, v))
  # d/ds of mean_b -sum p log_softmax(s / T) is (softmax(s / T) - p) / (T B).
  for q, v in cls_terms:
    g_cls[v] += lambda1 / n1 * (ref.softmax(s_cls[v]) - t_cls[q]) / (student_temp * BATCH)
  for q, v, denominator in patch_terms:
    weight = (m[v] / denominator[:, None])[..., None]
    g_patch[v] += lambda2 / n2 * weight * (ref.softmax(s_patch[v]) - t_patch[q]) / (
        student_temp * BATCH)
  cls_loss, patch_loss = total1 / n1 * lambda1, total2 / n2 * lambda2
  return (cls_loss + patch_loss, cls_loss, patch_loss, np.concatenate(g_cls),
          np.concatenate(g_patch))


def random_outputs(rng):
  student_cls = rng.normal(size=(CROPS, BATCH, K)) * 2.0
  student_patch = rng.normal(size=(GLOBAL, BATCH, PATCHES, K)) * 2.0
  teacher_cls = rng.normal(size=(GLOBAL, BATCH, K)) * 2.0 + rng.normal(size=(K,))
  teacher_patch = rng.normal(size=(GLOBAL, BATCH, PATCHES, K)) * 2.0 + rng.normal(size=(K,))
  masks = rng.random(size=(GLOBAL, BATCH, PATCHES)) < 0.4
  masks[0, 1] = False  # an unmasked image: its patch term is 0 (VISSL's clamp at 1)
  return student_cls, student_patch, teacher_cls, teacher_patch, masks


def flat(x, leading):
  return x.reshape(-1, *x.shape[leading:])


def test_defaults_are_vissls():
  config = rob_ibot.Config()
  assert (config.teacher_temperature, config.teacher_patch_temperature,
          config.student_temperature, config.lambda1, config.lambda2,
          config.swapped_assignment, config.centering) == (0.07, 0.07, 0.1, 1.0, 1.0, False,
                                                           False)
  assert (config.pred_ratio_mean, config.pred_ratio_var) == ((0.0, 0.3), (0.0, 0.2))
  with pytest.raises(ValueError, match="within"):
    rob_ibot.Config(pred_ratio_mean=(0.1,), pred_ratio_var=(0.2,))
  with pytest.raises(ValueError, match="mask_aspect_sampling"):
    rob_ibot.Config(mask_aspect_sampling="beit")


@pytest.mark.parametrize("swapped", [False, True])
def test_loss_and_gradients_match_vissl(rng, swapped):
  outputs = random_outputs(rng)
  s_cls, s_patch, t_cls, t_patch, masks = outputs
  config = rob_ibot.Config(swapped_assignment=swapped, lambda2=0.5)
  loss_fn = ref.with_aux(functools.partial(rob_ibot.loss, config=config))
  (loss, (metrics, state)), grads = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(1, 2), has_aux=True))(
          rob_ibot.init_state(K), *(jnp.asarray(x, jnp.float32) for x in outputs[:4]),
          jnp.asarray(masks))
  expected, cls_loss, patch_loss, g_cls, g_patch = vissl_criterion(
      flat(s_cls, 2), flat(s_patch, 2), flat(t_cls, 2), flat(t_patch, 2), flat(masks, 2),
      swapped=swapped, lambda2=0.5)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["cls_loss"], cls_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["patch_loss"], patch_loss, rtol=1e-5)
  np.testing.assert_allclose(flat(np.asarray(grads[0]), 2), g_cls, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(flat(np.asarray(grads[1]), 2), g_patch, rtol=1e-4, atol=1e-7)
  # No centring: the state does not move.
  np.testing.assert_array_equal(state.center, 0.0)
  np.testing.assert_array_equal(state.patch_center, 0.0)


def test_centring_follows_ibot_over_steps(rng):
  config = rob_ibot.Config(centering=True)
  state = rob_ibot.init_state(K)
  center, patch_center = np.zeros(K), np.zeros(K)
  loss_fn = jax.jit(functools.partial(rob_ibot.loss, config=config))
  for _ in range(3):  # the centres carry over between steps
    s_cls, s_patch, t_cls, t_patch, masks = random_outputs(rng)
    loss, _, state = loss_fn(state, *(jnp.asarray(x, jnp.float32) for x in (
        s_cls, s_patch, t_cls, t_patch)), jnp.asarray(masks))
    expected = vissl_criterion(flat(s_cls, 2), flat(s_patch, 2), flat(t_cls, 2),
                               flat(t_patch, 2), flat(masks, 2), swapped=False,
                               center=center, patch_center=patch_center)[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # iBOTLoss.update_center: sum over the batch (patches averaged first) / batch size.
    center = 0.9 * center + 0.1 * flat(t_cls, 2).sum(0) / (GLOBAL * BATCH)
    patch_center = 0.9 * patch_center + 0.1 * flat(t_patch, 2).mean(1).sum(0) / (
        GLOBAL * BATCH)
    np.testing.assert_allclose(state.center, center, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.patch_center, patch_center, rtol=1e-5, atol=1e-6)


def test_no_gradient_into_teacher_and_unmasked_patches(rng):
  s_cls, s_patch, t_cls, t_patch, masks = (jnp.asarray(x) for x in random_outputs(rng))
  grads = jax.jit(jax.grad(lambda *xs: rob_ibot.loss(rob_ibot.init_state(K), *xs, masks)[0],
                           argnums=(0, 1, 2, 3)))(*(x.astype(jnp.float32) for x in (
                       s_cls, s_patch, t_cls, t_patch)))
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)
  patch_grad_norm = np.abs(np.asarray(grads[1])).sum(-1)
  assert np.all(patch_grad_norm[~np.asarray(masks)] == 0)
  assert np.all(patch_grad_norm[np.asarray(masks)] > 0)


def test_sharded_batch_matches_unsharded(rng, data_mesh):
  s_cls, s_patch, t_cls, t_patch, masks = (
      jnp.asarray(x) for x in random_outputs(np.random.default_rng(1)))
  # 8 images per crop so that the batch axis splits over the 8 devices.
  s_cls, s_patch, t_cls, t_patch, masks = (jnp.concatenate([x, x[:, ::-1]], axis=1) for x in (
      s_cls, s_patch, t_cls, t_patch, masks))
  floats = [x.astype(jnp.float32) for x in (s_cls, s_patch, t_cls, t_patch)]
  config = rob_ibot.Config(centering=True)
  loss_fn = ref.with_aux(functools.partial(rob_ibot.loss, config=config))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(1, 2), has_aux=True))
  (loss, (_, state)), grads = step(rob_ibot.init_state(K), *floats, masks)
  put = lambda x: ref.put(x, data_mesh, P(None, "data"))
  (s_loss, (_, s_state)), s_grads = step(rob_ibot.init_state(K), *map(put, floats), put(masks))
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  for got, want in zip(s_grads, grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(s_state.center, state.center, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s_state.patch_center, state.patch_center, rtol=1e-6, atol=1e-7)

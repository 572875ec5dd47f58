"""Shared contrastive pieces: normalisation, InfoNCE, the queue, the EMA helpers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.objectives import contrastive
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec


def test_l2_normalize_matches_numpy_and_is_safe_at_zero(rng):
  x = rng.normal(size=(6, 16)).astype(np.float32)
  np.testing.assert_allclose(contrastive.l2_normalize(x), ref.unit(x), rtol=1e-6)
  assert np.all(np.isfinite(contrastive.l2_normalize(jnp.zeros((2, 4)))))


def test_init_queue_has_unit_rows_and_pointer_zero():
  state = contrastive.init_queue(jax.random.key(0), size=32, dim=8)
  assert state.queue.shape == (32, 8) and state.ptr.dtype == jnp.int32 and int(state.ptr) == 0
  np.testing.assert_allclose(np.linalg.norm(state.queue, axis=-1), 1.0, rtol=1e-6)


def test_info_nce_matches_numpy(rng):
  q, k = ref.unit(rng.normal(size=(8, 16))), ref.unit(rng.normal(size=(8, 16)))
  queue = ref.unit(rng.normal(size=(32, 16)))
  logits = contrastive.info_nce_logits(q.astype(np.float32), k.astype(np.float32),
                                       queue.astype(np.float32), 0.2)
  assert logits.shape == (8, 33)
  np.testing.assert_allclose(logits[:, 0], np.sum(q * k, -1) / 0.2, rtol=1e-5)
  loss, metrics = contrastive.info_nce(q.astype(np.float32), k.astype(np.float32),
                                       queue.astype(np.float32), 0.2)
  np.testing.assert_allclose(loss, ref.info_nce(q, k, queue, 0.2), rtol=1e-5)
  np_logits = np.concatenate([np.sum(q * k, -1, keepdims=True), q @ queue.T], -1)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(np_logits, -1) == 0))


def test_enqueue_writes_at_pointer_and_wraps(rng):
  queue = ref.unit(rng.normal(size=(16, 8)))
  state = contrastive.QueueState(jnp.asarray(queue, jnp.float32), jnp.asarray(8, jnp.int32))
  np_queue, np_ptr = queue, 8
  for _ in range(3):  # 8 -> 12 -> 0 (wrap) -> 4
    keys = ref.unit(rng.normal(size=(4, 8)))
    state = contrastive.enqueue(state, jnp.asarray(keys, jnp.float32))
    np_queue, np_ptr = ref.enqueue(np_queue, np_ptr, keys)
    np.testing.assert_allclose(state.queue, np_queue, rtol=1e-6)
    assert int(state.ptr) == np_ptr
  assert np_ptr == 4


@pytest.mark.parametrize("queue_size, batch", [(30, 8), (4, 8), (0, 8)])
def test_queue_not_a_multiple_of_the_batch_is_an_error(queue_size, batch):
  with pytest.raises(ValueError, match=f"queue size {queue_size} is not a multiple of the "
                     f"global batch {batch}"):
    contrastive.check_queue_size(queue_size, batch)
  if queue_size:
    state = contrastive.QueueState(jnp.zeros((queue_size, 4)), jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match="not a multiple"):
      contrastive.enqueue(state, jnp.ones((batch, 4)))
    with pytest.raises(ValueError, match="not a multiple"):  # at trace time, under jit too
      jax.jit(contrastive.enqueue)(state, jnp.ones((batch, 4)))


def test_enqueue_rejects_keys_of_another_width():
  state = contrastive.QueueState(jnp.zeros((16, 4)), jnp.zeros((), jnp.int32))
  with pytest.raises(ValueError, match="do not fit"):
    contrastive.enqueue(state, jnp.ones((4, 5)))


def test_sharded_keys_enqueue_like_unsharded(rng, data_mesh):
  queue = jnp.asarray(ref.unit(rng.normal(size=(32, 8))), jnp.float32)
  keys = jnp.asarray(ref.unit(rng.normal(size=(16, 8))), jnp.float32)
  state = contrastive.QueueState(queue, jnp.asarray(16, jnp.int32))
  expected = contrastive.enqueue(state, keys)
  sharded_state = contrastive.QueueState(ref.put(queue, data_mesh, P()),
                                         ref.put(state.ptr, data_mesh, P()))
  got = jax.jit(contrastive.enqueue)(sharded_state, ref.put(keys, data_mesh, P("data")))
  np.testing.assert_array_equal(got.queue, expected.queue)
  assert int(got.ptr) == 0
  # Keys sharded, queue an ordinary (uncommitted) array: still a replicated write.
  got = jax.jit(contrastive.enqueue)(state, ref.put(keys, data_mesh, P("data")))
  np.testing.assert_array_equal(got.queue, expected.queue)
  got = contrastive.enqueue(state, ref.put(keys, data_mesh, P("data")))  # eagerly
  np.testing.assert_array_equal(got.queue, expected.queue)


def test_ema_update_matches_numpy_and_rejects_integer_leaves(rng):
  ema = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
  params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
  as32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  got = contrastive.ema_update(as32(ema), as32(params))  # default m = 0.999
  for name in ema:
    np.testing.assert_allclose(got[name], 0.999 * ema[name] + 0.001 * params[name], rtol=1e-6)
    assert got[name].dtype == jnp.float32
  got = jax.jit(contrastive.ema_update)(as32(ema), as32(params), 0.5)
  np.testing.assert_allclose(got["w"], 0.5 * (ema["w"] + params["w"]), rtol=1e-6)
  with pytest.raises(TypeError, match="non-floating leaf at \\['step'\\]"):
    contrastive.ema_update({"step": jnp.zeros((), jnp.int32)}, {"step": jnp.ones((), jnp.int32)})


def test_cosine_momentum_follows_dino_schedule():
  total, base = 100, 0.996
  # DINO's utils.cosine_scheduler(base, 1, epochs, niter_per_ep) without warm-up.
  iters = np.arange(total)
  schedule = 1.0 + 0.5 * (base - 1.0) * (1 + np.cos(np.pi * iters / len(iters)))
  got = jax.vmap(lambda s: contrastive.cosine_momentum(s, total, base))(jnp.arange(total))
  np.testing.assert_allclose(got, schedule, rtol=1e-6)
  assert float(contrastive.cosine_momentum(0, total, base)) == pytest.approx(base)
  assert float(contrastive.cosine_momentum(total, total, base)) == pytest.approx(1.0)
  assert float(contrastive.cosine_momentum(5 * total, total, base)) == pytest.approx(1.0)
  assert float(contrastive.cosine_momentum(total // 2, total, base)) == pytest.approx(
      1.0 - (1.0 - base) * 0.5 * (1 + math.cos(math.pi / 2)))

"""MoCo-v2 against a NumPy transcription of MoCo's forward and _dequeue_and_enqueue."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.objectives import contrastive
from retro_jax.objectives import mocov2
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec
CONFIG = mocov2.Config(queue_size=32, embed_dim=16)


def _inputs(rng, batch=8, dim=16):
  return [jnp.asarray(rng.normal(size=(batch, dim)) * 3.0, jnp.float32) for _ in range(4)]


def test_defaults_are_the_disco_commands():
  config = mocov2.Config()
  assert (config.temperature, config.queue_size, config.embed_dim, config.momentum,
          config.symmetric) == (0.2, 65536, 128, 0.999, False)


def test_loss_uses_queue_before_enqueue_then_enqueues_keys(rng):
  state = mocov2.init_state(jax.random.key(1), CONFIG)
  state = state.replace(ptr=jnp.asarray(24, jnp.int32))
  np_queue, np_ptr = np.asarray(state.queue, np.float64), 24
  for _ in range(2):  # the second step sees the first step's keys in its queue
    q, k, _, _ = _inputs(rng)
    loss, metrics, state = mocov2.loss(state, q, k, config=CONFIG)
    expected = ref.info_nce(ref.unit(q), ref.unit(k), np_queue, 0.2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["info_nce"], expected, rtol=1e-5)
    np_queue, np_ptr = ref.enqueue(np_queue, np_ptr, ref.unit(k))
    np.testing.assert_allclose(state.queue, np_queue, rtol=1e-5, atol=1e-7)
    assert int(state.ptr) == np_ptr
  assert np_ptr == 8
  assert set(metrics) == {"loss", "info_nce", "accuracy", "positive_similarity",
                          "negative_similarity"}


def test_gradient_reaches_the_query_only(rng):
  state = mocov2.init_state(jax.random.key(1), CONFIG)
  q, k, _, _ = _inputs(rng)
  loss_of = lambda q, k: mocov2.loss(state, q, k, config=CONFIG)[0]
  grad_q, grad_k = jax.jit(jax.grad(loss_of, argnums=(0, 1)))(q, k)
  assert float(jnp.abs(grad_q).sum()) > 0
  np.testing.assert_array_equal(grad_k, 0.0)


def test_symmetric_flag_averages_both_directions_and_enqueues_both_keys(rng):
  config = mocov2.Config(queue_size=32, embed_dim=16, symmetric=True)
  state = mocov2.init_state(jax.random.key(2), config)
  q, k, qk, kq = _inputs(rng)
  loss, _, new_state = mocov2.loss(state, q, k, qk=qk, kq=kq, config=config)
  queue = np.asarray(state.queue, np.float64)
  expected = 0.5 * (ref.info_nce(ref.unit(q), ref.unit(k), queue, 0.2)
                    + ref.info_nce(ref.unit(qk), ref.unit(kq), queue, 0.2))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np_queue, np_ptr = ref.enqueue(queue, 0, ref.unit(k))
  np_queue, np_ptr = ref.enqueue(np_queue, np_ptr, ref.unit(kq))
  np.testing.assert_allclose(new_state.queue, np_queue, rtol=1e-5, atol=1e-7)
  assert int(new_state.ptr) == np_ptr == 16
  with pytest.raises(ValueError, match="symmetric=True needs qk"):
    mocov2.loss(state, q, k, config=config)


def test_queue_not_divisible_by_batch_is_an_error(rng):
  config = mocov2.Config(queue_size=20, embed_dim=16)
  state = mocov2.init_state(jax.random.key(0), config)
  q, k, _, _ = _inputs(rng)
  with pytest.raises(ValueError, match="queue size 20 is not a multiple of the global batch 8"):
    mocov2.loss(state, q, k, config=config)


def test_sharded_batch_matches_unsharded(rng, data_mesh):
  state = mocov2.init_state(jax.random.key(3), CONFIG)
  q, k, _, _ = _inputs(rng)
  loss_fn = ref.with_aux(functools.partial(mocov2.loss, config=CONFIG))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=1, has_aux=True))
  (loss, (metrics, new_state)), grad = step(state, q, k)
  rep = lambda x: ref.put(x, data_mesh, P())
  batch = lambda x: ref.put(x, data_mesh, P("data"))
  (s_loss, (s_metrics, s_state)), s_grad = step(jax.tree.map(rep, state), batch(q), batch(k))
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(s_metrics["accuracy"], metrics["accuracy"])
  np.testing.assert_allclose(s_grad, grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(s_state.queue, new_state.queue, rtol=1e-6)
  assert int(s_state.ptr) == int(new_state.ptr) == 8
  assert contrastive.QueueState is mocov2.QueueState

"""Retro: the loss in both consistency pairings and the frozen teacher head's gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from retro_jax.models import heads
from retro_jax.objectives import retro
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec
CONFIG = retro.Config(queue_size=32, embed_dim=16)


def _inputs(rng, batch=8, dim=16):
  """q, qk, k, t_q, t_k: unnormalised."""
  return [jnp.asarray(rng.normal(size=(batch, dim)) * 2.0, jnp.float32) for _ in range(5)]


def _np_retro(q, qk, k, t_q, t_k, queue, *, pairing, weight=32.0):
  q, qk, k, t_q, t_k = map(ref.unit, (q, qk, k, t_q, t_k))
  second = q if pairing == "cross_view" else qk
  return (ref.info_nce(q, k, queue, 0.2) + weight * np.mean(np.sum((q - t_q) ** 2, -1))
          + weight * np.mean(np.sum((second - t_k) ** 2, -1)))


def test_defaults_and_pairing_validation():
  config = retro.Config()
  assert (config.temperature, config.queue_size, config.momentum, config.consistency_weight,
          config.consistency_pairing, config.symmetric) == (0.2, 65536, 0.999, 32.0,
                                                            "same_view", False)
  with pytest.raises(ValueError, match="unknown consistency_pairing 'code'"):
    retro.Config(consistency_pairing="code")


@pytest.mark.parametrize("pairing", ["same_view", "cross_view"])
def test_loss_matches_numpy(rng, pairing):
  config = retro.Config(queue_size=32, embed_dim=16, consistency_pairing=pairing)
  state = retro.init_state(jax.random.key(0), config)
  q, qk, k, t_q, t_k = _inputs(rng)
  queue = np.asarray(state.queue, np.float64)
  loss, metrics, new_state = retro.loss(state, q, qk, k, t_q, t_k, config=config)
  np.testing.assert_allclose(loss, _np_retro(q, qk, k, t_q, t_k, queue, pairing=pairing),
                             rtol=1e-5)
  second = ref.unit(q if pairing == "cross_view" else qk)
  np.testing.assert_allclose(metrics["consistency_k"],
                             np.mean(np.sum((second - ref.unit(t_k)) ** 2, -1)), rtol=1e-5)
  np.testing.assert_allclose(new_state.queue, ref.enqueue(queue, 0, ref.unit(k))[0],
                             rtol=1e-5, atol=1e-7)
  if pairing == "cross_view":  # the authors' code form needs no student view-2 embedding
    loss_without_qk, _, _ = retro.loss(state, q, None, k, t_q, t_k, config=config)
    np.testing.assert_allclose(loss_without_qk, loss, rtol=1e-6)
  else:
    with pytest.raises(ValueError, match="needs qk"):
      retro.loss(state, q, None, k, t_q, t_k, config=config)


def _head_and_input(rng):
  head = heads.moco_v2_head(16, 8, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  return head, x


def test_frozen_head_apply_is_the_head_forward(rng):
  head, x = _head_and_input(rng)
  np.testing.assert_allclose(retro.frozen_head_apply(head, x), head(x), rtol=1e-6)
  np.testing.assert_allclose(retro.frozen_head_apply(head, x, method="embed"), head.embed(x),
                             rtol=1e-6)


def test_frozen_head_apply_gradients(rng):
  head, x = _head_and_input(rng)
  objective = lambda y: jnp.sum(jnp.sin(y) * jnp.arange(y.shape[-1]))
  frozen = lambda h, x: objective(retro.frozen_head_apply(h, x))
  live = lambda h, x: objective(h(x))

  param_grads, input_grad = nnx.jit(nnx.grad(frozen, argnums=(0, 1)))(head, x)
  leaves = jax.tree.leaves(param_grads)
  assert len(leaves) == 4  # two Linear kernels and biases
  for leaf in leaves:
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(jnp.abs(input_grad).sum()) > 0

  live_param_grads, live_input_grad = nnx.jit(nnx.grad(live, argnums=(0, 1)))(head, x)
  np.testing.assert_allclose(input_grad, live_input_grad, rtol=1e-6)
  assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(live_param_grads))

  # The same under jit, through Retro's whole loss: nothing reaches the head, all reaches x.
  state = retro.init_state(jax.random.key(0), retro.Config(queue_size=12, embed_dim=8))
  k, t_q, t_k = (jnp.asarray(rng.normal(size=(6, 8)), jnp.float32) for _ in range(3))

  @nnx.jit
  def retro_grads(head, x):
    def total(head, x):
      q = retro.frozen_head_apply(head, x)
      qk = retro.frozen_head_apply(head, x[::-1])
      config = retro.Config(queue_size=12, embed_dim=8)
      return retro.loss(state, q, qk, k, t_q, t_k, config=config)[0]
    return nnx.grad(total, argnums=(0, 1))(head, x)

  param_grads, input_grad = retro_grads(head, x)
  for leaf in jax.tree.leaves(param_grads):
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(jnp.abs(input_grad).sum()) > 0


def test_frozen_head_apply_leaves_batch_statistics_alone(rng):
  head = heads.MLPHead((16, 32, 8), batch_norm=True, rngs=nnx.Rngs(0))
  head.train()
  x = jnp.asarray(rng.normal(size=(6, 16)) + 3.0, jnp.float32)
  before = jax.tree.map(np.asarray, nnx.state(head, nnx.BatchStat))
  retro.frozen_head_apply(head, x)
  after = nnx.state(head, nnx.BatchStat)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  head(x)  # the live head in train mode does update them
  live = nnx.state(head, nnx.BatchStat)
  assert any(not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(live)))


def test_sharded_batch_matches_unsharded(rng, data_mesh):
  state = retro.init_state(jax.random.key(2), CONFIG)
  inputs = _inputs(rng)
  loss_fn = ref.with_aux(functools.partial(retro.loss, config=CONFIG))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(1, 2), has_aux=True))
  (loss, (_, new_state)), grads = step(state, *inputs)
  sharded = [ref.put(x, data_mesh, P("data")) for x in inputs]
  s_state = jax.tree.map(lambda x: ref.put(x, data_mesh, P()), state)
  (s_loss, (_, s_new_state)), s_grads = step(s_state, *sharded)
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  for got, expected in zip(s_grads, grads):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(s_new_state.queue, new_state.queue, rtol=1e-6)

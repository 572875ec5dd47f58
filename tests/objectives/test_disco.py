"""DisCo against a NumPy transcription of DisCo's builder and main.py losses."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.objectives import disco
import objective_helpers as ref
from objective_helpers import rng, data_mesh  # noqa: F401  (fixtures)

P = jax.sharding.PartitionSpec
CONFIG = disco.Config(queue_size=32, embed_dim=16)


def _inputs(rng, batch=8, dim=16):
  """q, qk, k, t_q, t_k: unnormalised, as heads return them."""
  return [jnp.asarray(rng.normal(size=(batch, dim)) * 2.0, jnp.float32) for _ in range(5)]


def _np_disco(q, qk, k, t_q, t_k, queue, *, weight, temperature=0.2):
  q, qk, k, t_q, t_k = map(ref.unit, (q, qk, k, t_q, t_k))
  nce = ref.info_nce(q, k, queue, temperature)
  c_q = np.mean(np.sum((q - t_q) ** 2, -1))
  c_k = np.mean(np.sum((qk - t_k) ** 2, -1))
  return nce + weight * (c_q + c_k), nce, c_q, c_k


def test_default_weight_is_the_per_gpu_batch_of_the_reference():
  assert disco.REFERENCE_CONSISTENCY_WEIGHT == 256 / 8 == 32.0
  config = disco.Config()
  assert (config.temperature, config.queue_size, config.consistency_weight,
          config.contrastive_weight, config.symmetric) == (0.2, 65536, 32.0, 1.0, False)


def test_loss_matches_numpy_and_enqueues_keys_after(rng):
  state = disco.init_state(jax.random.key(0), CONFIG)
  q, qk, k, t_q, t_k = _inputs(rng)
  loss, metrics, new_state = disco.loss(state, q, qk, k, t_q, t_k, config=CONFIG)
  queue = np.asarray(state.queue, np.float64)
  total, nce, c_q, c_k = _np_disco(q, qk, k, t_q, t_k, queue, weight=32.0)
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  np.testing.assert_allclose(metrics["info_nce"], nce, rtol=1e-5)
  np.testing.assert_allclose(metrics["consistency_q"], c_q, rtol=1e-5)
  np.testing.assert_allclose(metrics["consistency_k"], c_k, rtol=1e-5)
  np_queue, np_ptr = ref.enqueue(queue, 0, ref.unit(k))
  np.testing.assert_allclose(new_state.queue, np_queue, rtol=1e-5, atol=1e-7)
  assert int(new_state.ptr) == np_ptr
  # --only-mse
  only_mse = disco.Config(queue_size=32, embed_dim=16, contrastive_weight=0.0)
  loss, _, _ = disco.loss(state, q, qk, k, t_q, t_k, config=only_mse)
  np.testing.assert_allclose(loss, 32.0 * (c_q + c_k), rtol=1e-5)


def test_weight_of_the_per_device_batch_reproduces_the_ddp_sum_gradient(rng):
  """Reference: per-GPU CE mean + per-GPU MSE sums, gradients averaged over GPUs (DDP)."""
  num_gpus, per_gpu = 8, 2
  state = disco.init_state(jax.random.key(1), CONFIG)
  q, qk, k, t_q, t_k = _inputs(rng, batch=num_gpus * per_gpu)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)

  def reference_gpu_loss(q, qk, k, t_q, t_k):  # DisCo main.py on one GPU
    q, qk, k, t_q, t_k = map(unit, (q, qk, k, t_q, t_k))
    logits = jnp.concatenate([jnp.sum(q * k, -1, keepdims=True), q @ state.queue.T], -1) / 0.2
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])
    return ce + jnp.sum((t_q - q) ** 2) + jnp.sum((t_k - qk) ** 2)

  shards = lambda x: x.reshape(num_gpus, per_gpu, -1)
  ddp_grads = jax.jit(jax.vmap(jax.grad(reference_gpu_loss, argnums=(0, 1))))(
      *map(shards, (q, qk, k, t_q, t_k)))
  # DDP averages the parameter gradients of the GPUs; a parameter's gradient flows through
  # every GPU's embeddings, so the equivalent embedding gradient is each GPU's / num_gpus.
  ddp_grads = [g.reshape(q.shape) / num_gpus for g in ddp_grads]
  config = disco.Config(queue_size=32, embed_dim=16, consistency_weight=float(per_gpu))
  grads = jax.jit(jax.grad(
      lambda q, qk: disco.loss(state, q, qk, k, t_q, t_k, config=config)[0],
      argnums=(0, 1)))(q, qk)
  for got, expected in zip(grads, ddp_grads):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_no_gradient_into_keys_or_teacher(rng):
  state = disco.init_state(jax.random.key(0), CONFIG)
  inputs = _inputs(rng)
  grads = jax.jit(jax.grad(lambda *x: disco.loss(state, *x, config=CONFIG)[0],
                           argnums=(0, 1, 2, 3, 4)))(*inputs)
  assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
  for g in grads[2:]:
    np.testing.assert_array_equal(g, 0.0)


def test_sharded_batch_matches_unsharded(rng, data_mesh):
  state = disco.init_state(jax.random.key(2), CONFIG)
  inputs = _inputs(rng)
  loss_fn = ref.with_aux(functools.partial(disco.loss, config=CONFIG))
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(1, 2), has_aux=True))
  (loss, (metrics, new_state)), grads = step(state, *inputs)
  sharded = [ref.put(x, data_mesh, P("data")) for x in inputs]
  s_state = jax.tree.map(lambda x: ref.put(x, data_mesh, P()), state)
  (s_loss, (s_metrics, s_new_state)), s_grads = step(s_state, *sharded)
  np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
  for name in metrics:
    np.testing.assert_allclose(s_metrics[name], metrics[name], rtol=1e-5, err_msg=name)
  for got, expected in zip(s_grads, grads):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(s_new_state.queue, new_state.queue, rtol=1e-6)
  assert int(s_new_state.ptr) == int(new_state.ptr)

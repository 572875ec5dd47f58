"""Shared pieces of the MoCo-style objectives (MoCo-v2, DisCo, Retro) and the EMA helpers.

Everything here is a pure function of arrays and pytrees; nothing knows about devices. A batch
is the *global* batch: under `jax.jit` a batch sharded over a mesh gives the same numbers as
the same batch on one device (means over the batch axis are global means, and the queue
receives every device's keys, which is what MoCo's `concat_all_gather` does).

MoCo InfoNCE with a queue (MoCo-v2 `builder.py`, DisCo `builder_kq_mse_largeembedding_2048.py`):

    logits_i = [ q_i . k_i ,  q_i . n_1, ..., q_i . n_K ] / T          (label 0)
    L_nce    = (1/B) sum_i  -log softmax(logits_i)_0                    (nn.CrossEntropyLoss)

with q the L2-normalised query (the student), k the L2-normalised key of the other view (the
EMA "mean student", no gradient) and n_j the queue rows. T = 0.2 (`--moco-t 0.2` in every
DisCo command; 0.07 is only the argparse default). The queue is read *before* this step's keys
are enqueued, as in MoCo (`_dequeue_and_enqueue` runs after the logits).

Queue: a (K, D) buffer of unit rows and a pointer. MoCo stores it as (D, K); the rows here are
its columns. Initialised N(0, 1) and L2-normalised per entry, like MoCo's `randn` buffer (DisCo
silently loads the *teacher's* queue from the teacher checkpoint; this library does not).
Enqueue writes the global batch of keys at the pointer and advances it by B modulo K; K must
be a multiple of B (MoCo's `assert self.K % batch_size == 0`), else ValueError at trace time,
and `check_queue_size` raises the same error from a config before any compute.

Symmetry (open point): MoCo-v2 is not symmetric (one query view, one key view) and neither
are DisCo's nor the Retro authors' code: their only logits are [q . k, q . queue] with q from
view 1 and k from view 2; both views reach the student only through the consistency terms.
`symmetric=False` is that reading and the default. `symmetric=True` is the other one (MoCo-v3 /
solo-learn style): 0.5 * (L_nce(q, k) + L_nce(qk, kq)) with qk the student and kq the mean
student on view 2 and view 1; both losses read the queue before this step, then k and kq are
enqueued in that order (2B rows per step; K % B == 0 still suffices).

EMA (MoCo's momentum encoder, DINO's teacher): ema <- m * ema + (1 - m) * params, m = 0.999
for the MoCo family. MoCo updates the key encoder *before* it computes this step's keys, and
only its parameters (its BN running statistics come from its own forward pass). DINO's teacher
momentum follows a cosine from m0 = 0.996 to 1 over training (`cosine_momentum`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from retro_jax.models.heads import l2_normalize

__all__ = [
    "EMA_MOMENTUM", "EMBED_DIM", "QUEUE_SIZE", "TEMPERATURE", "QueueState", "check_queue_size",
    "cosine_momentum", "ema_update", "enqueue", "info_nce", "info_nce_logits", "init_queue",
    "l2_normalize", "queue_contrastive_loss",
]

TEMPERATURE = 0.2  # DisCo / Retro commands: --moco-t 0.2
QUEUE_SIZE = 65536  # MoCo's K
EMBED_DIM = 128  # MoCo-v2 head output
EMA_MOMENTUM = 0.999  # MoCo's m
# Logits against a 65,536-row queue are divided by T = 0.2: keep them in full fp32 precision
# even where the default matmul is bf16 (TPU). The matmul is small next to the backbones.
_PRECISION = jax.lax.Precision.HIGHEST


class QueueState(struct.PyTreeNode):
  """MoCo's negative queue: `queue` (K, D) unit rows, `ptr` int32 scalar (next write row)."""

  queue: jax.Array
  ptr: jax.Array


def init_queue(key: jax.Array, size: int = QUEUE_SIZE, dim: int = EMBED_DIM) -> QueueState:
  """A queue of `size` random unit vectors (MoCo's normalised `randn`) and pointer 0."""
  if size <= 0 or dim <= 0:
    raise ValueError(f"queue size and dimension must be positive, got size={size}, dim={dim}")
  queue = l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))
  return QueueState(queue=queue, ptr=jnp.zeros((), jnp.int32))


def check_queue_size(queue_size: int, global_batch: int) -> None:
  """Raises ValueError unless the queue holds a whole number of global batches of keys."""
  if global_batch <= 0:
    raise ValueError(f"the global batch must be positive, got {global_batch}")
  if queue_size <= 0 or queue_size % global_batch:
    raise ValueError(
        f"queue size {queue_size} is not a multiple of the global batch {global_batch}: each "
        f"step enqueues the whole global batch of keys at the pointer, so K % batch must be 0 "
        f"(MoCo asserts the same). Choose a queue size such as "
        f"{max(1, round(queue_size / global_batch)) * global_batch} or change the batch.")


def _match_sharding(buffer: jax.Array, update: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gives `update` (and an unplaced `buffer`) one sharding where an explicit axis needs it.

  Under a mesh with `AxisType.Explicit`, writing a batch-sharded update into a replicated
  buffer is a type error; resharding the update to the buffer's sharding is the all-gather
  MoCo does by hand. A buffer on no mesh is made replicated on the update's mesh. With Auto
  axes or no mesh XLA inserts the collectives itself and both are returned unchanged.
  """
  update_sharding = jax.typeof(update).sharding
  if not any(t == jax.sharding.AxisType.Explicit for t in update_sharding.mesh.axis_types):
    return buffer, update
  target = jax.typeof(buffer).sharding
  if target.mesh.empty:
    target = jax.sharding.NamedSharding(update_sharding.mesh, jax.P())
    buffer = jax.sharding.reshard(buffer, target)
  if update_sharding.mesh != target.mesh or update_sharding.spec != target.spec:
    update = jax.sharding.reshard(update, target)
  return buffer, update


@jax.jit  # also when called eagerly, so that placement follows the traced rules above
def _write_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
  buffer, rows = _match_sharding(buffer, rows)
  return jax.lax.dynamic_update_slice(buffer, rows, (start, jnp.zeros((), jnp.int32)))


def enqueue(state: QueueState, keys: jax.Array) -> QueueState:
  """Writes the (B, D) global batch of keys at the pointer (dequeueing the oldest B rows).

  Keys are stored as given (the objectives pass unit vectors) and carry no gradient.

  Raises:
    ValueError: the queue length is not a multiple of B, or the widths differ.
  """
  size, dim = state.queue.shape
  if keys.ndim != 2 or keys.shape[1] != dim:
    raise ValueError(f"keys of shape {keys.shape} do not fit a queue of shape {(size, dim)}")
  check_queue_size(size, keys.shape[0])
  keys = jax.lax.stop_gradient(keys).astype(state.queue.dtype)
  ptr = state.ptr.astype(jnp.int32)
  queue = _write_rows(state.queue, keys, ptr)
  return QueueState(queue=queue, ptr=(ptr + keys.shape[0]) % size)


def info_nce_logits(q: jax.Array, k: jax.Array, queue: jax.Array,
                    temperature: float) -> jax.Array:
  """MoCo's logits [q . k, q . queue^T] / T, (B, 1 + K); inputs are expected unit vectors."""
  positive = jnp.sum(q * k, axis=-1, keepdims=True)
  negative = jnp.matmul(q, queue.T, precision=_PRECISION)
  return jnp.concatenate([positive, negative], axis=-1) / temperature


def info_nce(q: jax.Array, k: jax.Array, queue: jax.Array,
             temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of the logits with label 0, mean over the batch, plus MoCo's accuracy.

  `k` and `queue` are constants (stop-gradient); `q` carries the gradient.
  """
  k = jax.lax.stop_gradient(k)
  queue = jax.lax.stop_gradient(queue)
  logits = info_nce_logits(q, k, queue, temperature)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])
  metrics = {
      "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == 0).astype(jnp.float32)),
      "positive_similarity": jnp.mean(logits[:, 0]) * temperature,
      "negative_similarity": jnp.mean(logits[:, 1:]) * temperature,
  }
  return loss, metrics


def queue_contrastive_loss(
    state: QueueState, q: jax.Array, k: jax.Array, *, temperature: float,
    symmetric: bool = False, qk: jax.Array | None = None, kq: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], QueueState]:
  """MoCo InfoNCE of the student against the mean student and the queue, then the enqueue.

  Args:
    state: the queue before this step.
    q: student embedding of view 1, (B, D), any norm (normalised here).
    k: mean-student (EMA) embedding of view 2, (B, D); no gradient.
    temperature: T.
    symmetric: also the view-2 query against the view-1 key (see the module docstring).
    qk: student embedding of view 2 (needed when symmetric).
    kq: mean-student embedding of view 1 (needed when symmetric).

  Returns:
    (loss, metrics, new queue state); metrics hold 'info_nce' and MoCo's 'accuracy' and the
    mean positive and negative cosine similarities.
  """
  q = l2_normalize(q.astype(jnp.float32))
  k = l2_normalize(jax.lax.stop_gradient(k).astype(jnp.float32))
  loss, metrics = info_nce(q, k, state.queue, temperature)
  new_state = enqueue(state, k)
  if symmetric:
    if qk is None or kq is None:
      raise ValueError("symmetric=True needs qk (student, view 2) and kq (mean student, "
                       "view 1) as well as q and k")
    qk = l2_normalize(qk.astype(jnp.float32))
    kq = l2_normalize(jax.lax.stop_gradient(kq).astype(jnp.float32))
    loss_2, metrics_2 = info_nce(qk, kq, state.queue, temperature)  # queue before the step
    loss = 0.5 * (loss + loss_2)
    metrics = {name: 0.5 * (value + metrics_2[name]) for name, value in metrics.items()}
    new_state = enqueue(new_state, kq)
  return loss, {"info_nce": loss, **metrics}, new_state


def ema_update(ema: Any, params: Any, momentum: float | jax.Array = EMA_MOMENTUM) -> Any:
  """ema <- momentum * ema + (1 - momentum) * params, leaf by leaf (same tree structure).

  Raises:
    TypeError: a leaf is not floating point (integer counters, RNG keys): leave those out of
      the trees rather than have them averaged.
  """
  def update(path, e, p):
    if not (jnp.issubdtype(jnp.result_type(e), jnp.floating)
            and jnp.issubdtype(jnp.result_type(p), jnp.floating)):
      raise TypeError(f"EMA of a non-floating leaf at {jax.tree_util.keystr(path)} "
                      f"({jnp.result_type(e)}); filter the trees to parameters first")
    p = jax.lax.stop_gradient(p)
    return (momentum * e + (1.0 - momentum) * p).astype(jnp.result_type(e))
  return jax.tree_util.tree_map_with_path(update, ema, params)


def cosine_momentum(step: int | jax.Array, total_steps: int, base: float = 0.996,
                    final: float = 1.0) -> jax.Array:
  """DINO's teacher momentum: final - (final - base) * (1 + cos(pi * step / total)) / 2.

  `utils.cosine_scheduler(m0, 1, epochs, iters_per_epoch)` without warm-up: base at step 0,
  rising to `final`; steps past `total_steps` stay at `final`.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  progress = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / total_steps
  return final - (final - base) * 0.5 * (1.0 + jnp.cos(math.pi * progress))

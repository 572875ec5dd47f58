"""DisCo: the student's MoCo-v2 plus consistency to a frozen teacher's embeddings.

DisCo-pytorch (`DisCo/moco/builder_kq_mse_largeembedding_2048.py`, `DisCo/main.py`), for two
augmentations x_q, x_k of each image (peers.md 2.2-2.3):

    q  = normalize(s(x_q))      qk = normalize(s(x_k))         student, own MLP head
    k  = normalize(s_ema(x_k))                                  mean student (EMA), no gradient
    t_q = normalize(t(x_q))     t_k = normalize(t(x_k))         frozen teacher, no gradient

    L = contrastive_weight * L_nce(q, k, queue)
        + consistency_weight * [ (1/B) sum_i ||q_i - t_q,i||^2 + (1/B) sum_i ||qk_i - t_k,i||^2 ]

L_nce is MoCo's InfoNCE (`contrastive`), T = 0.2, K = 65,536, m = 0.999; it is one-directional
in the reference (q against k only; `symmetric=True` for the other reading). Each squared term
is a sum over the embedding dimensions, i.e. 2 - 2 cos for unit vectors.

Consistency scale (open point): the reference uses `nn.MSELoss(reduction='sum')`, a sum over
each GPU's batch of 32 (global batch 256 on 8 GPUs), and DDP averages the gradients of the 8
GPUs. Its gradient is therefore (1/8) sum_gpus sum_i grad e_i = 32 * grad mean_i e_i. Here the
terms are per-sample means over the global batch, so `consistency_weight` defaults to 32
(= REFERENCE_GLOBAL_BATCH / REFERENCE_NUM_GPUS), which reproduces the reference's gradient
scale and loss value at any device count. The reference's own ratio changes with its GPU
count; this one does not. `contrastive_weight=0` is the reference's `--only-mse`.

Extra state: the queue (`QueueState`). The engine keeps the mean student's EMA parameters and
updates them before computing k (see `mocov2`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from retro_jax.objectives import contrastive
from retro_jax.objectives.contrastive import QueueState
from retro_jax.objectives.contrastive import l2_normalize

__all__ = ["Config", "QueueState", "REFERENCE_CONSISTENCY_WEIGHT", "consistency", "init_state",
           "loss"]

REFERENCE_GLOBAL_BATCH = 256
REFERENCE_NUM_GPUS = 8
# The per-GPU batch over which the reference sums its MSE: the weight of the per-sample mean
# that reproduces the reference's gradient.
REFERENCE_CONSISTENCY_WEIGHT = float(REFERENCE_GLOBAL_BATCH // REFERENCE_NUM_GPUS)  # 32.0


@dataclasses.dataclass(frozen=True)
class Config:
  """DisCo hyperparameters (DisCo's commands and code defaults)."""

  temperature: float = contrastive.TEMPERATURE
  queue_size: int = contrastive.QUEUE_SIZE
  embed_dim: int = contrastive.EMBED_DIM
  momentum: float = contrastive.EMA_MOMENTUM  # for the engine's ema_update
  consistency_weight: float = REFERENCE_CONSISTENCY_WEIGHT
  contrastive_weight: float = 1.0  # 0.0 is the reference's --only-mse
  symmetric: bool = False


def init_state(key: jax.Array, config: Config = Config()) -> QueueState:
  """The random unit queue of `config.queue_size` x `config.embed_dim` and pointer 0."""
  return contrastive.init_queue(key, config.queue_size, config.embed_dim)


def consistency(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """(1/B) sum_i ||normalize(s_i) - normalize(t_i)||^2; the teacher carries no gradient."""
  if student.shape != teacher.shape:
    raise ValueError(f"student embeddings {student.shape} and teacher embeddings "
                     f"{teacher.shape} differ in shape")
  s = l2_normalize(student.astype(jnp.float32))
  t = l2_normalize(jax.lax.stop_gradient(teacher).astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.square(s - t), axis=-1))


def combine(state: QueueState, q: jax.Array, k: jax.Array, second_student: jax.Array,
            t_q: jax.Array, t_k: jax.Array, *, qk: jax.Array | None, kq: jax.Array | None,
            config) -> tuple[jax.Array, dict[str, jax.Array], QueueState]:
  """InfoNCE + weighted consistency (q, t_q) + (second_student, t_k); shared with Retro.

  `config` is a `disco.Config` or `retro.Config` (temperature, symmetric and the weights).
  """
  nce, metrics, new_state = contrastive.queue_contrastive_loss(
      state, q, k, temperature=config.temperature, symmetric=config.symmetric, qk=qk, kq=kq)
  consistency_q = consistency(q, t_q)
  consistency_k = consistency(second_student, t_k)
  value = (config.contrastive_weight * nce
           + config.consistency_weight * (consistency_q + consistency_k))
  metrics = {"loss": value, **metrics, "consistency_q": consistency_q,
             "consistency_k": consistency_k}
  return value, metrics, new_state


def loss(state: QueueState, q: jax.Array, qk: jax.Array, k: jax.Array, t_q: jax.Array,
         t_k: jax.Array, *, kq: jax.Array | None = None, config: Config = Config()
         ) -> tuple[jax.Array, dict[str, jax.Array], QueueState]:
  """DisCo's loss, with the queue as it was before this step, then the enqueue of k.

  All embeddings are (B, D) and unnormalised (each is L2-normalised here).

  Args:
    state: the queue.
    q: student, view 1.
    qk: student, view 2.
    k: mean student, view 2 (no gradient).
    t_q: teacher, view 1 (no gradient).
    t_k: teacher, view 2 (no gradient).
    kq: mean student, view 1 (only with `config.symmetric`).
    config: hyperparameters.

  Returns:
    (loss, metrics {'loss', 'info_nce', 'accuracy', 'positive_similarity',
    'negative_similarity', 'consistency_q', 'consistency_k'}, new queue state); the
    consistency metrics are the unweighted per-sample means.
  """
  return combine(state, q, k, qk, t_q, t_k, qk=qk, kq=kq, config=config)

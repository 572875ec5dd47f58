"""MoCo-v2: the student alone, InfoNCE against its momentum encoder and a queue.

The baseline the DisCo and Retro papers improve on (DisCo's `moco/main_moco.py` with
`--mlp --moco-t 0.2 --aug-plus --cos`). With q = normalize(f_q(x_q)) and k = normalize(f_k(x_k))
for two augmentations x_q, x_k of each image, f_k the EMA of f_q:

    L = (1/B) sum_i -log [ exp(q_i . k_i / T) / (exp(q_i . k_i / T) + sum_j exp(q_i . n_j / T)) ]

T = 0.2, K = 65,536 queue rows n_j, m = 0.999, D = 128. Details, the symmetric variant and the
queue rules: `retro_jax.objectives.contrastive`.

Extra state: the queue (`QueueState`). The key encoder's EMA parameters are model state, kept
by the engine and updated with `contrastive.ema_update` *before* the keys are computed.

One step, in MoCo's order:
    ema_params = ema_update(ema_params, student_params, config.momentum)
    k = key_encoder(ema_params, x_k)                              # no gradient
    loss, metrics, state = mocov2.loss(state, student(x_q), k, config=config)
"""

from __future__ import annotations

import dataclasses

import jax

from retro_jax.objectives import contrastive
from retro_jax.objectives.contrastive import QueueState

__all__ = ["Config", "QueueState", "init_state", "loss"]


@dataclasses.dataclass(frozen=True)
class Config:
  """MoCo-v2 hyperparameters (DisCo's commands)."""

  temperature: float = contrastive.TEMPERATURE
  queue_size: int = contrastive.QUEUE_SIZE
  embed_dim: int = contrastive.EMBED_DIM
  momentum: float = contrastive.EMA_MOMENTUM  # for the engine's ema_update
  symmetric: bool = False  # MoCo-v2 is one-directional; True adds (qk, kq)


def init_state(key: jax.Array, config: Config = Config()) -> QueueState:
  """The random unit queue of `config.queue_size` x `config.embed_dim` and pointer 0."""
  return contrastive.init_queue(key, config.queue_size, config.embed_dim)


def loss(state: QueueState, q: jax.Array, k: jax.Array, *, qk: jax.Array | None = None,
         kq: jax.Array | None = None, config: Config = Config()
         ) -> tuple[jax.Array, dict[str, jax.Array], QueueState]:
  """MoCo-v2 InfoNCE with the queue as it was before this step, then the enqueue of k.

  Args:
    state: the queue.
    q: student embeddings of view 1, (B, D), unnormalised.
    k: momentum-encoder embeddings of view 2, (B, D); no gradient flows into them.
    qk: student embeddings of view 2 (only with `config.symmetric`).
    kq: momentum-encoder embeddings of view 1 (only with `config.symmetric`).
    config: hyperparameters.

  Returns:
    (loss, metrics {'loss', 'info_nce', 'accuracy', 'positive_similarity',
    'negative_similarity'}, new queue state).
  """
  value, metrics, new_state = contrastive.queue_contrastive_loss(
      state, q, k, temperature=config.temperature, symmetric=config.symmetric, qk=qk, kq=kq)
  return value, {"loss": value, **metrics}, new_state

"""Retro: DisCo with the student embedding through the teacher's frozen projection head.

Retro (arXiv 2405.15311; the authors' code `beandkay/Reused-Teacher-Projector`, retro.md 1-2).
With A the trainable dimension adapter, g_t the teacher's MoCo-v2 head (frozen, shared by
student, mean student and teacher) and GAP global average pooling:

    q   = normalize(g_t(GAP(A(f_s(x_q)))))        student, view 1 (gradient through g_t)
    qk  = normalize(g_t(GAP(A(f_s(x_k)))))        student, view 2
    k   = normalize(g_t(GAP(A(f_ema(x_k)))))      mean student: EMA backbone, live A and g_t
    t_q, t_k = normalize(g_t(GAP(f_t(x))))        teacher, both views

    L = contrastive_weight * L_nce(q, k, queue)
        + consistency_weight * [ (1/B) sum_i ||q_i - t_q,i||^2 + (1/B) sum_i ||s2_i - t_k,i||^2 ]

The loss is DisCo's (`disco`); what Retro changes is where the embeddings come from, which is
the engine's wiring, plus `frozen_head_apply` below. Readings of the open points:

- Second consistency term (retro.md 7.3): `consistency_pairing='same_view'` (default) takes
  s2 = qk, DisCo's form student(view 2) vs teacher(view 2), the evident intent;
  `'cross_view'` takes s2 = q, what the authors' code computes (student(view 1) vs
  teacher(view 2), probably a copy/paste slip), and then qk is not needed.
- "Mean-student symmetry": the keys, queue and teacher targets all live in the teacher head's
  space because one frozen head serves everyone; it is *not* a view-swapped loss. The InfoNCE
  is one-directional as in the code (`symmetric=True` for the swapped reading).
- Scale: the code sums the MSE over each GPU's batch (weights 1:1:1); `consistency_weight`
  (applied to per-sample means) defaults to 32, the per-GPU batch of the reference's 256 on
  8 GPUs, which reproduces that gradient scale (see `disco`).
- T = 0.2 (DisCo's commands, inherited), K = 65,536, m = 0.999, D = 128.

Extra state: the queue (`QueueState`). The engine keeps the EMA of the student *backbone* only;
the adapter and head are shared, not averaged (retro.md 7.4).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from retro_jax.objectives import contrastive
from retro_jax.objectives import disco
from retro_jax.objectives.contrastive import QueueState

__all__ = ["CONSISTENCY_PAIRINGS", "Config", "QueueState", "frozen_head_apply", "init_state",
           "loss"]

CONSISTENCY_PAIRINGS = ("same_view", "cross_view")


@dataclasses.dataclass(frozen=True)
class Config:
  """Retro hyperparameters (the DisCo recipe the authors' code inherits)."""

  temperature: float = contrastive.TEMPERATURE
  queue_size: int = contrastive.QUEUE_SIZE
  embed_dim: int = contrastive.EMBED_DIM
  momentum: float = contrastive.EMA_MOMENTUM  # for the engine's ema_update (backbone only)
  consistency_weight: float = disco.REFERENCE_CONSISTENCY_WEIGHT
  contrastive_weight: float = 1.0
  consistency_pairing: str = "same_view"  # or 'cross_view' (the authors' code)
  symmetric: bool = False

  def __post_init__(self):
    if self.consistency_pairing not in CONSISTENCY_PAIRINGS:
      raise ValueError(f"unknown consistency_pairing {self.consistency_pairing!r}; expected "
                       f"one of {CONSISTENCY_PAIRINGS}")


def init_state(key: jax.Array, config: Config = Config()) -> QueueState:
  """The random unit queue of `config.queue_size` x `config.embed_dim` and pointer 0."""
  return contrastive.init_queue(key, config.queue_size, config.embed_dim)


def frozen_head_apply(head: nnx.Module, x: jax.Array, *, method: str = "__call__") -> jax.Array:
  """Applies `head` with `stop_gradient` on its parameters only.

  The gradient of the output reaches `x` (and through it the adapter and the student) exactly
  as through the live head; every `nnx.Param` of the head (FrozenParam included) gets zero
  gradient. The head runs in whatever mode it is set to (`head.eval()` for a head with batch
  norm); state it would update on the way (batch statistics) is discarded, so a frozen head
  never changes.

  Args:
    head: the teacher's projection head (e.g. `moco_v2_head`).
    x: its input, the pooled adapter output (B, C_t).
    method: the head method to call ('__call__', or 'embed' for heads whose call differs).
  """
  graphdef, params, rest = nnx.split(head, nnx.Param, ...)
  frozen = nnx.merge(graphdef, jax.lax.stop_gradient(params), rest, copy=True)
  return getattr(frozen, method)(x)


def loss(state: QueueState, q: jax.Array, qk: jax.Array | None, k: jax.Array, t_q: jax.Array,
         t_k: jax.Array, *, kq: jax.Array | None = None, config: Config = Config()
         ) -> tuple[jax.Array, dict[str, jax.Array], QueueState]:
  """Retro's loss, with the queue as it was before this step, then the enqueue of k.

  All embeddings are (B, D) in the teacher head's space, unnormalised (normalised here).

  Args:
    state: the queue.
    q: student, view 1 (through the adapter and `frozen_head_apply`).
    qk: student, view 2; may be None with `consistency_pairing='cross_view'`.
    k: mean student, view 2 (no gradient).
    t_q: teacher, view 1 (no gradient).
    t_k: teacher, view 2 (no gradient).
    kq: mean student, view 1 (only with `config.symmetric`).
    config: hyperparameters.

  Returns:
    (loss, metrics as `disco.loss`, new queue state); 'consistency_k' is the second term,
    (qk, t_k) or (q, t_k) according to the pairing.
  """
  if config.consistency_pairing == "cross_view":
    second = q
  else:
    if qk is None:
      raise ValueError("consistency_pairing='same_view' needs qk, the student embedding of "
                       "view 2")
    second = qk
  return disco.combine(state, q, k, second, t_q, t_k, qk=qk, kq=kq, config=config)

"""RoB-SwAV: SwAV's swapped prediction with the target branch replaced by a frozen SwAV teacher.

RoB (arXiv 2301.09451), from the authors' VISSL code (`vissl/losses/swav_distillation_loss.py`,
`vissl/losses/distibuted_sinkhornknopp.py`, `vissl/hooks/distillation_hooks.py`, commit
04788de9; rob.md 2.5, 3.4). The teacher (SwAV ResNet-50 and its head, eval mode, no gradient)
gives, on each teacher crop i, its prototype scores t^(i) = normalize(z_t) . C_t^T (K = 3,000);
its codes are Sinkhorn-Knopp's balanced assignments of those scores over the global batch:

    Q = exp((t - max t) / eps)^T / sum,   3 times: rows <- rows / row sums / K,
                                                   columns <- columns / column sums / B
    q^(i) = (Q / column sums)^T                                  (num_iters = 0: softmax(t / eps))

The student's scores s^(v) are either its output z_s^(v) against the teacher's frozen
prototypes, s = z_s . C_t^T (`use_teacher_prototypes`, the main config), or its own head's
prototype scores. The loss is VISSL's, per teacher crop i over its student crops V_i:

    L = (1/T) sum_i (1/|V_i|) sum_{v in V_i} (1/B) sum_b -sum_k q^(i)[b, k] log_softmax(s^(v)[b] / 0.1)[k]

    one teacher crop (T = 1):   V_0 = all V crops (swapped: crops 1..V-1)
    two teacher crops:          V_i = {i} + the local crops (swapped: every crop v != i)

Readings of the open points (rob.md 2.5, 7):
- Sinkhorn stays (a frozen teacher cannot collapse, but the codes are SwAV's targets);
  `num_iters=0` switches it off for VISSL's plain softmax(t / eps). eps = 0.03, not SwAV's 0.05.
- The teacher's prototypes are used as stored, not re-normalised (VISSL's hook passes
  `prototypes0.weight` as is: "never updated on the teacher side").
- `normalize_student_feats` L2-normalises the student's output before scoring (off in RoB).
- Left out (0 / off in every RoB config): the queue of past teacher scores
  (`local_queue_length`), hard assignments (`temp_hard_assignment_iters`), float64
  (`use_double_precision`). Infinite entries of Q, which VISSL replaces by the finite
  maximum, cannot occur after the max subtraction; its `u == 0` guard (Q += 1e-12) is kept.
- Sharded batches: every sum over the batch is over the global batch inside `jit` (VISSL's
  all-reduces), so 1 and 8 devices give the same codes.

Extra state: none (`State` is an empty pytree).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from retro_jax.models.heads import l2_normalize
from retro_jax.objectives import dino

__all__ = ["Config", "State", "init_state", "loss", "sinkhorn_knopp", "student_crop_ids",
           "teacher_codes"]

_SINKHORN_FLOOR = 1e-12  # VISSL's eps_num_stab: added to Q when a prototype row sums to 0


@dataclasses.dataclass(frozen=True)
class Config:
  """RoB-SwAV hyperparameters (`swav_distill_rn50_to_rn50_on_in1k_8nodes.yaml`)."""

  temperature: float = 0.1
  epsilon: float = 0.03
  num_iters: int = 3
  num_prototypes: int = 3000
  use_teacher_prototypes: bool = True
  use_two_crops_for_teacher: bool = False
  normalize_student_feats: bool = False
  swapped_assignment: bool = False

  def __post_init__(self):
    if self.num_iters < 0:
      raise ValueError(f"num_iters must be >= 0 (0: no Sinkhorn), got {self.num_iters}")
    if self.epsilon <= 0 or self.temperature <= 0:
      raise ValueError(f"epsilon ({self.epsilon}) and temperature ({self.temperature}) must "
                       "be positive")

  @property
  def num_teacher_crops(self) -> int:
    return 2 if self.use_two_crops_for_teacher else 1


class State(struct.PyTreeNode):
  """RoB keeps no objective state."""


def init_state() -> State:
  return State()


def sinkhorn_knopp(scores: jax.Array, *, epsilon: float, num_iters: int) -> jax.Array:
  """VISSL's `distributed_sinkhornknopp` on exp(scores / eps): (B, K) scores -> (B, K) codes."""
  logits = scores / epsilon
  q = jnp.exp(logits - jnp.max(logits)).T  # (K, B); the global max, as `all_reduce_max`
  q = q / jnp.sum(q)
  num_prototypes, batch = q.shape
  for _ in range(num_iters):
    u = jnp.sum(q, axis=1)
    q = jnp.where(jnp.any(u == 0), q + _SINKHORN_FLOOR, q)
    u = jnp.sum(q, axis=1)
    q = q * ((1.0 / num_prototypes) / u)[:, None]
    q = q * ((1.0 / batch) / jnp.sum(q, axis=0))[None, :]
  return (q / jnp.sum(q, axis=0, keepdims=True)).T


def teacher_codes(scores: jax.Array, config: Config) -> jax.Array:
  """The targets of one teacher crop: Sinkhorn codes, or softmax(t / eps) when num_iters = 0."""
  if config.num_iters == 0:
    return jax.nn.softmax(scores / config.epsilon, axis=-1)
  return sinkhorn_knopp(scores, epsilon=config.epsilon, num_iters=config.num_iters)


def student_crop_ids(teacher_crop: int, num_teacher_crops: int, num_crops: int, *,
                     swapped: bool) -> list[int]:
  """The student crops that learn from teacher crop `teacher_crop` (VISSL's rule)."""
  if num_teacher_crops == 1:
    return list(range(1 if swapped else 0, num_crops))
  if swapped:
    return [v for v in range(num_crops) if v != teacher_crop]
  return [teacher_crop] + list(range(2, num_crops))


def loss(state: State, student_outputs: jax.Array | Sequence[jax.Array],
         teacher_scores: jax.Array | Sequence[jax.Array],
         teacher_prototypes: jax.Array | None = None, *, config: Config = Config()
         ) -> tuple[jax.Array, dict[str, jax.Array], State]:
  """RoB-SwAV's loss.

  Args:
    state: the (empty) state, returned unchanged.
    student_outputs: (V, B, D) student head outputs, the teacher's crops first (or a list):
      with `use_teacher_prototypes` the student's projection (D = the teacher's prototype
      width), else its own prototype scores (D = K).
    teacher_scores: (T, B, K) teacher prototype scores on the first T crops; no gradient.
    teacher_prototypes: (K, D) the teacher's prototypes; required with
      `use_teacher_prototypes`, ignored otherwise; no gradient.
    config: hyperparameters.

  Returns:
    (loss, metrics {'loss', 'code_entropy'}, state).

  Raises:
    ValueError: widths that do not fit K or the prototypes, or too few student crops.
  """
  student = dino.stack_crops(student_outputs)
  teacher = jax.lax.stop_gradient(dino.stack_crops(teacher_scores))
  num_prototypes = teacher.shape[-1]
  if num_prototypes != config.num_prototypes:
    raise ValueError(f"the teacher scores {num_prototypes} prototypes, "
                     f"config.num_prototypes is {config.num_prototypes}")
  if config.normalize_student_feats:
    student = l2_normalize(student)
  if config.use_teacher_prototypes:
    if teacher_prototypes is None:
      raise ValueError("use_teacher_prototypes needs the teacher's prototypes")
    prototypes = jax.lax.stop_gradient(jnp.asarray(teacher_prototypes, jnp.float32))
    if prototypes.shape != (num_prototypes, student.shape[-1]):
      raise ValueError(f"the teacher's prototypes {prototypes.shape} do not score student "
                       f"outputs of width {student.shape[-1]}")
    student = jnp.einsum("vbd,kd->vbk", student, prototypes,
                         precision=jax.lax.Precision.HIGHEST)
  elif student.shape[-1] != num_prototypes:
    raise ValueError(f"the student's scores have width {student.shape[-1]}, the teacher's "
                     f"{num_prototypes} (own prototypes need K of them)")
  num_teacher, num_crops = teacher.shape[0], student.shape[0]
  if num_crops < max(num_teacher, 2):
    raise ValueError(f"{num_crops} student crops for {num_teacher} teacher crops")
  log_probs = jax.nn.log_softmax(student / config.temperature, axis=-1)
  total, entropy = 0.0, 0.0
  for i in range(num_teacher):
    codes = teacher_codes(teacher[i], config)
    entropy += dino.mean_entropy(codes)
    crops = student_crop_ids(i, num_teacher, num_crops, swapped=config.swapped_assignment)
    per_crop = [jnp.mean(-jnp.sum(codes * log_probs[v], axis=-1)) for v in crops]
    total += sum(per_crop) / len(crops)
  value = total / num_teacher
  return value, {"loss": value, "code_entropy": entropy / num_teacher}, state

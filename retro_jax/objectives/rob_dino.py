"""RoB-DINO: DINO's cross-entropy with the target branch replaced by a frozen DINO teacher.

RoB (Duval, Misra, Ballas, arXiv 2301.09451), implemented from the authors' VISSL code
(`vissl/losses/dino_distillation_loss.py`, commit 04788de9; rob.md 2.1-2.2, 3.1). The teacher
(trunk and its own DINO head with 65,536 prototypes) is frozen and in eval mode and sees the
global crops only; the student (own, fresh head of the same width) sees all V crops:

    P_t^(i) = softmax(t^(i) / 0.07)                        no centring, no warm-up, no gradient
    log Q_s^(v) = log_softmax(s^(v) / 0.1)
    L = (1/|P|) sum_{(i, v) in P} (1/B) sum_b  -sum_k P_t^(i)[b, k] log Q_s^(v)[b, k]

Readings of the open points (rob.md 7):
- Pairing: `swapped_assignment=False` (every RoB config) is the default: P = {(i, v) : v = i,
  or v a local crop}: each student global crop i with the teacher on the *same* crop i, every
  local crop with both teacher globals; |P| = 2 (V - 1). `swapped_assignment=True` gives
  DINO's cross-view pairs {v != i}, also 2 (V - 1) of them. Pairs are weighted equally.
- Temperatures fixed: teacher 0.07, student 0.1 (no schedule).
- No centring, no teacher-temperature warm-up, no EMA, no last-layer freeze: a frozen teacher
  cannot collapse. The student is the output model (no student EMA).

Extra state: none (`State` is an empty pytree so every objective has the same signature).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax
from flax import struct

from retro_jax.objectives import dino

__all__ = ["Config", "State", "init_state", "loss"]


@dataclasses.dataclass(frozen=True)
class Config:
  """RoB-DINO hyperparameters (`dino_distill_deit_b16_to_deit_s16_on_in1k.yaml`)."""

  teacher_temperature: float = 0.07
  student_temperature: float = 0.1
  swapped_assignment: bool = False


class State(struct.PyTreeNode):
  """RoB keeps no objective state."""


def init_state() -> State:
  return State()


def loss(state: State, student_logits: jax.Array | Sequence[jax.Array],
         teacher_logits: jax.Array | Sequence[jax.Array], *, config: Config = Config()
         ) -> tuple[jax.Array, dict[str, jax.Array], State]:
  """RoB-DINO's loss.

  Args:
    state: the (empty) state, returned unchanged.
    student_logits: (V, B, K) student head outputs, the teacher's crops first (or a list).
    teacher_logits: (T, B, K) teacher head outputs on the first T crops (T = 2, the globals);
      no gradient flows into them.
    config: hyperparameters.

  Returns:
    (loss, metrics {'loss', 'teacher_entropy'}, state).
  """
  student = dino.stack_crops(student_logits)
  teacher = jax.lax.stop_gradient(dino.stack_crops(teacher_logits))
  probs = jax.nn.softmax(teacher / config.teacher_temperature, axis=-1)
  pairs = dino.crop_pairs(teacher.shape[0], student.shape[0],
                          swapped=config.swapped_assignment)
  value = dino.multicrop_cross_entropy(probs, student, config.student_temperature, pairs)
  return value, {"loss": value, "teacher_entropy": dino.mean_entropy(probs)}, state

"""RoB-MSN: cross-entropy of the student's prototype logits against a frozen MSN teacher.

RoB (arXiv 2301.09451), from the authors' VISSL code (`vissl/losses/msn_distillation_loss.py`
and the teacher's `msn_head`, commit 04788de9; rob.md 2.3, 3.2). The teacher (MSN ViT trunk,
projector and its 1,024 frozen prototypes, eval mode) outputs, on each global crop i, the
probability vector

    p_t^(i) = softmax( normalize(z_t) . normalize(C)^T / 0.025 )         (`MSNHead`, no gradient)

and the student (token-dropped ViT, plain MLP head to 1,024 logits, no prototypes of its own)
is trained with

    L = (1/|P|) sum_{(i, v) in P} (1/B) sum_b  -sum_k p_t^(i)[b, k] log_softmax(s^(v)[b] / 0.1)[k]

over the same pairs as RoB-DINO (`swapped_assignment=False`: global crop i with teacher crop i,
locals with both globals; True: MSN/DINO-style cross-view pairs v != i).

Readings of the open points (rob.md 3.2, 7.4-7.5):
- Sharpening: none in the loss. The teacher's temperature 0.025 is MSN's tau = 0.1 times its
  target sharpening T = 0.25 (sharpen(softmax(u / tau), T) = softmax(u / (tau T))), already
  applied inside the teacher head; it must not be applied a second time. This loss therefore
  takes the teacher's *probabilities* (`TEACHER_TEMPERATURE` is what the head must use).
- No me-max regulariser, no Sinkhorn, no label smoothing, no EMA (all removed by RoB).
- Student temperature 0.1.
- Token dropping belongs to the student model: one random patch permutation shared by the
  batch, positional embeddings added first, CLS kept, on the 224-px crops only, ratio
  `TOKEN_DROP_RATIO[...]`: 0.15 for ViT-S/16, 0.10 for ViT-Ti/16.

Extra state: none (`State` is an empty pytree).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax
from flax import struct

from retro_jax.objectives import dino

__all__ = ["Config", "NUM_PROTOTYPES", "State", "STUDENT_TEMPERATURE", "TEACHER_TEMPERATURE",
           "TOKEN_DROP_RATIO", "init_state", "loss"]

NUM_PROTOTYPES = 1024
TEACHER_TEMPERATURE = 0.025  # inside the teacher's MSNHead: MSN's 0.1 x sharpening 0.25
STUDENT_TEMPERATURE = 0.1
# MSN token-drop ratio of the student, by backbone name (VISSL `MSNDropMasking`).
TOKEN_DROP_RATIO = {"vit_small_patch16": 0.15, "vit_tiny_patch16": 0.10}


@dataclasses.dataclass(frozen=True)
class Config:
  """RoB-MSN hyperparameters (`msn_distill_deit_l16_to_deit_s16_on_in1k.yaml`)."""

  student_temperature: float = STUDENT_TEMPERATURE
  num_prototypes: int = NUM_PROTOTYPES
  swapped_assignment: bool = False


class State(struct.PyTreeNode):
  """RoB keeps no objective state."""


def init_state() -> State:
  return State()


def loss(state: State, student_logits: jax.Array | Sequence[jax.Array],
         teacher_probs: jax.Array | Sequence[jax.Array], *, config: Config = Config()
         ) -> tuple[jax.Array, dict[str, jax.Array], State]:
  """RoB-MSN's loss.

  Args:
    state: the (empty) state, returned unchanged.
    student_logits: (V, B, K) student logits over the teacher's prototypes, the teacher's
      crops first (or a list of V (B, K)).
    teacher_probs: (T, B, K) teacher prototype probabilities on the first T crops (T = 2);
      no gradient flows into them.
    config: hyperparameters.

  Returns:
    (loss, metrics {'loss', 'teacher_entropy'}, state).

  Raises:
    ValueError: K differs from `config.num_prototypes`, or the crop counts do not pair.
  """
  student = dino.stack_crops(student_logits)
  probs = jax.lax.stop_gradient(dino.stack_crops(teacher_probs))
  if student.shape[-1] != config.num_prototypes or probs.shape[-1] != config.num_prototypes:
    raise ValueError(f"student logits ({student.shape[-1]}) and teacher probabilities "
                     f"({probs.shape[-1]}) must both cover the {config.num_prototypes} "
                     f"prototypes of config.num_prototypes")
  pairs = dino.crop_pairs(probs.shape[0], student.shape[0], swapped=config.swapped_assignment)
  value = dino.multicrop_cross_entropy(probs, student, config.student_temperature, pairs)
  return value, {"loss": value, "teacher_entropy": dino.mean_entropy(probs)}, state

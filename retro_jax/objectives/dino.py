"""DINO: cross-entropy between a centred, sharpened EMA teacher and the student over crops.

DINO (`facebookresearch/dino`, `main_dino.py` `DINOLoss`; rob.md 3.1). With V crops (the 2
global crops first, then N local crops), student head outputs s^(v) and teacher head outputs
t^(i) on the global crops i (the teacher sees only those):

    P_t^(i) = softmax((t^(i) - c) / tau_t(epoch))                   no gradient
    log Q_s^(v) = log_softmax(s^(v) / tau_s),   tau_s = 0.1
    L = (1/|P|) sum_{(i, v) in P} (1/B) sum_b  -sum_k P_t^(i)[b, k] log Q_s^(v)[b, k]
    P = {(i, v) : v != i}                     (cross-view pairs only; |P| = 2 (V - 1))

    c <- 0.9 c + 0.1 * mean over the global batch and both global crops of t   (after the loss)

tau_t(epoch) follows DINO's table `concatenate(linspace(0.04, 0.07, W), ones(E - W) * 0.07)`:
linear from 0.04 at epoch 0 to 0.07 at epoch W - 1, then 0.07 (W = 30, README's ViT-S/16
setting; 0 gives a constant 0.07), indexed by the integer epoch. The loss uses the centre from
before this step. The batch mean of the teacher outputs is DINO's `all_reduce` / world size:
on a global batch sharded over devices `jnp.mean` is already the mean over every device.

Extra state: the centre c (K,), zeros at the start. The teacher is an EMA of the student:
`contrastive.ema_update` with `contrastive.cosine_momentum` (0.996 -> 1), kept by the engine.
The pairing helper and the multi-crop cross-entropy here are shared with RoB-DINO and RoB-MSN.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["Config", "State", "crop_pairs", "init_state", "loss", "mean_entropy",
           "multicrop_cross_entropy", "stack_crops", "teacher_temperature"]


@dataclasses.dataclass(frozen=True)
class Config:
  """DINO hyperparameters (the README's ViT-S/16 run: teacher 0.07, 30 warm-up epochs)."""

  student_temperature: float = 0.1
  teacher_temperature: float = 0.07
  warmup_teacher_temperature: float = 0.04
  warmup_teacher_temperature_epochs: int = 30
  center_momentum: float = 0.9


class State(struct.PyTreeNode):
  """DINO's centre of the teacher outputs, (K,)."""

  center: jax.Array


def init_state(out_dim: int) -> State:
  """A zero centre for K = `out_dim` prototypes (DINO's `torch.zeros(1, out_dim)`)."""
  return State(center=jnp.zeros((out_dim,), jnp.float32))


def teacher_temperature(epoch: int | jax.Array, config: Config = Config()) -> jax.Array:
  """DINO's teacher temperature at an integer epoch (see the module docstring)."""
  start, end = config.warmup_teacher_temperature, config.teacher_temperature
  warmup = config.warmup_teacher_temperature_epochs
  if warmup < 0:
    raise ValueError(f"warm-up epochs must be >= 0, got {warmup}")
  epoch = jnp.asarray(epoch, jnp.float32)
  if warmup == 0:
    return jnp.full((), end, jnp.float32)
  slope = (end - start) / (warmup - 1) if warmup > 1 else 0.0
  return jnp.where(epoch < warmup, start + slope * epoch, end).astype(jnp.float32)


def stack_crops(crops: jax.Array | Sequence[jax.Array]) -> jax.Array:
  """(V, B, K) float32 from a (V, B, K) array or a sequence of V (B, K) arrays."""
  stacked = jnp.stack(list(crops)) if isinstance(crops, (list, tuple)) else jnp.asarray(crops)
  if stacked.ndim != 3:
    raise ValueError(f"expected crops of shape (V, B, K) or a list of (B, K), got "
                     f"{stacked.shape}")
  return stacked.astype(jnp.float32)


def crop_pairs(num_teacher_crops: int, num_student_crops: int, *,
               swapped: bool) -> tuple[tuple[int, int], ...]:
  """The (teacher crop i, student crop v) pairs of the loss, as VISSL's criteria skip them.

  swapped=True (DINO): every v != i. swapped=False (RoB, VISSL `swapped_assignment: false`):
  the student's global crop i only with the teacher on crop i; every local crop (v >= the
  number of teacher crops) with every teacher crop.
  """
  if not 0 < num_teacher_crops <= num_student_crops:
    raise ValueError(f"need 1 <= teacher crops <= student crops (the teacher sees the first "
                     f"crops of the student's), got {num_teacher_crops} teacher and "
                     f"{num_student_crops} student crops")
  pairs = []
  for i in range(num_teacher_crops):
    for v in range(num_student_crops):
      if swapped and v == i:
        continue
      if not swapped and v < num_teacher_crops and v != i:
        continue
      pairs.append((i, v))
  if not pairs:
    raise ValueError(f"no crop pairs: {num_teacher_crops} teacher and {num_student_crops} "
                     f"student crops with swapped={swapped}")
  return tuple(pairs)


def multicrop_cross_entropy(teacher_probs: jax.Array, student_logits: jax.Array,
                            student_temperature: float,
                            pairs: Sequence[tuple[int, int]]) -> jax.Array:
  """mean over pairs (i, v) of mean_b -sum_k p^(i)[b, k] log_softmax(s^(v)[b] / tau_s)[k].

  Args:
    teacher_probs: (T, B, K) target distributions (constants).
    student_logits: (V, B, K) student outputs.
    student_temperature: tau_s.
    pairs: from `crop_pairs`.
  """
  if teacher_probs.shape[1:] != student_logits.shape[1:]:
    raise ValueError(f"teacher outputs {teacher_probs.shape} and student outputs "
                     f"{student_logits.shape} differ in batch or prototype count")
  teacher_probs = jax.lax.stop_gradient(teacher_probs)
  log_q = jax.nn.log_softmax(student_logits / student_temperature, axis=-1)
  total = jnp.zeros((), jnp.float32)
  for i, v in pairs:
    total = total + jnp.mean(-jnp.sum(teacher_probs[i] * log_q[v], axis=-1))
  return total / len(pairs)


def mean_entropy(probs: jax.Array) -> jax.Array:
  """Mean entropy (nats) of the distributions along the last axis (a collapse monitor)."""
  return jnp.mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def loss(state: State, student_logits: jax.Array | Sequence[jax.Array],
         teacher_logits: jax.Array | Sequence[jax.Array], epoch: int | jax.Array, *,
         config: Config = Config()) -> tuple[jax.Array, dict[str, jax.Array], State]:
  """DINO's loss with the centre from before this step, then the centre update.

  Args:
    state: the centre.
    student_logits: (V, B, K) student head outputs, global crops first (or a list of V).
    teacher_logits: (2, B, K) teacher head outputs on the global crops (or a list); no
      gradient flows into them.
    epoch: the integer epoch, for the teacher temperature.
    config: hyperparameters.

  Returns:
    (loss, metrics {'loss', 'teacher_temperature', 'teacher_entropy'}, new state).
  """
  student = stack_crops(student_logits)
  teacher = jax.lax.stop_gradient(stack_crops(teacher_logits))
  if teacher.shape[-1] != state.center.shape[-1]:
    raise ValueError(f"teacher outputs have {teacher.shape[-1]} prototypes, the centre "
                     f"{state.center.shape[-1]}")
  temperature = teacher_temperature(epoch, config)
  probs = jax.nn.softmax((teacher - state.center) / temperature, axis=-1)
  pairs = crop_pairs(teacher.shape[0], student.shape[0], swapped=True)
  value = multicrop_cross_entropy(probs, student, config.student_temperature, pairs)
  batch_center = jnp.mean(teacher, axis=(0, 1))
  m = config.center_momentum
  new_state = State(center=m * state.center + (1.0 - m) * batch_center)
  metrics = {"loss": value, "teacher_temperature": temperature,
             "teacher_entropy": mean_entropy(probs)}
  return value, metrics, new_state

"""RoB-iBOT: iBOT's CLS and masked-patch cross-entropies against a frozen iBOT teacher.

RoB (arXiv 2301.09451), from the authors' VISSL code (`vissl/losses/ibot_distillation_loss.py`,
`IBOTDistillationLoss.criterion`, commit 04788de9; rob.md 2.4). The teacher (iBOT ViT trunk and
its own head, shared by the class token and the patch tokens, 8,192 prototypes; eval mode, no
masking) sees the two global crops; the student sees all V crops, its global crops with iBOT's
block masks m (True = the patch embedding was replaced by the mask token):

    P^(i)   = softmax(t_cls^(i) / 0.07)        Q^(i) = softmax(t_patch^(i) / 0.07)   no gradient
    L_cls   = (1/|P|) sum_{(i, v) in P} mean_b -sum_k P^(i)[b, k] log_softmax(s_cls^(v)[b] / 0.1)[k]
    L_patch = (1/G) sum_i mean_b [ sum_n m^(i)[b, n] ce_n / max(sum_n m^(i)[b, n], 1) ],
              ce_n = -sum_k Q^(i)[b, n, k] log_softmax(s_patch^(i)[b, n] / 0.1)[k]
    L       = lambda1 L_cls + lambda2 L_patch                          (lambda1 = lambda2 = 1)

P are RoB-DINO's pairs (`dino.crop_pairs`): with `swapped_assignment=False` (every RoB config)
the student's global crop i with the teacher on crop i and every local crop with both; True
gives iBOT's cross-view pairs for the class token. The patch term always pairs a global crop
with the teacher on the same crop, as iBOT does. An image whose mask is empty adds 0 to its
crop's patch mean (the clamp at 1), exactly as VISSL.

Readings of the open points (rob.md 2.4, 7.4-7.5):
- Centring. VISSL's RoB loss has none (a frozen teacher cannot collapse; rob.md 2.1 step 5)
  and that is the default, `centering=False`. `centering=True` applies iBOT's own centring
  (bytedance/ibot `main_ibot.py` `iBOTLoss`): the teacher's CLS outputs minus a centre c, its
  patch outputs minus c2, both updated after the loss with momentum 0.9 from the batch mean
  (c2: the mean over images and patches), as iBOT's `update_center`. iBOT's temperature
  warm-up is not offered: RoB's teacher temperature is fixed at 0.07.
- Temperatures: teacher 0.07 for both terms, student 0.1 (VISSL config values).
- The masking hyperparameters live here too (the engine reads them; `retro_jax/data/
  block_masks.py` draws the masks): VISSL's `MaskedImageModeling` with `pred_ratio_mean
  [0.0, 0.3]`, `pred_ratio_var [0.0, 0.2]`: half the images unmasked, the others U(0.1, 0.5)
  of their patches, in blocks. `mask_aspect_sampling='vissl'` (the default) samples the block
  aspect ratio as VISSL's code runs: exp(U(0.3, 1/0.3)), the bounds taken as logarithms
  (always taller than wide, 1.35 to 28); 'ibot' as iBOT's loader, exp(U(log 0.3, log 1/0.3)).

Extra state: the two centres (K,), K = `num_prototypes`, zeros and unchanged unless
`centering`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from retro_jax.objectives import dino

__all__ = ["Config", "MASK_ASPECT_SAMPLING", "State", "init_state", "loss"]

MASK_ASPECT_SAMPLING = ("vissl", "ibot")


@dataclasses.dataclass(frozen=True)
class Config:
  """RoB-iBOT hyperparameters (`ibot_distill_deit_b16_to_deit_s16_on_in1k.yaml`)."""

  num_prototypes: int = 8192  # the teacher head's (iBOT's out_dim); checked against it
  teacher_temperature: float = 0.07
  teacher_patch_temperature: float = 0.07
  student_temperature: float = 0.1
  lambda1: float = 1.0
  lambda2: float = 1.0
  swapped_assignment: bool = False
  centering: bool = False
  center_momentum: float = 0.9
  center_momentum2: float = 0.9
  # VISSL `MaskedImageModeling` (RoB's configs): one (mean, var) pair drawn per image.
  pred_ratio_mean: tuple[float, ...] = (0.0, 0.3)
  pred_ratio_var: tuple[float, ...] = (0.0, 0.2)
  mask_aspect_ratio: tuple[float, float] = (0.3, 1.0 / 0.3)
  mask_aspect_sampling: str = "vissl"

  def __post_init__(self):
    # ml_collections hands lists; the masks' hash-free static use wants tuples.
    for name in ("pred_ratio_mean", "pred_ratio_var", "mask_aspect_ratio"):
      object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
    if len(self.pred_ratio_mean) != len(self.pred_ratio_var) or not self.pred_ratio_mean:
      raise ValueError(f"pred_ratio_mean {self.pred_ratio_mean} and pred_ratio_var "
                       f"{self.pred_ratio_var} must be non-empty and of the same length")
    for mean, var in zip(self.pred_ratio_mean, self.pred_ratio_var):
      if not 0.0 <= mean - var <= mean + var < 1.0:
        raise ValueError(f"masking ratio {mean} +- {var} must stay within [0, 1)")
    if len(self.mask_aspect_ratio) != 2 or not 0 < self.mask_aspect_ratio[0]:
      raise ValueError(f"mask_aspect_ratio must be two positive bounds, got "
                       f"{self.mask_aspect_ratio}")
    if self.mask_aspect_sampling not in MASK_ASPECT_SAMPLING:
      raise ValueError(f"mask_aspect_sampling must be one of {MASK_ASPECT_SAMPLING}, got "
                       f"{self.mask_aspect_sampling!r}")


class State(struct.PyTreeNode):
  """iBOT's centres of the teacher's CLS and patch outputs (used only with `centering`)."""

  center: jax.Array
  patch_center: jax.Array


def init_state(out_dim: int) -> State:
  return State(center=jnp.zeros((out_dim,), jnp.float32),
               patch_center=jnp.zeros((out_dim,), jnp.float32))


def _patch_cross_entropy(teacher_probs: jax.Array, student_logits: jax.Array,
                         masks: jax.Array, student_temperature: float) -> jax.Array:
  """(1/G) sum_i mean_b of the masked-patch mean cross-entropy (module docstring)."""
  log_q = jax.nn.log_softmax(student_logits / student_temperature, axis=-1)
  ce = -jnp.sum(teacher_probs * log_q, axis=-1)  # (G, B, N)
  weights = masks.astype(jnp.float32)
  per_image = jnp.sum(ce * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
  return jnp.mean(jnp.mean(per_image, axis=-1))


def loss(state: State, student_cls: jax.Array, student_patch: jax.Array,
         teacher_cls: jax.Array, teacher_patch: jax.Array, masks: jax.Array, *,
         config: Config = Config()) -> tuple[jax.Array, dict[str, jax.Array], State]:
  """RoB-iBOT's loss.

  Args:
    state: the centres.
    student_cls: (V, B, K) student head outputs on the class token of every crop, the
      teacher's G global crops first.
    student_patch: (G, B, N, K) student head outputs on the patch tokens of the global crops.
    teacher_cls: (G, B, K) teacher head outputs on the class token; no gradient.
    teacher_patch: (G, B, N, K) teacher head outputs on the patch tokens; no gradient.
    masks: (G, B, N) bool, the student's masked patches.
    config: hyperparameters.

  Returns:
    (loss, metrics {'loss', 'cls_loss', 'patch_loss' (both weighted), 'teacher_entropy',
    'teacher_patch_entropy', 'masked_fraction'}, new state).
  """
  student_cls = dino.stack_crops(student_cls)
  teacher_cls = jax.lax.stop_gradient(dino.stack_crops(teacher_cls))
  student_patch = jnp.asarray(student_patch, jnp.float32)
  teacher_patch = jax.lax.stop_gradient(jnp.asarray(teacher_patch, jnp.float32))
  num_global = teacher_cls.shape[0]
  if (student_patch.shape != teacher_patch.shape or student_patch.shape[0] != num_global
      or masks.shape != student_patch.shape[:-1]):
    raise ValueError(f"patch outputs: student {student_patch.shape}, teacher "
                     f"{teacher_patch.shape} and masks {masks.shape} must be (G, B, N, K) "
                     f"and (G, B, N) with G = {num_global} teacher crops")
  centred_cls, centred_patch = teacher_cls, teacher_patch
  if student_cls.shape[-1] != state.center.shape[-1]:
    raise ValueError(f"head outputs have {student_cls.shape[-1]} prototypes, the state "
                     f"{state.center.shape[-1]} (config.num_prototypes)")
  if config.centering:
    centred_cls, centred_patch = teacher_cls - state.center, teacher_patch - state.patch_center
  probs = jax.nn.softmax(centred_cls / config.teacher_temperature, axis=-1)
  patch_probs = jax.nn.softmax(centred_patch / config.teacher_patch_temperature, axis=-1)
  pairs = dino.crop_pairs(num_global, student_cls.shape[0], swapped=config.swapped_assignment)
  # Weighted as VISSL reports its 'cls' and 'patch' terms.
  cls_loss = config.lambda1 * dino.multicrop_cross_entropy(
      probs, student_cls, config.student_temperature, pairs)
  patch_loss = config.lambda2 * _patch_cross_entropy(patch_probs, student_patch, masks,
                                                     config.student_temperature)
  value = cls_loss + patch_loss
  new_state = state
  if config.centering:
    # iBOT's update_center: global-batch means of the uncentred outputs (patches: over
    # images and patch positions).
    m, m2 = config.center_momentum, config.center_momentum2
    new_state = State(
        center=m * state.center + (1.0 - m) * jnp.mean(teacher_cls, axis=(0, 1)),
        patch_center=(m2 * state.patch_center
                      + (1.0 - m2) * jnp.mean(teacher_patch, axis=(0, 1, 2))))
  metrics = {"loss": value, "cls_loss": cls_loss, "patch_loss": patch_loss,
             "teacher_entropy": dino.mean_entropy(probs),
             "teacher_patch_entropy": dino.mean_entropy(patch_probs),
             "masked_fraction": jnp.mean(masks.astype(jnp.float32))}
  return value, metrics, new_state

"""DINO and RoB (-DINO, -MSN, -SwAV, -iBOT) on the engine: multi-crop students, teacher targets.

    dino      student f, head h on every crop;  targets: the EMA copy (f_ema, h_ema) on the
              global crops, centred and sharpened (retro_jax/objectives/dino.py)
    rob_dino  targets: a frozen DINO teacher (trunk + its own head) on the global crops; the
              student has a fresh DINO head onto the teacher's K prototypes
    rob_msn   targets: a frozen MSN teacher's prototype probabilities; the student has a plain
              MLP onto the K = 1,024 logits and drops patch tokens on the global crops (ViT)
    rob_swav  targets: Sinkhorn codes of a frozen SwAV teacher's prototype scores on the first
              crop (or two); the student's VISSL `mlp` projection is scored against the
              teacher's prototypes (or, use_teacher_prototypes=False, its own SwAV head's)
    rob_ibot  targets: a frozen iBOT teacher's class and patch logits on the global crops; the
              student's global crops are block-masked (retro_jax/train/rob_ibot_method.py)

Crops of one size go through the network together, as DINO's `MultiCropWrapper` does: the
global crops as one batch, the local crops as another (batch norm of a CNN student therefore
sees each group's statistics, as in the reference). The objective modules hold the equations;
this file only wires modules, crops and schedules.

DINO extras kept here: the teacher momentum follows `contrastive.cosine_momentum` (0.996 ->
1 over the run) and is applied before the loss (DINO updates its teacher after the student
step; applying it at the start of the next step with the same count is the same sequence,
shifted by the first step, where DINO's teacher equals the student anyway); the last layer of
the student head gets no update during the first `freeze_last_layer_epochs` epochs
(DINO's `cancel_gradients_last_layer`, 1 epoch by default): the optimiser skips it as
torch's AdamW skips a tensor without gradient (`early_freeze`, retro_jax/train/freeze.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models import create_backbone
from retro_jax.models.heads import DINOHead
from retro_jax.models.heads import FrozenParam
from retro_jax.models.heads import MLPHead
from retro_jax.models.heads import MSNHead
from retro_jax.models.heads import SwAVHead
from retro_jax.models.vit import VisionTransformer
from retro_jax.objectives import contrastive
from retro_jax.objectives import dino
from retro_jax.objectives import rob_dino
from retro_jax.objectives import rob_ibot
from retro_jax.objectives import rob_msn
from retro_jax.objectives import rob_swav
from retro_jax.train import precision
from retro_jax.train import rob_ibot_method
from retro_jax.train import teacher as teacher_lib
from retro_jax.train.freeze import EarlyFreeze
from retro_jax.train.optim import parameter_name

METHODS = ("dino", "rob_dino", "rob_msn", "rob_swav", "rob_ibot")


class MultiCropStudent(nnx.Module):
  """The trained student (backbone + head) and, for DINO, its EMA copy (the teacher)."""

  def __init__(self, backbone: nnx.Module, head: nnx.Module,
               ema_backbone: nnx.Module | None = None, ema_head: nnx.Module | None = None):
    self.backbone = backbone
    self.head = head
    self.ema_backbone = ema_backbone
    self.ema_head = ema_head


def drop_patch_tokens(tokens: jax.Array, ratio: float, key: jax.Array) -> jax.Array:
  """MSN's token drop: keep the class token and floor(N (1 - ratio)) random patch tokens.

  One permutation is shared by the whole batch (MSN `src/deit.py`, VISSL `MSNDropMasking`);
  the positional embeddings were added before (they are part of `embed_tokens`).
  """
  num_patches = tokens.shape[1] - 1
  keep = int(num_patches * (1.0 - ratio))
  if keep < 1:
    raise ValueError(f"token drop ratio {ratio} leaves no patch of {num_patches}")
  kept = jax.random.permutation(key, num_patches)[:keep] + 1
  return jnp.concatenate([tokens[:, :1], jnp.take(tokens, kept, axis=1)], axis=1)


def _head_last_layer(params) -> Any:
  """True for the student head's last-layer tensors (DINO: '"last_layer" in name')."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: parameter_name(path).startswith("head.last_layer."), params)


def _size_groups(views) -> list[tuple[int, int]]:
  """[start, stop) ranges of consecutive views of the same shape (DINO's MultiCropWrapper)."""
  groups, start = [], 0
  for v in range(1, len(views) + 1):
    if v == len(views) or views[v].shape != views[start].shape:
      groups.append((start, v))
      start = v
  return groups


@dataclasses.dataclass(frozen=True)
class MultiCropMethod:
  """One of METHODS with its hyperparameters and model choices.

  Attributes:
    name: 'dino', 'rob_dino', 'rob_msn', 'rob_swav' or 'rob_ibot'.
    objective: the objective module's Config.
    student: backbone name; `student_kwargs` its options (e.g. img_size, drop_path_rate).
    head: head options. dino: DINOHead's (out_features, norm_last_layer, num_layers,
      hidden_features, bottleneck_features, batch_norm); rob_dino: the same except
      out_features, which is the teacher's; rob_msn: hidden_features, batch_norm (VISSL's
      `mlp` [d, 2048, 1024], no activation); rob_swav: hidden_features, batch_norm (default
      True: VISSL's `mlp` [d, 2048, 128] with BN, no activation, or its own `swav_head`).
    steps_per_epoch, total_steps: for DINO's schedules (momentum, temperature, freezing).
    num_teacher_crops: the first crops, seen by the teacher (the two global crops).
    token_drop_ratio: rob_msn with a ViT student (0.10 ViT-Ti, 0.15 ViT-S); 0 for none.
    teacher_momentum: DINO's base EMA momentum.
    freeze_last_layer_epochs: DINO's `freeze_last_layer`.
    dtype: the student's precision, 'float32' or 'bfloat16' (retro_jax/train/precision.py):
      backbone, head and DINO's EMA copy compute in it; head outputs leave in float32.
  """
  name: str
  objective: Any
  student: str
  student_kwargs: dict = dataclasses.field(default_factory=dict)
  head: dict = dataclasses.field(default_factory=dict)
  steps_per_epoch: int = 1
  total_steps: int = 1
  num_teacher_crops: int = 2
  token_drop_ratio: float = 0.0
  teacher_momentum: float = 0.996
  freeze_last_layer_epochs: int = 0
  dtype: str = "float32"

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"unknown multi-crop method {self.name!r}; expected one of {METHODS}")
    precision.compute_dtype(self.dtype)  # an unknown name fails here, before any build
    if not 0.0 <= self.token_drop_ratio < 1.0:
      raise ValueError(f"token_drop_ratio must be in [0, 1), got {self.token_drop_ratio}")

  @property
  def needs_teacher(self) -> bool:
    return self.name != "dino"

  def build(self, teacher: nnx.Module | None, *, rngs: nnx.Rngs) -> MultiCropStudent:
    dtype = precision.compute_dtype(self.dtype)
    backbone = create_backbone(self.student, rngs=rngs, dtype=dtype, **self.student_kwargs)
    if self.token_drop_ratio and not isinstance(backbone, VisionTransformer):
      raise ValueError(f"token dropping needs a ViT student, not {self.student}; set "
                       "student.token_drop_ratio=0")
    width = backbone.feature_width
    options = dict(self.head, dtype=dtype)
    if self.name == "dino":
      if "out_features" not in options:
        raise ValueError("student.head.out_features (DINO's K prototypes) is required")
      head = DINOHead(width, options.pop("out_features"), **options, rngs=rngs)
      # DINO builds its teacher without stochastic depth (`drop_path_rate` only on the student).
      ema_kwargs = {k: v for k, v in self.student_kwargs.items() if k != "drop_path_rate"}
      ema_backbone = create_backbone(self.student, rngs=rngs, dtype=dtype, **ema_kwargs)
      ema_head = DINOHead(width, head.out_features, **options, rngs=rngs)
      for target, source in ((ema_backbone, backbone), (ema_head, head)):
        nnx.update(target, jax.tree.map(jnp.copy, nnx.state(source, nnx.Param)))
      return MultiCropStudent(backbone, head, ema_backbone, ema_head)
    if self.name == "rob_ibot":
      return rob_ibot_method.build(backbone, teacher, self.head, self.objective, rngs=rngs)
    teacher_head = None if teacher is None else teacher.head
    if self.name == "rob_dino":
      if not isinstance(teacher_head, DINOHead):
        raise ValueError("rob_dino needs a DINO teacher with its DINO head (convert a DINO "
                         "checkpoint together with its head)")
      options.pop("out_features", None)
      options.setdefault("norm_last_layer", False)  # RoB's students train the gain
      return MultiCropStudent(backbone, DINOHead(width, teacher_head.out_features, **options,
                                                 rngs=rngs))
    if self.name == "rob_swav":
      return MultiCropStudent(backbone, self._swav_student_head(width, teacher_head, options,
                                                                rngs))
    if not isinstance(teacher_head, MSNHead):
      raise ValueError("rob_msn needs an MSN teacher with its MSN head (prototypes)")
    num_prototypes = teacher_head.prototypes.shape[0]
    if num_prototypes != self.objective.num_prototypes:
      raise ValueError(f"the teacher has {num_prototypes} prototypes, "
                       f"objective.num_prototypes is {self.objective.num_prototypes}")
    dims = (width, options.get("hidden_features", 2048), num_prototypes)
    return MultiCropStudent(backbone, MLPHead(dims, activation=None,
                                              batch_norm=options.get("batch_norm", False),
                                              dtype=dtype, rngs=rngs))

  def _swav_student_head(self, width: int, teacher_head, options: dict,
                         rngs: nnx.Rngs) -> nnx.Module:
    """RoB-SwAV's student head (VISSL `student/resnet*_swav_teacher_prot.yaml` and
    `student/resnet*_swav.yaml`): the `mlp` [d, hidden, D] (Linear, BN, Linear, no ReLU) whose
    output the teacher's prototypes score, or a SwAV head with its own K prototypes."""
    if not isinstance(teacher_head, SwAVHead):
      raise ValueError("rob_swav needs a SwAV teacher with its head and prototypes (convert it "
                       "with --format swav)")
    if teacher_head.num_prototypes != self.objective.num_prototypes:
      raise ValueError(f"the teacher has {teacher_head.num_prototypes} prototypes, "
                       f"objective.num_prototypes is {self.objective.num_prototypes}")
    hidden = options.get("hidden_features", 2048)
    batch_norm = options.get("batch_norm", True)
    if self.objective.use_teacher_prototypes:
      return MLPHead((width, hidden, teacher_head.out_features), activation=None,
                     batch_norm=batch_norm, dtype=options.get("dtype"), rngs=rngs)
    return SwAVHead(width, teacher_head.num_prototypes, hidden_features=hidden,
                    out_features=teacher_head.out_features, batch_norm=batch_norm, rngs=rngs)

  def trainable_filter(self):
    """Student params except frozen weight-norm gains; never the EMA copy."""
    return nnx.All(nnx.Param, nnx.Not(FrozenParam), nnx.Not(nnx.PathContains("ema_backbone")),
                   nnx.Not(nnx.PathContains("ema_head")))

  def init_state(self, key: jax.Array):
    del key  # no random buffers
    if self.name == "dino":
      return dino.init_state(self.head["out_features"])
    if self.name == "rob_ibot":
      return rob_ibot.init_state(self.objective.num_prototypes)
    if self.name == "rob_swav":
      return rob_swav.init_state()
    return rob_dino.init_state() if self.name == "rob_dino" else rob_msn.init_state()

  def momentum_update(self, model: MultiCropStudent, step: jax.Array) -> None:
    if self.name != "dino":
      return
    m = contrastive.cosine_momentum(step, self.total_steps, self.teacher_momentum)
    for ema, live in ((model.ema_backbone, model.backbone), (model.ema_head, model.head)):
      nnx.update(ema, contrastive.ema_update(nnx.state(ema, nnx.Param),
                                             nnx.state(live, nnx.Param), m))

  def _pooled(self, backbone, images, drop_key):
    if drop_key is None:
      return backbone(images).pooled
    tokens = drop_patch_tokens(backbone.embed_tokens(images), self.token_drop_ratio, drop_key)
    return backbone.encode(tokens)[:, 0]

  def _outputs(self, backbone, head, views, key=None) -> jax.Array:
    """(V, B, K) float32 head outputs (the objectives' softmax input), one forward per group
    of same-size crops."""
    outputs = []
    for start, stop in _size_groups(views):
      drop_key = None
      if key is not None and self.token_drop_ratio and stop <= self.num_teacher_crops:
        drop_key = jax.random.fold_in(key, start)
      pooled = self._pooled(backbone, jnp.concatenate(views[start:stop]), drop_key)
      outputs.extend(jnp.split(head(pooled).astype(jnp.float32), stop - start))
    return jnp.stack(outputs)

  def loss(self, model: MultiCropStudent, teacher, views, state, *, step, key):
    """(loss, metrics, new objective state) for the crops (global crops first)."""
    if self.name == "rob_ibot":  # masked global crops with patch tokens: its own forward
      local = views[self.num_teacher_crops:]
      local_cls = self._outputs(model.backbone, model.head, local) if local else None
      return rob_ibot_method.loss(model, teacher, views[:self.num_teacher_crops], local_cls,
                                  state, key=key, config=self.objective)
    student = self._outputs(model.backbone, model.head, views, key)
    globals_ = views[:self.num_teacher_crops]
    if self.name == "dino":
      targets = jax.lax.stop_gradient(
          self._outputs(model.ema_backbone, model.ema_head, globals_))
      return dino.loss(state, student, targets, step // self.steps_per_epoch,
                       config=self.objective)
    if self.name == "rob_swav":
      return self._swav_loss(teacher, student, views, state)
    x = teacher_lib.as_input(teacher, jnp.concatenate(globals_))
    # The head runs in float32 even for a bfloat16 teacher: its softmax at temperature 0.025
    # (MSN) or over 65,536 prototypes (DINO) would lose too much in bfloat16.
    targets = teacher.head(teacher.backbone(x).pooled.astype(jnp.float32))
    targets = jax.lax.stop_gradient(jnp.stack(jnp.split(targets, len(globals_))))
    loss_fn = rob_dino.loss if self.name == "rob_dino" else rob_msn.loss
    return loss_fn(state, student, targets, config=self.objective)

  def _swav_loss(self, teacher, student, views, state):
    """RoB-SwAV: the teacher's prototype scores on its crops (VISSL's hook: crop 0, or the two
    global crops with use_two_crops_for_teacher) and, for the student, its prototypes."""
    crops = views[:self.objective.num_teacher_crops]
    x = teacher_lib.as_input(teacher, jnp.concatenate(crops))
    scores = teacher.head(teacher.backbone(x).pooled.astype(jnp.float32)).astype(jnp.float32)
    scores = jax.lax.stop_gradient(jnp.stack(jnp.split(scores, len(crops))))
    prototypes = (teacher.head.prototype_matrix() if self.objective.use_teacher_prototypes
                  else None)
    return rob_swav.loss(state, student, scores, prototypes, config=self.objective)

  @property
  def early_freeze(self) -> EarlyFreeze | None:
    """DINO's `cancel_gradients_last_layer`: head.last_layer waits for the first epochs.

    Handed to the optimiser (`optim.build_optimizer(freeze=...)`), not applied to the
    gradients: torch's AdamW skips a tensor whose grad is None (no decay, no moments, no step
    count), which a zeroed gradient does not reproduce (retro_jax/train/freeze.py).
    """
    if not self.freeze_last_layer_epochs:
      return None
    return EarlyFreeze(_head_last_layer,
                       self.freeze_last_layer_epochs * self.steps_per_epoch)

  def export_backbone(self, model: MultiCropStudent) -> nnx.Module:
    return model.backbone

  def export_head(self, model: MultiCropStudent) -> tuple[nnx.Module, str, dict[str, Any]]:
    """The student head with the `EncoderSpec` head kind and arguments that rebuild it."""
    if self.name == "rob_ibot":
      return rob_ibot_method.export_head(model, self.head)
    head = model.head
    if isinstance(head, DINOHead):
      options = {k: v for k, v in self.head.items() if k != "out_features"}
      if self.name == "rob_dino":
        options.setdefault("norm_last_layer", False)
      return head, "dino", dict(options, in_features=head.in_features,
                                out_features=head.out_features)
    hidden = self.head.get("hidden_features", 2048)
    batch_norm = self.head.get("batch_norm", self.name == "rob_swav")
    if isinstance(head, SwAVHead):
      return head, "swav", {"in_features": head.in_features, "hidden_features": hidden,
                            "num_prototypes": head.num_prototypes,
                            "out_features": head.out_features, "batch_norm": batch_norm}
    dims = [head.in_features, hidden, head.out_features]
    return head, "mlp", {"dims": dims, "activation": None, "batch_norm": batch_norm}

"""RoB-iBOT's model and forward on the engine (`MultiCropMethod('rob_ibot')` calls these).

    student  a ViT whose global crops are block-masked (iBOT's masks, a learnable mask token in
             place of the masked patch embeddings, before the positions) and a fresh head on
             every token: the class token of every crop, the patch tokens of the global crops
    teacher  a converted iBOT teacher (`convert --format ibot`: the ViT and its head shared by
             CLS and patch tokens), unmasked, on the global crops: its CLS and patch logits
    loss     retro_jax/objectives/rob_ibot.py

From the authors' VISSL code (commit 04788de9): `IBOTMaskedModeling` and `prepare_tokens`
(vissl/models/trunks/vision_transformer.py; the token `masked_embed` starts at zero, as
there), the heads `ibot_head` and `ibot_distillation_head` (vissl/models/heads/), the teacher
hook `_send_prototypes_to_ibot_loss` (vissl/hooks/distillation_hooks.py) and the configs
`ibot_distill_deit_{b16,l16}_to_deit_s16_on_in1k.yaml`. Student head options (`student.head`):

  kind='ibot' (default)  VISSL's `ibot_head` as the configs set it: iBOT's DINO-style head
                         (hidden_features 2048, bottleneck_features 256, num_layers 3), shared
                         by class and patch tokens, out = the teacher's 8,192 prototypes,
                         `normalize_last_layer: False` (trained weight-norm gain)
  kind='distillation'    `ibot_distillation_head` (the `_mlp` student configs): Linear(d, 2048),
                         GELU, Linear(2048, 2048), GELU, Linear(2048, K) with a bias; no
                         bottleneck, L2 norm or weight norm. Deviation: its Linears start from
                         torch's default initialisation, VISSL's from trunc_normal(0.02).

Masks are drawn on the device from the step's model key (retro_jax/data/block_masks.py), one
per global crop and image, on the crop's patch grid; local crops are never masked (VISSL's
collator keeps only the global views' masks). Not offered: `use_teacher_prototypes` (copying
the teacher's last layer into the student after every step; false in every RoB config).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.data import block_masks
from retro_jax.models.heads import DINOHead
from retro_jax.models.heads import MLPHead
from retro_jax.models.vit import VisionTransformer
from retro_jax.objectives import rob_ibot
from retro_jax.train import teacher as teacher_lib

HEAD_KINDS = ("ibot", "distillation")
_MASK_STREAM = 0x1B07  # the masks' own stream of the step's model key


class IBOTStudent(nnx.Module):
  """The trained student: backbone, head and the learnable mask token (1, D)."""

  def __init__(self, backbone: VisionTransformer, head: nnx.Module, mask_token: nnx.Param):
    self.backbone = backbone
    self.head = head
    self.mask_token = mask_token


def build(backbone: nnx.Module, teacher: nnx.Module | None, head_options: dict[str, Any],
          config: rob_ibot.Config, *, rngs: nnx.Rngs) -> IBOTStudent:
  """The student around `backbone` for this teacher; ValueError names what does not fit."""
  if not isinstance(backbone, VisionTransformer):
    raise ValueError("rob_ibot masks patch tokens and needs a ViT student, not "
                     f"{type(backbone).__name__}")
  teacher_head = None if teacher is None else teacher.head
  if not isinstance(teacher_head, DINOHead) or not isinstance(teacher.backbone,
                                                              VisionTransformer):
    raise ValueError("rob_ibot needs an iBOT teacher: a ViT with its head (convert the full "
                     "iBOT checkpoint with --format ibot)")
  if teacher.backbone.patch_size != backbone.patch_size:
    raise ValueError(f"rob_ibot pairs patch tokens: the teacher's patches are "
                     f"{teacher.backbone.patch_size} px, the student's {backbone.patch_size} px")
  if teacher_head.out_features != config.num_prototypes:
    raise ValueError(f"the teacher has {teacher_head.out_features} prototypes, "
                     f"objective.num_prototypes is {config.num_prototypes}")
  options = dict(head_options)
  kind = options.pop("kind", "ibot")
  options.pop("out_features", None)  # the teacher's
  width, out = backbone.feature_width, teacher_head.out_features
  if kind == "ibot":
    options.setdefault("norm_last_layer", False)
    head = DINOHead(width, out, **options, rngs=rngs)
  elif kind == "distillation":
    hidden = options.get("hidden_features", 2048)
    dims = (width, *[hidden] * (options.get("num_layers", 3) - 1), out)
    head = MLPHead(dims, activation="gelu", rngs=rngs)
  else:
    raise ValueError(f"student.head.kind must be one of {HEAD_KINDS}, got {kind!r}")
  return IBOTStudent(backbone, head, nnx.Param(jnp.zeros((1, width), jnp.float32)))


def export_head(model: IBOTStudent, head_options: dict[str, Any]
                ) -> tuple[nnx.Module, str, dict[str, Any]]:
  """The student head with the `EncoderSpec` head kind and arguments that rebuild it."""
  head = model.head
  if isinstance(head, DINOHead):
    options = {k: v for k, v in head_options.items() if k not in ("kind", "out_features")}
    options.setdefault("norm_last_layer", False)
    return head, "dino", dict(options, in_features=head.in_features,
                              out_features=head.out_features)
  hidden = head_options.get("hidden_features", 2048)
  dims = [head.in_features, *[hidden] * (head_options.get("num_layers", 3) - 1),
          head.out_features]
  return head, "mlp", {"dims": dims, "activation": "gelu"}


def draw_masks(key: jax.Array, globals_: jax.Array, patch_size: int,
               config: rob_ibot.Config) -> jax.Array:
  """(G, B, N) bool block masks for the global crops (G, B, H, W, C)."""
  grid = (globals_.shape[2] // patch_size, globals_.shape[3] // patch_size)
  return block_masks.block_masks(
      jax.random.fold_in(key, _MASK_STREAM), globals_.shape[:2], grid,
      ratio_mean=config.pred_ratio_mean, ratio_var=config.pred_ratio_var,
      aspect_ratio=config.mask_aspect_ratio, aspect_sampling=config.mask_aspect_sampling)


def _split_tokens(logits: jax.Array, num_crops: int) -> tuple[jax.Array, jax.Array]:
  """(G * B, 1 + N, K) -> class (G, B, K) and patch (G, B, N, K) logits, float32."""
  logits = logits.astype(jnp.float32)
  logits = logits.reshape(num_crops, -1, *logits.shape[1:])
  return logits[:, :, 0], logits[:, :, 1:]


def loss(model: IBOTStudent, teacher: nnx.Module, global_views, local_cls: jax.Array | None,
         state: rob_ibot.State, *, key: jax.Array, config: rob_ibot.Config):
  """(loss, metrics, new state) for the global crops and the local crops' class outputs.

  Args:
    model: the student.
    teacher: the frozen converted iBOT teacher.
    global_views: the G global crops, each (B, H, W, C), seen by both networks.
    local_cls: (L, B, K) student head outputs on the local crops' class token, or None.
    state: the objective's state (centres).
    key: the step's model key (the masks' randomness).
    config: the objective's Config (loss and masking).
  """
  num_global = len(global_views)
  globals_ = jnp.stack(global_views)
  masks = draw_masks(key, globals_, model.backbone.patch_size, config)
  images = globals_.reshape(-1, *globals_.shape[2:])
  tokens = model.backbone.encode(model.backbone.embed_tokens(
      images, masks.reshape(images.shape[0], -1), model.mask_token[...]))
  student_cls, student_patch = _split_tokens(model.head(tokens), num_global)
  if local_cls is not None:
    student_cls = jnp.concatenate([student_cls, local_cls.astype(jnp.float32)])
  x = teacher_lib.as_input(teacher, images)
  # The head in float32 even for a bfloat16 teacher: a softmax over 8,192 prototypes at 0.07.
  teacher_tokens = teacher.backbone(x).feature_map.astype(jnp.float32)
  teacher_cls, teacher_patch = jax.lax.stop_gradient(
      _split_tokens(teacher.head(teacher_tokens), num_global))
  return rob_ibot.loss(state, student_cls, student_patch, teacher_cls, teacher_patch, masks,
                       config=config)

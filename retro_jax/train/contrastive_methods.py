"""MoCo-v2, DisCo and Retro on the engine: which modules train, and how a step's loss is wired.

The three share MoCo's skeleton: a student (query encoder), a momentum ("mean") copy that
gives the keys, and a queue of past keys. They differ in what the embeddings pass through:

  mocov2   q = h(f(x1)),            k = h_ema(f_ema(x2))            own head h (EMA'd too)
  disco    mocov2's q, k, plus consistency of h(f(x)) to the teacher's embedding g_t(f_t(x))
  retro    q = g_t(GAP(A(F(x1)))),  k = g_t(GAP(A(F_ema(x2))))      F: the pre-pool feature
           map, A: the trainable adapter, g_t: the teacher's head (frozen: it lives in the
           teacher's state, which is never differentiated or optimised), plus consistency

The student container (`ContrastiveStudent`) holds everything trained and the EMA copies;
`trainable_filter` picks what the optimiser sees. The teacher arrives as a separate NNX
module (eval mode) whose state is an argument of the jitted step, not part of the training
state, so it is never saved, optimised or donated.

Order inside a step (MoCo's `forward`): EMA update of the key encoder with the *current*
student parameters, then the keys, then the loss against the queue as it was, then the
enqueue. Batch norm: every BN runs in train mode on the global (device-sharded) batch, i.e.
synchronised BN over the whole batch. The reference code uses per-GPU BN of 32 with MoCo's
shuffle-BN for the key encoder; that is an open point recorded in the README.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models import create_backbone
from retro_jax.models.adapters import create_adapter
from retro_jax.models.encoder import PooledAdapter
from retro_jax.models.heads import MLPHead
from retro_jax.objectives import contrastive
from retro_jax.objectives import disco
from retro_jax.objectives import mocov2
from retro_jax.objectives import retro
from retro_jax.train import teacher as teacher_lib

METHODS = ("mocov2", "disco", "retro")


class ContrastiveStudent(nnx.Module):
  """The trained modules of a MoCo-style method and their momentum copies.

  Attributes:
    backbone: the student network.
    head: its own projection head (mocov2, disco); None for retro.
    adapter: retro's dimension adapter on the pre-pool feature map; None otherwise.
    ema_backbone, ema_head: the momentum encoder (ema_head None for retro, whose mean
      student shares the adapter and the teacher's head).
  """

  def __init__(self, backbone: nnx.Module, head: nnx.Module | None,
               adapter: nnx.Module | None, ema_backbone: nnx.Module,
               ema_head: nnx.Module | None):
    self.backbone = backbone
    self.head = head
    self.adapter = adapter
    self.ema_backbone = ema_backbone
    self.ema_head = ema_head


def _copy_weights(target: nnx.Module, source: nnx.Module) -> None:
  """MoCo's initialisation of the key encoder: param_k.data.copy_(param_q.data)."""
  nnx.update(target, jax.tree.map(jnp.copy, nnx.state(source, nnx.Param)))


def _without_dropout(module: nnx.Module) -> None:
  """Turns off, in every mode, each `nnx.Dropout` of `module`: the key encoder's drop-path.

  The momentum encoder gives the keys (targets); it must not drop residual branches at
  random even when the student does (a student built with `drop_path_rate > 0`). Every
  backbone here implements stochastic depth with `nnx.Dropout` (EfficientNet's MBConv, the
  ViT blocks), so this covers all of them. Rate 0 rather than `deterministic=True`, which
  `model.train()` would undo; the dropout random stream goes with it, as a block built with
  rate 0 keeps none.
  """
  for _, layer in nnx.iter_modules(module):
    if isinstance(layer, nnx.Dropout):
      layer.rate = 0.0
      layer.rngs = None


@dataclasses.dataclass(frozen=True)
class ContrastiveMethod:
  """One of METHODS with its hyperparameters (the objective's Config) and model choices.

  Attributes:
    name: 'mocov2', 'disco' or 'retro'.
    objective: the objective module's Config (temperature, queue, weights, pairing).
    student: backbone name; `student_kwargs` its options (e.g. low_res_stem).
    head_dims: hidden and output widths of the own head (mocov2/disco): DisCo's student
      head is in -> 2048 -> 128, MoCo-v2's in -> in -> 128 (hidden None means `in`).
    adapter: retro's adapter kind ('inverted_residual', 'simkd', 'conv1x1'); adapter_kwargs
      its options (e.g. activation='hard_mish' for MobileNetV3, as the Retro code).
  """
  name: str
  objective: Any
  student: str
  student_kwargs: dict = dataclasses.field(default_factory=dict)
  head_hidden: int | None = None
  adapter: str = "inverted_residual"
  adapter_kwargs: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"unknown contrastive method {self.name!r}; expected one of {METHODS}")

  @property
  def needs_teacher(self) -> bool:
    return self.name != "mocov2"

  def build(self, teacher: nnx.Module | None, *, rngs: nnx.Rngs) -> ContrastiveStudent:
    """The student container, its momentum copies initialised as copies (MoCo)."""
    backbone = create_backbone(self.student, rngs=rngs, **self.student_kwargs)
    ema_backbone = create_backbone(self.student, rngs=rngs, **self.student_kwargs)
    _copy_weights(ema_backbone, backbone)
    _without_dropout(ema_backbone)
    head = ema_head = adapter = None
    if self.name == "retro":
      if teacher is None or teacher.head is None:
        raise ValueError("retro needs a teacher with a projection head (convert a MoCo-v2 "
                         "checkpoint with its fc head)")
      adapter = create_adapter(self.adapter, backbone.feature_width,
                               teacher.head.in_features, rngs=rngs, **self.adapter_kwargs)
    else:
      width = backbone.feature_width
      dims = (width, self.head_hidden or width, self.objective.embed_dim)
      head, ema_head = MLPHead(dims, rngs=rngs), MLPHead(dims, rngs=rngs)
      _copy_weights(ema_head, head)
    return ContrastiveStudent(backbone, head, adapter, ema_backbone, ema_head)

  def trainable_filter(self):
    """Params of the student, its head and adapter; never the EMA copies."""
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("ema_backbone")),
                   nnx.Not(nnx.PathContains("ema_head")))

  def init_state(self, key: jax.Array) -> contrastive.QueueState:
    return contrastive.init_queue(key, self.objective.queue_size, self.objective.embed_dim)

  def momentum_update(self, model: ContrastiveStudent, step: jax.Array) -> None:
    """The key encoder moves toward the student (params only; BN statistics are its own)."""
    del step  # MoCo's momentum is constant
    m = self.objective.momentum
    pairs = [(model.ema_backbone, model.backbone)]
    if model.ema_head is not None:
      pairs.append((model.ema_head, model.head))
    for ema, live in pairs:
      nnx.update(ema, contrastive.ema_update(nnx.state(ema, nnx.Param),
                                             nnx.state(live, nnx.Param), m))

  def _student_embedding(self, model: ContrastiveStudent, teacher, images, *, ema: bool):
    backbone = model.ema_backbone if ema else model.backbone
    out = backbone(images)
    if self.name == "retro":
      mapped = model.adapter(out.feature_map)
      pooled = jnp.mean(mapped, axis=(1, 2))
      return retro.frozen_head_apply(teacher.head, pooled, method="embed")
    head = model.ema_head if ema else model.head
    return head(out.pooled)

  def loss(self, model: ContrastiveStudent, teacher, views, state, *, step=None, key=None):
    """(loss, metrics, new queue state) for two normalised views [B, H, W, 3]."""
    del step, key  # nothing scheduled, nothing random
    x1, x2 = views[0], views[1]
    symmetric = self.objective.symmetric
    needs_qk = symmetric or self.name == "disco" or (
        self.name == "retro" and self.objective.consistency_pairing == "same_view")
    q = self._student_embedding(model, teacher, x1, ema=False)
    qk = self._student_embedding(model, teacher, x2, ema=False) if needs_qk else None
    k = jax.lax.stop_gradient(self._student_embedding(model, teacher, x2, ema=True))
    kq = (jax.lax.stop_gradient(self._student_embedding(model, teacher, x1, ema=True))
          if symmetric else None)
    if self.name == "mocov2":
      return mocov2.loss(state, q, k, qk=qk, kq=kq, config=self.objective)
    t_q, t_k = (jax.lax.stop_gradient(
        teacher(teacher_lib.as_input(teacher, x)).embedding.astype(jnp.float32))
                for x in (x1, x2))
    loss_fn = retro.loss if self.name == "retro" else disco.loss
    return loss_fn(state, q, qk, k, t_q, t_k, kq=kq, config=self.objective)

  @property
  def early_freeze(self) -> None:
    """No tensor waits: every trainable tensor is updated from the first step."""
    return None

  def export_backbone(self, model: ContrastiveStudent) -> nnx.Module:
    """The network handed on for downstream use: the student backbone."""
    return model.backbone

  def export_head(self, model: ContrastiveStudent) -> tuple[nnx.Module, str, dict[str, Any]]:
    """The student's projection with the `EncoderSpec` head kind and arguments.

    mocov2/disco: the own MLP head. retro: the adapter followed by pooling (the feature the
    authors' linear evaluation reads); the teacher's head is the teacher's, not saved here.
    """
    if self.name == "retro":
      adapter = model.adapter
      kwargs = dict(self.adapter_kwargs, kind=self.adapter, in_features=adapter.in_features,
                    out_features=adapter.out_features)
      return PooledAdapter(adapter=adapter, **kwargs), "adapter", kwargs
    head = model.head
    dims = [model.backbone.feature_width, self.head_hidden or model.backbone.feature_width,
            self.objective.embed_dim]
    return head, "mlp", {"dims": dims}

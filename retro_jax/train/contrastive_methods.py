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
enqueue.

Batch norm (`bn_groups`, config `student.bn_groups`). Default 1: every BN of the student,
its head or adapter and the key encoder runs in train mode on the whole global
(device-sharded) batch, i.e. synchronised BN, as Retro's authors ran it (SyncBatchNorm over
the whole model; their MoCo shuffle is then a no-op and is skipped here). With G > 1 the
statistics of those BNs (and of a teacher in `bn_mode='batch'`) are per slice: G consecutive
slices of B / G examples (`retro_jax/models/batch_norm.py`; running statistics move toward
the mean over the slices), and the key encoder sees the key batch through MoCo's shuffle-BN
(`_batch_shuffle_ddp` / `_batch_unshuffle_ddp`): its input is permuted by a random
permutation drawn from the step's key, and its output un-permuted, so that a query and its
key never share BN statistics. `bn_groups = 8` with the global batch of 256 is MoCo-v2's and
DisCo's per-GPU BN of 32 on 8 GPUs; with the batch sharded over G devices of the 'data' mesh
axis each device's shard is one group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models import create_backbone
from retro_jax.models.adapters import create_adapter
from retro_jax.models.batch_norm import set_batch_groups
from retro_jax.models.batch_norm import stacked_batches
from retro_jax.models.encoder import PooledAdapter
from retro_jax.models.heads import MLPHead
from retro_jax.objectives import contrastive
from retro_jax.objectives import disco
from retro_jax.objectives import mocov2
from retro_jax.objectives import retro
from retro_jax.train import precision
from retro_jax.train import teacher as teacher_lib

METHODS = ("mocov2", "disco", "retro")

# fold_in index of the shuffle-BN permutations within the step's model key.
_SHUFFLE_STREAM = 7_919


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
    bn_groups: batch-norm statistics over this many slices of the batch, with shuffle-BN for
      the key encoder when > 1 (the module docstring); 1: over the whole batch.
    dtype: the student's precision, 'float32' or 'bfloat16' (retro_jax/train/precision.py):
      backbone, head, adapter and momentum copies compute in it; embeddings leave in float32.
    stack_views: True: the student's two views (when both need its gradient) go through one
      forward of their concatenation, each still normalised by its own statistics; False
      (default): two forwards. The same mathematics; stacked compiles faster (one copy of
      the network in the step: 55 s against 70 s for Retro EfficientNet-B0 <- ResNet-50 at
      224 px) but ran 0.81x as fast on the 2-core CPU (benchmarks/retro_step.py,
      docs/benchmarks.md).
  """
  name: str
  objective: Any
  student: str
  student_kwargs: dict = dataclasses.field(default_factory=dict)
  head_hidden: int | None = None
  adapter: str = "inverted_residual"
  adapter_kwargs: dict = dataclasses.field(default_factory=dict)
  bn_groups: int = 1
  stack_views: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    if self.name not in METHODS:
      raise ValueError(f"unknown contrastive method {self.name!r}; expected one of {METHODS}")
    precision.compute_dtype(self.dtype)  # an unknown name fails here, before any build
    if (isinstance(self.bn_groups, bool) or not isinstance(self.bn_groups, int)
        or self.bn_groups < 1):
      raise ValueError(f"bn_groups must be a positive integer, got {self.bn_groups!r}")

  @property
  def needs_teacher(self) -> bool:
    return self.name != "mocov2"

  def build(self, teacher: nnx.Module | None, *, rngs: nnx.Rngs) -> ContrastiveStudent:
    """The student container, its momentum copies initialised as copies (MoCo)."""
    dtype = precision.compute_dtype(self.dtype)
    backbone = create_backbone(self.student, rngs=rngs, dtype=dtype, **self.student_kwargs)
    ema_backbone = create_backbone(self.student, rngs=rngs, dtype=dtype, **self.student_kwargs)
    _copy_weights(ema_backbone, backbone)
    _without_dropout(ema_backbone)
    head = ema_head = adapter = None
    if self.name == "retro":
      if teacher is None or teacher.head is None:
        raise ValueError("retro needs a teacher with a projection head (convert a MoCo-v2 "
                         "checkpoint with its fc head)")
      adapter = create_adapter(self.adapter, backbone.feature_width,
                               teacher.head.in_features, rngs=rngs, dtype=dtype,
                               **self.adapter_kwargs)
    else:
      width = backbone.feature_width
      dims = (width, self.head_hidden or width, self.objective.embed_dim)
      head, ema_head = (MLPHead(dims, dtype=dtype, rngs=rngs) for _ in range(2))
      _copy_weights(ema_head, head)
    student = ContrastiveStudent(backbone, head, adapter, ema_backbone, ema_head)
    if self.bn_groups > 1:
      set_batch_groups(student, self.bn_groups)
      if teacher is not None:  # its BN uses the groups only in bn_mode 'batch'
        set_batch_groups(teacher, self.bn_groups)
    return student

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
    """(B, D) float32 embeddings, whatever the student's precision (the losses' input)."""
    backbone = model.ema_backbone if ema else model.backbone
    out = backbone(images)
    if self.name == "retro":
      mapped = model.adapter(out.feature_map)
      # The teacher's head runs in the teacher's precision, from a float32 input.
      pooled = jnp.mean(mapped, axis=(1, 2)).astype(jnp.float32)
      return retro.frozen_head_apply(teacher.head, pooled, method="embed")
    head = model.ema_head if ema else model.head
    return head(out.pooled).astype(jnp.float32)

  def _student_embeddings(self, model: ContrastiveStudent, teacher, views):
    """The student's embeddings of each view, from one forward of the stacked views.

    Each view is still normalised by its own batch statistics and updates the running ones
    in turn (`stacked_batches`), as separate calls would; `stack_views=False` makes the
    separate calls.
    """
    if not self.stack_views:
      return [self._student_embedding(model, teacher, x, ema=False) for x in views]
    # The teacher's head is in the path of retro's embeddings; it holds BN only in batch mode.
    modules = (model.backbone, model.head, model.adapter,
               teacher.head if self.name == "retro" else None)
    with stacked_batches(modules, len(views)):
      both = self._student_embedding(model, teacher, jnp.concatenate(views), ema=False)
    return jnp.split(both, len(views))

  def _keys(self, model: ContrastiveStudent, teacher, images, key):
    """The momentum encoder's embeddings of `images`, through shuffle-BN when BN is grouped.

    MoCo's `_batch_shuffle_ddp`: the batch is permuted (one permutation of the global batch,
    from `key`) before the key encoder and its output put back in the original order, so
    the BN groups of the keys mix examples of every query group. A no-op with one group.
    """
    if self.bn_groups == 1:
      return self._student_embedding(model, teacher, images, ema=True)
    if key is None:
      raise ValueError("shuffle-BN (bn_groups > 1) needs the step's random key")
    shuffled, order = shuffle_batch(key, images)
    return unshuffle_batch(self._student_embedding(model, teacher, shuffled, ema=True), order)

  def loss(self, model: ContrastiveStudent, teacher, views, state, *, step=None, key=None):
    """(loss, metrics, new queue state) for two normalised views [B, H, W, 3].

    `key` draws the shuffle-BN permutations (bn_groups > 1 only).
    """
    del step  # nothing scheduled
    shuffle_key = None if key is None else jax.random.fold_in(key, _SHUFFLE_STREAM)
    key_views = ((None, None) if shuffle_key is None
                 else tuple(jax.random.split(shuffle_key)))
    x1, x2 = views[0], views[1]
    symmetric = self.objective.symmetric
    needs_qk = symmetric or self.name == "disco" or (
        self.name == "retro" and self.objective.consistency_pairing == "same_view")
    if needs_qk:
      q, qk = self._student_embeddings(model, teacher, (x1, x2))
    else:
      q, qk = self._student_embedding(model, teacher, x1, ema=False), None
    k = jax.lax.stop_gradient(self._keys(model, teacher, x2, key_views[1]))
    kq = (jax.lax.stop_gradient(self._keys(model, teacher, x1, key_views[0]))
          if symmetric else None)
    if self.name == "mocov2":
      return mocov2.loss(state, q, k, qk=qk, kq=kq, config=self.objective)
    t_q, t_k = teacher_lib.embed_views(teacher, (x1, x2))
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


def shuffle_batch(key: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`x` in a random order along axis 0 (MoCo's `_batch_shuffle_ddp`), and that order."""
  order = jax.random.permutation(key, x.shape[0])
  return x[order], order


def unshuffle_batch(y: jax.Array, order: jax.Array) -> jax.Array:
  """The inverse of `shuffle_batch` (MoCo's `_batch_unshuffle_ddp`): y[argsort(order)]."""
  return y[jnp.argsort(order)]

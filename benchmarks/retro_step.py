r"""The full training step of retro, disco and mocov2: the engine's own step against the authors'.

    python benchmarks/retro_step.py          # the headline: retro, EfficientNet-B0, batch 16
    python benchmarks/retro_step.py --all    # the rest of the matrix, 1 round each
    python benchmarks/retro_step.py --students resnet18 --resolution 64 --steps 2 --rounds 1

What is timed, per variant (one training step, float32, on the CPU):
  ours             the step `python -m retro_jax.main` runs: the shipped config (configs/effb0.py,
                   mobilenetv3.py, resnet18.py for retro; disco_effb0.py and mocov2_r50.py with
                   the student section of the matching retro config for the others) with the
                   batch size, the augmentation's crop size and a random ResNet-50 MoCo-v2
                   teacher (`teacher.random_spec`: 2048 -> 2048 -> 128 head) set, built by
                   `retro_jax.train.loop.build_engine`, the function `train` builds its step
                   with. The step takes the pipeline's uint8 batch, so the device half of the
                   augmentation (colour jitter, grayscale, blur, normalisation) is timed too.
  ours_bf16_teacher  retro and disco: `ours` with `teacher.dtype='bfloat16'` (the frozen
                   teacher's weights and forward in bfloat16; AVX-512 BF16 CPUs).
  ours_stacked_views  retro and disco: `ours` with the student's two views in one forward of
                   their stack (`ContrastiveMethod(stack_views=True)`) instead of two.
  ours_cross_view  retro only: the same with `objective.consistency_pairing='cross_view'`, the
                   authors' mathematics (no second student forward).
  authors_nchw     the authors' step in PyTorch, written below from their code: the Retro fork
  authors_cl       (beandkay/Reused-Teacher-Projector) `DisCo/moco/builder_kq_mse_largeembedding_
                   2048.py` and `DisCo/main.py` `train()` for retro; DisCo-pytorch's files of the
                   same names for disco; MoCo-v2 (the Retro fork's `DisCo/moco/my_builder.py`
                   and `DisCo/main_moco.py`) for mocov2. In torch's NCHW layout and in
                   channels_last, `torch.set_num_threads(2)`. It takes the views as float
                   tensors, normalised: their augmentation runs in DataLoader workers, outside
                   the step.

Protocol: every variant runs in a fresh subprocess (this script with `--child JSON`), so that
neither framework's threads, caches or memory affect the other's; the variants of a
(method, student, batch) take turns within a round, the order rotating from round to round,
over `--rounds` rounds. A child builds its step, compiles it (ours: `lower` + `compile`,
timed), runs `--warmup` steps, then `--steps` timed steps; its rate is batch / median step
time. A variant's img/s is the median of its rounds' rates; ratios are against
authors_cl of the same method, student and batch. On a shared machine only these ratios mean
much; the load average is printed before and after. Run it on an idle machine: with other
jobs on the cores torch's 2-thread team slows down many times over (it spins at barriers).

What the two steps compute differs where the configs differ from the authors' code, since
ours is timed as shipped: retro's shipped 'same_view' pairing runs the student forward and
backward on both views (ours_cross_view: on view 1 only), where the authors' step runs a
second student forward on view 1 whose result it drops (builder lines 226, 255-256) and one
backward; ours' teacher normalises with running statistics (`teacher.bn_mode='eval'`), the
authors' with batch statistics (its module stays in train mode), at about the same cost;
ours' step includes the photometric augmentation, theirs receives finished views.

Also reported per child: FLOP per step (ours: XLA's cost analysis of the compiled step, which
counts element-wise work too; theirs: `torch.utils.flop_counter.FlopCounterMode` over one
step, convolutions and matrix products only; XLA leaves out products with the padding,
which matters at small resolutions only), the achieved GFLOP/s at the median step time,
that as a fraction of a float32 matmul peak measured once per run (the faster of a 2048^3
`jnp.dot` and `torch.mm`, 2 torch threads), the compile time and the child's peak RSS
(`getrusage`, which for ours includes TensorFlow, imported by the engine's data pipeline).

Changes to the authors' code for one CPU process (each also marked where it is made below):
  * shuffle-BN and `concat_all_gather` without a process group: with one process the gather
    is the identity and this rank's slice of the permutation is all of it, so
    `_batch_shuffle_ddp` is `x[randperm]` and `_batch_unshuffle_ddp` is `x[argsort(randperm)]`.
  * SyncBatchNorm (Retro main.py line 241) is plain BatchNorm: over one process they compute
    the same statistics. DisCo and MoCo use per-GPU BN, which is that too.
  * tensors on the input's device instead of `.cuda()` (labels, the permutation).
  * no `autocast`/`GradScaler` (Retro main.py lines 442, 471-481): float32 throughout, as ours.
  * students from timm 1.x (`efficientnet_b0`, `mobilenetv3_large_100`, `resnet18`) where the
    authors have timm 0.3-era copies (`DisCo/models/efficientnet.py` for the Retro and DisCo
    EfficientNet-B0, `DisCo/backbone/efficientnet.py` for MoCo's, `DisCo/models/
    mobilenetv3.py`, `DisCo/models/resnet.py`): the same networks, BN eps 1e-5 and no
    stochastic depth in both; DisCo and MoCo build torchvision's ResNet-18, as here. Retro's
    `forward_features` with its `transfer` is re-expressed on timm's modules (MobileNetV3's
    includes the pool, conv_head and activation: `DisCo/models/mobilenetv3.py` lines 129-141).
  * HardMish as `0.5 x clamp(x + 2, 0, 2)` with autograd, the forward of the authors'
    `HardMishMe` (`DisCo/models/layers/activations_me.py` line 170), whose hand-written
    backward (lines 174-177) is the same gradient.
  * DisCo's unused `teacher_encoder_k` (built, never run) is built here too; MoCo-v2's step
    leaves out the teacher forward of `my_builder.py` (lines 187-188, unused by
    `main_moco.py` without `--distill`), which MoCo-v2 itself does not have.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("retro", "disco", "mocov2")
STUDENTS = ("efficientnet_b0", "mobilenet_v3_large", "resnet18")
VARIANTS = ("ours", "ours_cross_view", "ours_bf16_teacher", "ours_stacked_views", "authors_nchw",
            "authors_cl")
HEADLINE = dict(methods=["retro"], students=["efficientnet_b0"], batch_sizes=[16])
# The retro config of each student; its `student` section is also disco's and mocov2's.
RETRO_CONFIGS = {"efficientnet_b0": "effb0", "mobilenet_v3_large": "mobilenetv3",
                 "resnet18": "resnet18"}
METHOD_CONFIGS = {"disco": "disco_effb0", "mocov2": "mocov2_r50"}
TIMM_NAMES = {"efficientnet_b0": "efficientnet_b0",
              "mobilenet_v3_large": "mobilenetv3_large_100", "resnet18": "resnet18"}
# ImageNet's training split: the optimiser's schedules need a length (not the rate).
IMAGENET_TRAIN = 1_281_167
# The recipes' constants (DisCo/Retro commands; configs/*.py): K, m, T, D, lr 0.03 x B / 256.
QUEUE, MOMENTUM, TEMPERATURE, DIM, WEIGHT_DECAY = 65536, 0.999, 0.2, 128, 1e-4


def variants_of(method: str) -> tuple[str, ...]:
  skip = {"retro": (), "disco": ("ours_cross_view",),
          "mocov2": ("ours_cross_view", "ours_bf16_teacher", "ours_stacked_views")}[method]
  return tuple(v for v in VARIANTS if v not in skip)


# ---------------------------------------------------------------------------------------------
# Ours: the engine's step, built from the shipped config.


def load_config(name: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def benchmark_config(method: str, student: str, batch: int, resolution: int, variant: str):
  """The shipped config of (method, student) with only what the benchmark needs overridden."""
  from retro_jax.data import presets  # pylint: disable=g-import-not-at-top
  retro_config = load_config(RETRO_CONFIGS[student])
  config = retro_config if method == "retro" else load_config(METHOD_CONFIGS[method])
  config.student.name = retro_config.student.name
  config.student.kwargs = retro_config.student.kwargs.to_dict()
  config.global_batch_size = batch
  config.data.augmentation = presets.preset("mocov2", size=resolution)
  if method != "mocov2":
    config.teacher.random_spec = dict(architecture="resnet50", head_kind="mlp",
                                      head_kwargs={"dims": [2048, 2048, DIM]})
  if variant == "ours_cross_view":
    config.objective.consistency_pairing = "cross_view"
  if variant == "ours_bf16_teacher":
    config.teacher.dtype = "bfloat16"
  return config


def compiled_step(spec: dict[str, Any]):
  """The engine's step for `spec` (method, student, batch, resolution, variant), compiled:
  (compiled step, state, teacher state, a uint8 batch, compile seconds, XLA's cost analysis)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax.data.presets import Augmentation  # pylint: disable=g-import-not-at-top
  from retro_jax.objectives import contrastive  # pylint: disable=g-import-not-at-top
  from retro_jax.train import loop  # pylint: disable=g-import-not-at-top
  from retro_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  if spec["variant"] == "ours_stacked_views":  # not a config field: the method's constructor
    import functools  # pylint: disable=g-import-not-at-top
    loop.ContrastiveMethod = functools.partial(loop.ContrastiveMethod, stack_views=True)
  batch_size, size = spec["batch"], spec["resolution"]
  config = benchmark_config(spec["method"], spec["student"], batch_size, size, spec["variant"])
  # What `loop.train` does before `build_engine`, less the data source (ImageNet's length).
  mesh = mesh_lib.make_mesh()
  mesh_lib.check_global_batch(batch_size, mesh)
  objective = loop.objective_config(config)
  contrastive.check_queue_size(objective.queue_size, batch_size)
  augmentation = Augmentation.from_config(config.data.augmentation)
  steps_per_epoch = IMAGENET_TRAIN // batch_size
  engine = loop.build_engine(config, objective, augmentation, mesh,
                             steps_per_epoch=steps_per_epoch,
                             total_steps=int(round(config.epochs * steps_per_epoch)))

  # A batch as the pipeline yields it: uint8 views, global example ids, labels.
  rng = np.random.default_rng(0)
  views = tuple(rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
                for _ in augmentation.views)
  batch = jax.device_put({"views": views, "index": np.arange(batch_size, dtype=np.int32),
                          "label": np.zeros(batch_size, np.int32)},
                         mesh_lib.batch_sharding(mesh))
  state, teacher_state = engine.state, engine.teacher_state
  started = time.perf_counter()
  compiled = engine.step_fn.lower(state, teacher_state, batch).compile()
  compile_s = time.perf_counter() - started
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, state, teacher_state, batch, compile_s, cost


def ours_child(spec: dict[str, Any]) -> dict[str, Any]:
  """Builds the engine's step from the config, compiles it, times it."""
  import jax  # pylint: disable=g-import-not-at-top
  from retro_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  compiled, state, teacher_state, batch, compile_s, cost = compiled_step(spec)

  def run() -> float:
    nonlocal state
    state, metrics = compiled(state, teacher_state, batch)  # the old state is donated
    jax.block_until_ready(metrics)
    return float(metrics["loss"]) if "loss" in metrics else float("nan")

  times, losses = timed_steps(run, spec["warmup"], spec["steps"])
  return dict(step_s=times, loss=losses[-1], compile_s=compile_s, flops=float(cost["flops"]),
              params=step_lib.count_parameters(state.trainable),
              backend=f"{jax.default_backend()} x{len(jax.devices())}")


def timed_steps(run, warmup: int, steps: int) -> tuple[list[float], list[float]]:
  """Seconds of each of `steps` calls of `run` after `warmup` untimed ones; its returns."""
  losses = [run() for _ in range(warmup)]
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    losses.append(run())
    times.append(time.perf_counter() - start)
  return times, losses


# ---------------------------------------------------------------------------------------------
# Theirs: the authors' step in PyTorch. "R" is the Retro fork (beandkay/Reused-Teacher-
# Projector), "D" DisCo-pytorch (Yuting-Gao/DisCo-pytorch); "builder" is each one's
# DisCo/moco/builder_kq_mse_largeembedding_2048.py, "main" its DisCo/main.py.


def _torch_modules():
  """torch.nn classes of the reference, defined on first use so that ours never imports torch."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  class HardMish(nn.Module):
    """HardMishMe (R DisCo/models/layers/activations_me.py lines 169-205), autograd form."""

    def forward(self, x):
      return 0.5 * x * (x + 2).clamp(min=0, max=2)

  class InvertedResidual(nn.Module):
    """The adapter `transfer` (R builder lines 122-137): timm's InvertedResidual (R DisCo/
    models/efficientnet_blocks.py lines 207-279) with exp_ratio 2, 3x3 depthwise, no SE and
    no skip (in != out); timm's convolutions have no bias (conv2d_same.py line 35)."""

    def __init__(self, in_chs: int, out_chs: int, act_layer):
      super().__init__()
      mid = in_chs * 2  # make_divisible(in_chs * 2): the students' widths are multiples of 8
      self.conv_pw = nn.Conv2d(in_chs, mid, 1, bias=False)
      self.bn1, self.act1 = nn.BatchNorm2d(mid), act_layer()
      self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
      self.bn2, self.act2 = nn.BatchNorm2d(mid), act_layer()
      self.conv_pwl = nn.Conv2d(mid, out_chs, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x):
      x = self.act1(self.bn1(self.conv_pw(x)))
      x = self.act2(self.bn2(self.conv_dw(x)))
      return self.bn3(self.conv_pwl(x))

  def mocov2_teacher():
    """torchvision's ResNet-50 with MoCo-v2's MLP head (R builder lines 41, 73-74)."""
    teacher = torchvision.models.resnet50(num_classes=DIM)
    teacher.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), teacher.fc)
    return teacher

  def head_name(encoder) -> str:
    return "fc" if hasattr(encoder, "fc") else "classifier"

  class QueueMixin:
    """The queue, momentum update and shuffle-BN every builder shares."""

    def init_queue(self):
      # R builder lines 116-119.
      self.register_buffer("queue", F.normalize(torch.randn(DIM, QUEUE), dim=0))
      self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
      # R builder lines 140-145: every parameter pair, shared modules included.
      for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
        param_k.data = param_k.data * MOMENTUM + param_q.data * (1. - MOMENTUM)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys):
      # R builder lines 148-161; concat_all_gather of one process is the identity.
      batch_size = keys.shape[0]
      ptr = int(self.queue_ptr)
      assert QUEUE % batch_size == 0
      self.queue[:, ptr:ptr + batch_size] = keys.T
      self.queue_ptr[0] = (ptr + batch_size) % QUEUE

    @staticmethod
    @torch.no_grad()
    def batch_shuffle(x):
      # R builder lines 164-189 with one process: the permutation on the input's device.
      idx_shuffle = torch.randperm(x.shape[0], device=x.device)
      return x[idx_shuffle], torch.argsort(idx_shuffle)

    @staticmethod
    @torch.no_grad()
    def batch_unshuffle(x, idx_unshuffle):
      return x[idx_unshuffle]  # R builder lines 192-208 with one process

    def contrastive_logits(self, q, k):
      # R builder lines 270-281: positives, negatives against the queue as it was, / T.
      l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
      l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
      logits = torch.cat([l_pos, l_neg], dim=1) / TEMPERATURE
      return logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

  class RetroReference(QueueMixin, nn.Module):
    """R builder `MoCo` with a ResNet-50 teacher and `--mlp`: the student embeds through its
    shared adapter `transfer` and the teacher's frozen head."""

    def __init__(self, student: str):
      super().__init__()
      make = lambda: timm.create_model(TIMM_NAMES[student], num_classes=DIM)  # line 36
      self.student = student
      self.encoder_q, self.encoder_k = make(), make()
      self.teacher_encoder_q = mocov2_teacher()  # lines 41, 73-74
      t_n, head = 2048, head_name(self.encoder_q)
      s_n = getattr(self.encoder_q, head).weight.shape[1]  # lines 81, 86
      # Lines 84, 91: one module, the teacher's head, is both students' classifier.
      setattr(self.encoder_q, head, self.teacher_encoder_q.fc)
      setattr(self.encoder_k, head, self.teacher_encoder_q.fc)
      for param in self.teacher_encoder_q.parameters():  # lines 100-101
        param.requires_grad = False
      for param_q, param_k in zip(self.encoder_q.parameters(),
                                  self.encoder_k.parameters()):  # lines 104-107
        param_k.data.copy_(param_q.data)
        param_k.requires_grad = False
        param_q.requires_grad = True
      for (name_q, param_q), (name_k, param_k) in zip(
          self.encoder_q.named_parameters(), self.encoder_k.named_parameters()):  # 109-113
        if "fc" in name_q or "classifier" in name_q:
          param_q.requires_grad = False
        if "fc" in name_k or "classifier" in name_k:
          param_k.requires_grad = False
      self.init_queue()
      # Lines 122-137: one adapter shared by both encoders (after the loops: it trains).
      act = HardMish if student == "mobilenet_v3_large" else nn.SiLU
      self.encoder_q.transfer = self.encoder_k.transfer = InvertedResidual(s_n, t_n, act)

    def forward_features(self, encoder, x):
      """The authors' `forward_features`: the pre-pool map (MobileNetV3: after the pool,
      conv_head and activation), then `transfer` (R DisCo/models/efficientnet.py lines
      385-397, mobilenetv3.py lines 129-141, resnet.py lines 628-642)."""
      x = encoder.forward_features(x)
      if self.student == "mobilenet_v3_large":
        x = encoder.act2(encoder.norm_head(encoder.conv_head(encoder.global_pool(x))))
      return encoder.transfer(x)

    def embed(self, encoder, feature_map):
      # Lines 250-253: the teacher's avgpool, flatten, the (teacher's) classifier, normalise.
      pooled = self.teacher_encoder_q.avgpool(feature_map).flatten(1)
      return F.normalize(getattr(encoder, head_name(encoder))(pooled), dim=1)

    def forward(self, im_q, im_k):
      feat_q = self.forward_features(self.encoder_q, im_q)  # line 222
      feat_qk = self.forward_features(self.encoder_q, im_q)  # line 226: view 1 again
      with torch.no_grad():
        self.momentum_update()  # line 232
        teacher_qk = F.normalize(self.teacher_encoder_q(im_k), dim=1)  # lines 234-235
        im_k, idx_unshuffle = self.batch_shuffle(im_k)  # line 238
        feat_k = self.forward_features(self.encoder_k, im_k)  # line 240
        teacher_q = F.normalize(self.teacher_encoder_q(im_q), dim=1)  # lines 246-247
      q = self.embed(self.encoder_q, feat_q)  # lines 250-253
      # Lines 255-258: the pool of feat_qk is computed, then the view of temp_feat_q is
      # used, so qk is q's computation again (the cross-view second term).
      self.teacher_encoder_q.avgpool(feat_qk)
      qk = self.embed(self.encoder_k, feat_q)
      with torch.no_grad():  # lines 260-265
        k = self.batch_unshuffle(self.embed(self.encoder_k, feat_k), idx_unshuffle)
      logits, labels = self.contrastive_logits(q, k)
      self.dequeue_and_enqueue(k)  # line 284
      return logits, labels, q, teacher_q, qk, teacher_qk

  class DiscoReference(QueueMixin, nn.Module):
    """D builder `MoCo` with a ResNet-50 teacher and `--mlp`: the student's own 2048-128
    head, both views through the student, the teacher on both views."""

    def __init__(self, student: str):
      super().__init__()
      if student == "resnet18":  # D main.py line 212: torchvision's
        make = lambda: torchvision.models.resnet18(num_classes=DIM)
      else:
        make = lambda: timm.create_model(TIMM_NAMES[student], num_classes=DIM)  # line 27
      self.encoder_q, self.encoder_k = make(), make()
      self.teacher_encoder_q = mocov2_teacher()  # lines 32, 65
      self.teacher_encoder_k = mocov2_teacher()  # lines 33, 66: never run
      head = head_name(self.encoder_q)
      dim_mlp = getattr(self.encoder_q, head).weight.shape[1]  # lines 69-79
      for encoder in (self.encoder_q, self.encoder_k):
        setattr(encoder, head, nn.Sequential(nn.Linear(dim_mlp, 2048), nn.ReLU(),
                                             nn.Linear(2048, DIM)))
      for param_q, param_k in zip(self.teacher_encoder_q.parameters(),
                                  self.teacher_encoder_k.parameters()):  # lines 82-85
        param_k.data.copy_(param_q.data)
        param_k.requires_grad = False
        param_q.requires_grad = False
      for param_q, param_k in zip(self.encoder_q.parameters(),
                                  self.encoder_k.parameters()):  # lines 88-91
        param_k.data.copy_(param_q.data)
        param_k.requires_grad = False
        param_q.requires_grad = True
      self.init_queue()  # lines 94-97

    def forward(self, im_q, im_k):
      q = F.normalize(self.encoder_q(im_q), dim=1)  # lines 182-183
      qk = F.normalize(self.encoder_q(im_k), dim=1)  # lines 185-186: view 2
      with torch.no_grad():
        self.momentum_update()  # line 190
        teacher_qk = F.normalize(self.teacher_encoder_q(im_k), dim=1)  # lines 192-193
        im_k, idx_unshuffle = self.batch_shuffle(im_k)  # line 196
        k = F.normalize(self.encoder_k(im_k), dim=1)  # lines 198-199
        k = self.batch_unshuffle(k, idx_unshuffle)  # line 200
        teacher_q = F.normalize(self.teacher_encoder_q(im_q), dim=1)  # lines 206-207
      logits, labels = self.contrastive_logits(q, k)  # lines 213-224
      self.dequeue_and_enqueue(k)  # line 227
      return logits, labels, q, teacher_q, qk, teacher_qk

  class MocoReference(QueueMixin, nn.Module):
    """MoCo-v2 with `--mlp`: R DisCo/moco/my_builder.py (what R main_moco.py builds), its
    unused teacher left out."""

    def __init__(self, student: str):
      super().__init__()
      if student == "resnet18":  # R main_moco.py line 172: torchvision's
        make = lambda: torchvision.models.resnet18(num_classes=DIM)
      else:  # lines 167-169 (EfficientNet-B0; MobileNetV3 as the other methods)
        make = lambda: timm.create_model(TIMM_NAMES[student], num_classes=DIM)
      self.encoder_q, self.encoder_k = make(), make()
      head = head_name(self.encoder_q)
      dim_mlp = getattr(self.encoder_q, head).weight.shape[1]  # my_builder lines 44-53
      for encoder in (self.encoder_q, self.encoder_k):
        setattr(encoder, head, nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(),
                                             getattr(encoder, head)))
      for param_q, param_k in zip(self.encoder_q.parameters(),
                                  self.encoder_k.parameters()):  # lines 79-82
        param_k.data.copy_(param_q.data)
        param_k.requires_grad = False
        param_q.requires_grad = True
      self.init_queue()

    def forward(self, im_q, im_k):
      q = F.normalize(self.encoder_q(im_q), dim=1)  # my_builder lines 171-172
      with torch.no_grad():
        self.momentum_update()  # line 176
        im_k, idx_unshuffle = self.batch_shuffle(im_k)  # line 179
        k = F.normalize(self.encoder_k(im_k), dim=1)  # lines 181-182
        k = self.batch_unshuffle(k, idx_unshuffle)  # line 185
      logits, labels = self.contrastive_logits(q, k)  # lines 193-204
      self.dequeue_and_enqueue(k)  # line 207
      return logits, labels

  return dict(retro=RetroReference, disco=DiscoReference, mocov2=MocoReference)


def accuracy(output, target, topk=(1, 5)):
  """R main.py lines 552-566 (the train loop's top-1/top-5 of the contrastive task)."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return _accuracy(output, target, topk)


def _accuracy(output, target, topk):
  _, pred = output.topk(max(topk), 1, True, True)
  correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
  return [correct[:k].reshape(-1).float().sum(0) * (100.0 / target.size(0)) for k in topk]


def make_reference(method: str, student: str, batch_size: int):
  """The authors' model in train mode and its SGD (R main.py lines 275-277, 430)."""
  import torch  # pylint: disable=g-import-not-at-top
  model = _torch_modules()[method](student)
  model.train()
  lr = 0.03 * batch_size / 256
  optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=WEIGHT_DECAY)
  return model, optimizer


def reference_step(model, optimizer, method: str, student: str, im_q, im_k) -> dict[str, Any]:
  """One iteration of the authors' `train()` loop; returns the loss and the model's outputs.

  retro: R main.py lines 443-481 (mixed precision left out), disco: D main.py lines 434-463,
  mocov2: R main_moco.py lines 339-361 without `--distill`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  outputs = model(im_q=im_q, im_k=im_k)
  logits, target = outputs[:2]
  loss = torch.nn.functional.cross_entropy(logits, target)
  if method != "mocov2":
    _, _, student_q, teacher_q, student_qk, teacher_qk = outputs
    mse = torch.nn.functional.mse_loss(teacher_q, student_q, reduction="sum")
    mse_qk = torch.nn.functional.mse_loss(teacher_qk, student_qk, reduction="sum")
    loss = 1.0 * loss + 1.0 * mse + 1.0 * mse_qk
    mse.item(), mse_qk.item()  # the meters' reads (main.py lines 461-463)
  accuracy(logits, target)
  value = loss.item()
  optimizer.zero_grad()
  loss.backward()
  if method == "retro" and student == "mobilenet_v3_large":  # R main.py lines 473-478
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.)
  optimizer.step()
  return dict(loss=value, outputs=outputs)


def authors_child(spec: dict[str, Any]) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(spec["torch_threads"])
  torch.manual_seed(0)
  method, student, batch_size, size = (spec["method"], spec["student"], spec["batch"],
                                       spec["resolution"])
  model, optimizer = make_reference(method, student, batch_size)
  im_q, im_k = (torch.randn(batch_size, 3, size, size) for _ in range(2))
  if spec["variant"] == "authors_cl":
    model = model.to(memory_format=torch.channels_last)
    im_q, im_k = (x.contiguous(memory_format=torch.channels_last) for x in (im_q, im_k))
  counter = FlopCounterMode(display=False)
  with counter:  # one step, counted; it is also the first warm-up step
    reference_step(model, optimizer, method, student, im_q, im_k)
  run = lambda: reference_step(model, optimizer, method, student, im_q, im_k)["loss"]
  times, losses = timed_steps(run, max(0, spec["warmup"] - 1), spec["steps"])
  params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return dict(step_s=times, loss=losses[-1], compile_s=None,
              flops=float(counter.get_total_flops()), params=params,
              backend=f"torch {torch.get_num_threads()} threads")


# ---------------------------------------------------------------------------------------------
# The matmul peak, once per run.


def peak_child(spec: dict[str, Any]) -> dict[str, Any]:
  n, reps = 2048, 5
  if spec["peak"] == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in range(2))
    dot = jax.jit(jnp.dot)
    run = lambda: jax.block_until_ready(dot(a, b))
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(spec["torch_threads"])
    a, b = torch.randn(n, n), torch.randn(n, n)
    run = lambda: torch.mm(a, b)
  times, _ = timed_steps(run, 2, reps)
  return dict(gflops=2 * n ** 3 / statistics.median(times) / 1e9)


def child_main(spec: dict[str, Any]) -> None:
  if "peak" in spec:
    result = peak_child(spec)
  elif spec["variant"].startswith("ours"):
    result = ours_child(spec)
  else:
    result = authors_child(spec)
  result["rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: the plan, the rounds, the table.


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
  """This script in a fresh process on `spec`; its RESULT, or {'error': ...}."""
  command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
  return {"error": f"exit {done.returncode}: " + "\n".join(tail)}


def plan(args) -> list[tuple[str, str, int]]:
  """(method, student, batch) groups to measure; --all leaves out the headline's group."""
  groups = [(m, s, b) for m in args.methods for s in args.students for b in args.batch_sizes]
  if args.all:
    groups = [g for g in groups if g != ("retro", "efficientnet_b0", 16)]
  return groups


def machine_lines() -> list[str]:
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "flax", "optax", "torch",
                                                      "torchvision", "timm", "numpy",
                                                      "tensorflow-cpu"))
  env = {k: os.environ[k] for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "GLIBC_TUNABLES",
                                    "JAX_PLATFORMS") if k in os.environ}
  return [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
          f"- CPU: {cpu}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} "
          f"usable), Linux {platform.release()}",
          f"- libraries: {versions}, Python {platform.python_version()}",
          f"- environment: {env or 'no XLA_FLAGS / OMP_NUM_THREADS / GLIBC_TUNABLES'}"]


def _version(package: str) -> str:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return "absent"


def _load() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--all", action="store_true",
                      help="every method, student and batch size 16 and 32 except the "
                           "headline's group, 1 round (flags given explicitly still apply)")
  parser.add_argument("--methods", help=f"comma-separated, of {','.join(METHODS)}")
  parser.add_argument("--students", help=f"comma-separated, of {','.join(STUDENTS)}")
  parser.add_argument("--batch-sizes", help="comma-separated global batch sizes")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help="comma-separated, of " + ",".join(VARIANTS))
  parser.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --all)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per child")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--resolution", type=int, default=224)
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--child-timeout", type=float, default=3600)
  args = parser.parse_args(argv)
  if args.child:
    child_main(json.loads(args.child))
    return

  split = lambda text: [x for x in text.split(",") if x]
  default = {k: [str(x) for x in v] for k, v in HEADLINE.items()}
  if args.all:
    default = dict(methods=list(METHODS), students=list(STUDENTS), batch_sizes=["16", "32"])
  args.methods = split(args.methods or ",".join(default["methods"]))
  args.students = split(args.students or ",".join(default["students"]))
  args.batch_sizes = [int(b) for b in split(args.batch_sizes or ",".join(default["batch_sizes"]))]
  args.variants = split(args.variants)
  args.rounds = args.rounds or (1 if args.all else 3)
  for value, known in ((args.methods, METHODS), (args.students, STUDENTS),
                       (args.variants, VARIANTS)):
    if set(value) - set(known):
      parser.error(f"unknown {sorted(set(value) - set(known))}; expected some of {known}")

  print(f"Command: python benchmarks/retro_step.py {' '.join(sys.argv[1:])}".rstrip() + "\n")
  load_before = _load()
  for line in machine_lines():
    print(line)
  print(f"- load average (1/5/15 min) before: {load_before}", flush=True)

  common = dict(resolution=args.resolution, steps=args.steps, warmup=args.warmup,
                torch_threads=args.torch_threads)
  peaks = {k: run_child(dict(common, peak=k), args.child_timeout) for k in ("jax", "torch")}
  peak = max((p.get("gflops", 0.0) for p in peaks.values()), default=0.0)
  print("- float32 matmul peak (2048^3, median of 5): " + ", ".join(
      f"{k} {p['gflops']:.1f} GFLOP/s" if "gflops" in p else f"{k} failed: {p['error']}"
      for k, p in peaks.items()) + "\n", flush=True)

  groups = plan(args)
  results: dict[tuple, list[dict[str, Any]]] = {}
  for round_index in range(args.rounds):
    for method, student, batch in groups:
      variants = [v for v in variants_of(method) if v in args.variants]
      shift = round_index % max(1, len(variants))
      for variant in variants[shift:] + variants[:shift]:  # the order rotates by round
        spec = dict(common, method=method, student=student, batch=batch, variant=variant)
        started = time.perf_counter()
        result = run_child(spec, args.child_timeout)
        results.setdefault((method, student, batch, variant), []).append(result)
        rate = (f"{batch / statistics.median(result['step_s']):.2f} img/s, loss "
                f"{result['loss']:.4g}" if "step_s" in result else "FAILED: " + result["error"])
        print(f"  round {round_index + 1}/{args.rounds} {method} {student} batch {batch} "
              f"{variant}: {rate} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)

  print(f"### Training step, {args.resolution} px, float32, median of {args.steps} steps "
        f"after {args.warmup} warm-up, {args.rounds} round(s)\n")
  print(table(results, peak))
  print(f"\n- load average (1/5/15 min) after: {_load()}")
  backends = sorted({r["backend"] for rs in results.values() for r in rs if "backend" in r})
  print(f"- backends: {', '.join(backends)}")


def table(results: dict[tuple, list[dict[str, Any]]], peak: float) -> str:
  """The markdown table: one row per (method, student, batch, variant)."""
  lines = ["| method | student | batch | variant | trainable params | compile s | img/s "
           "| img/s per round | / authors channels_last | GFLOP per step | GFLOP/s "
           "| % of matmul peak | peak RSS GiB |",
           "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]

  def rate(runs):
    rates = [key[2] / statistics.median(r["step_s"]) for r in runs if "step_s" in r]
    return statistics.median(rates) if rates else None, rates

  for key, runs in results.items():
    method, student, batch, variant = key
    ips, rates = rate(runs)
    head = f"| {method} | {student} | {batch} | {variant} |"
    good = [r for r in runs if "step_s" in r]
    if not good:
      error = runs[0]["error"].splitlines()[-1].replace("|", "/")[:120]
      lines.append(f"{head} failed: {error} |" + " |" * 8)
      continue
    baseline, _ = rate(results.get((method, student, batch, "authors_cl"), []))
    compile_s = [r["compile_s"] for r in good if r["compile_s"] is not None]
    flops = statistics.median(r["flops"] for r in good)
    gflops = flops / 1e9 * ips / batch  # per step x steps per second
    cells = [f"{good[0]['params'] / 1e6:.2f} M",
             f"{statistics.median(compile_s):.1f}" if compile_s else "-",
             f"{ips:.2f}", ", ".join(f"{r:.2f}" for r in rates),
             f"**{ips / baseline:.2f}**" if baseline else "-",
             f"{flops / 1e9:.1f}", f"{gflops:.1f}",
             f"{100 * gflops / peak:.0f} %" if peak else "-",
             f"{max(r['rss_kib'] for r in good) / 2 ** 20:.2f}"]
    lines.append(f"{head} {' | '.join(cells)} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()

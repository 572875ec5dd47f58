"""The config layouts of the recipes, shared by the files in configs/.

A config file states one recipe (its docstring: command, hardware, expected result, readings
of the open points) and builds it with `contrastive_config(...)` (MoCo-style methods) or
`multicrop_config(...)` (DINO-style); `smoke(config)` turns any of them into the few-step CPU
run on Fashion-MNIST that the tests train, and `authors_reference(config)` turns a Retro or
DisCo config into the form of the authors' code (`finish` applies both by variant). The layout:

  method            'mocov2' | 'disco' | 'retro' | 'dino' | 'rob_dino' | 'rob_msn' | 'rob_swav'
                    | 'rob_ibot'
  seed, global_batch_size, epochs, total_steps (> 0 overrides epochs)
  objective         the objective's Config fields (retro_jax/objectives/<method>.py)
  student           name, kwargs (backbone options), dtype ('float32' | 'bfloat16': mixed
                    precision, retro_jax/train/precision.py; bfloat16 gains on TPUs and
                    recent GPUs, not on CPU), head_hidden (mocov2/disco), adapter and
                    adapter_kwargs (retro), bn_groups (MoCo-style methods: batch-norm
                    statistics over that many slices of the batch, with MoCo's shuffle-BN
                    for the keys; 1, the default, is SyncBN over the global batch, as
                    Retro; 8 at batch 256 is MoCo-v2's/DisCo's per-GPU BN: see
                    retro_jax/train/contrastive_methods.py); head (DINO-style head
                    options) and token_drop_ratio (rob_msn)
  dino              teacher_momentum, freeze_last_layer_epochs (method 'dino' only)
  teacher           checkpoint (a `convert` output), random_spec (smoke runs only), dtype
                    ('float32' | 'bfloat16'), bn_mode ('eval' | 'batch'): retro_jax/train/teacher.py
  data              dataset ('tfds:NAME' | 'folder:PATH'), split, data_dir, process_invariant,
                    shuffle_buffer, augmentation (a presets.preset)
  input             mean, std recorded with the exported student
  optimizer         an optim.recipe_config block
  log_every_steps, checkpoint_every_steps, checkpoint_every_minutes (0: off; a save also
                    comes that many minutes after the last one: train/save_timer.py),
                    keep_checkpoints
  monitor           every_steps (0: off), k, batch_size, bank_split, test_split, augmentation
                    (an eval preset): the online k-NN monitor
"""

from __future__ import annotations

from typing import Any

import ml_collections

from retro_jax.data import presets
from retro_jax.train import optim

# The DisCo/Retro/MoCo-v2 constants (retro.md section 3): queue 65,536, T = 0.2, m = 0.999.
_CONTRASTIVE = dict(temperature=0.2, queue_size=65536, embed_dim=128, momentum=0.999,
                    symmetric=False)
_CONSISTENCY = dict(consistency_weight=32.0, contrastive_weight=1.0)


def _run(method: str, epochs: int, global_batch_size: int) -> ml_collections.ConfigDict:
  """The top of every recipe: method, seed, batch and length (total_steps > 0 wins)."""
  config = ml_collections.ConfigDict()
  config.method = method
  config.seed = 0
  config.global_batch_size = global_batch_size
  config.epochs = epochs
  config.total_steps = 0
  return config


def contrastive_config(method: str, student: str, *, optimizer: str, epochs: int = 200,
                       global_batch_size: int = 256, student_kwargs: dict | None = None,
                       head_hidden: int | None = None, adapter: str = "inverted_residual",
                       adapter_kwargs: dict | None = None) -> ml_collections.ConfigDict:
  """An unlocked ImageNet config of `method` with `student` and the MoCo-v2 augmentation."""
  config = _run(method, epochs, global_batch_size)
  objective: dict[str, Any] = dict(_CONTRASTIVE)
  if method != "mocov2":
    objective.update(_CONSISTENCY)
  if method == "retro":
    objective["consistency_pairing"] = "same_view"
  config.objective = objective
  config.student = dict(name=student, kwargs=student_kwargs or {}, dtype="float32",
                        bn_groups=1)
  if method == "retro":
    config.student.adapter = adapter
    config.student.adapter_kwargs = adapter_kwargs or {}
  else:
    config.student.head_hidden = head_hidden or 0  # 0: the backbone's width (MoCo-v2)
  _common(config, optimizer, presets.preset("mocov2"))
  return config


def _common(config: ml_collections.ConfigDict, optimizer: str,
            augmentation: ml_collections.ConfigDict) -> None:
  """The teacher, data, optimiser, logging and monitor sections every recipe has."""
  config.teacher = dict(checkpoint="", random_spec=None, dtype="float32", bn_mode="eval")
  config.data = dict(dataset="tfds:imagenet2012", split="train", data_dir="",
                     process_invariant=False, shuffle_buffer=10_000, augmentation=augmentation)
  config.input = dict(mean=list(presets.IMAGENET_MEAN), std=list(presets.IMAGENET_STD))
  config.optimizer = optim.recipe_config(optimizer)
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000
  config.checkpoint_every_minutes = 0.0  # 0: off; e.g. 30 on preemptible VMs
  config.keep_checkpoints = 2
  # Online k-NN monitor on the labelled splits of the same dataset (0 = off).
  config.monitor = dict(every_steps=5000, k=200, batch_size=256, bank_split="train",
                        test_split="validation", augmentation=presets.preset("eval"))


def multicrop_config(method: str, student: str, *, optimizer: str, epochs: int,
                     global_batch_size: int, augmentation: ml_collections.ConfigDict,
                     head: dict, student_kwargs: dict | None = None,
                     token_drop_ratio: float = 0.0) -> ml_collections.ConfigDict:
  """An unlocked ImageNet config of 'dino', 'rob_dino' or 'rob_msn' (multi-crop views)."""
  config = _run(method, epochs, global_batch_size)
  config.objective = {}  # the objective's defaults are the recipe's (objectives/<method>.py)
  config.student = dict(name=student, kwargs=student_kwargs or {}, dtype="float32",
                        head=head, token_drop_ratio=token_drop_ratio)
  if method == "dino":
    config.dino = dict(teacher_momentum=0.996, freeze_last_layer_epochs=1)
  _common(config, optimizer, augmentation)
  return config


# Smoke-run teachers: random ViT-Tiny encoders at 32 px with small heads.
_SMOKE_VIT = dict(architecture="vit_tiny_patch16", backbone_kwargs={"img_size": 32})
_SMOKE_TEACHERS = {
    "rob_dino": dict(_SMOKE_VIT, head_kind="dino", head_kwargs={
        "in_features": 192, "out_features": 256, "hidden_features": 256,
        "bottleneck_features": 64, "norm_last_layer": True}),
    "rob_msn": dict(_SMOKE_VIT, head_kind="msn", head_kwargs={
        "in_features": 192, "num_prototypes": 64, "hidden_features": 256,
        "out_features": 64}),
    # A ResNet-18 trunk (SwAV's src/resnet50.py builds one from its BasicBlock) at 1/8 width.
    "rob_swav": dict(architecture="resnet18", backbone_kwargs={"width": 8}, head_kind="swav",
                     head_kwargs={"in_features": 64, "num_prototypes": 64,
                                  "hidden_features": 64, "out_features": 32}),
    # iBOT's head is a DINO head shared by the class and patch tokens (`convert --format ibot`).
    "rob_ibot": dict(_SMOKE_VIT, head_kind="dino", head_kwargs={
        "in_features": 192, "out_features": 64, "hidden_features": 256,
        "bottleneck_features": 64, "norm_last_layer": True}),
}


def _smoke_multicrop(config: ml_collections.ConfigDict) -> None:
  """Two 32 px global and two 16 px local crops; small heads; a random ViT-Tiny teacher."""
  name = {"dino": "dino", "rob_dino": "rob_dino", "rob_msn": "msn",
          "rob_swav": "rob_swav", "rob_ibot": "rob_dino"}[config.method]
  config.data.augmentation = presets.preset(name, global_size=32, local_size=16,
                                            num_local_crops=2)
  if config.student.name.startswith("vit"):
    config.student.kwargs.img_size = 32
  config.student.head.hidden_features = 256
  if config.method == "dino":
    config.student.head.out_features = 256
    config.student.head.bottleneck_features = 64
  elif config.method == "rob_dino":
    config.student.head.bottleneck_features = 64
  else:
    config.objective.num_prototypes = 64
  if config.method in _SMOKE_TEACHERS:
    config.teacher.random_spec = _SMOKE_TEACHERS[config.method]
  config.optimizer.warmup_epochs = 0  # the recipes' warm-up is longer than the smoke run


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few CPU steps on 32 px Fashion-MNIST, batch 16, with a random teacher.

  MoCo-style recipes get a random ResNet-18 teacher and two 32 px views; DINO-style ones two
  32 px global and two 16 px local crops and a random ViT-Tiny teacher with small heads.

  It checks the wiring, not the result; prepare the data first with
  `python -m retro_jax data prepare fashion_mnist` (and pass `--config.data.data_dir` if it
  is not TFDS's default folder).
  """
  config.global_batch_size = 16
  config.total_steps = 4
  if "student" in config and "head" in config.student:
    _smoke_multicrop(config)
  else:
    config.objective.queue_size = 64
    if config.method != "mocov2":
      config.teacher.random_spec = dict(
          architecture="resnet18", backbone_kwargs={"low_res_stem": True}, head_kind="mlp",
          head_kwargs={"dims": [512, 512, 128]})
    config.data.augmentation = presets.preset("mocov2_lowres", size=32)
  config.data.dataset = "tfds:fashion_mnist"
  config.data.split = "train[:256]"
  config.data.shuffle_buffer = 256
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.monitor.every_steps = 2
  config.monitor.batch_size = 16
  config.monitor.bank_split = "train[:256]"
  config.monitor.test_split = "test[:128]"
  config.monitor.augmentation = presets.preset("eval_lowres", size=32)
  return config


# Backbone families whose constructors take `drop_path_rate` (stochastic depth).
_DROP_PATH_FAMILIES = ("efficientnet", "vit")
# The authors' examples per GPU: DisCo's commands train batch 256 on 8 GPUs (DisCo-pytorch
# Reproduction.md line 68 `--batch-size 256`; README.md line 55 "8 GPUs are preferred"), and
# each GPU's process takes batch / GPUs (DisCo/main.py line 241).
_AUTHORS_GPU_BATCH = 32


def authors_reference(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a Retro or DisCo config into the form of the authors' code, in place.

  Each change, with where the code does it (Retro: `beandkay/Reused-Teacher-Projector`
  `DisCo/main.py` and `DisCo/moco/builder_kq_mse_largeembedding_2048.py`, "the builder";
  DisCo: `Yuting-Gao/DisCo-pytorch`, the same file names):
    * teacher.bn_mode='batch': the teacher is a submodule of the model that `train()` puts in
      train mode every epoch (Retro main.py line 430, DisCo main.py line 422) and is never
      switched to eval, so its BN normalises with batch statistics.
    * retro: objective.consistency_pairing='cross_view': the builder computes `feat_qk` from
      `im_q` (line 226) and then reshapes `temp_feat_q`, not `temp_feat_qk` (line 256), so
      its second MSE term compares student(view 1) with teacher(view 2). DisCo's builder
      embeds view 2 (`qk = self.encoder_q(im_k)`, line 185): its form is our 'same_view'.
    * student.kwargs.drop_path_rate=0 for backbones that take it: the builders call
      `base_encoder(num_classes=dim, pretrained=False)` (Retro line 36, DisCo line 27), so the
      timm-era constructors' default `drop_path_rate=0.` holds (Retro
      `DisCo/models/efficientnet.py` line 336). The recipes' default is the same.
    * batch norm of the student: retro keeps bn_groups 1 (statistics of the global batch):
      Retro main.py line 241 converts the whole model to SyncBatchNorm, which leaves the
      builder's shuffle-BN (lines 238, 265) without effect. disco gets bn_groups =
      batch / 32 (8 at 256), per-GPU BN with MoCo's shuffle-BN for the keys: DisCo main.py
      wraps the model in DistributedDataParallel without SyncBatchNorm (lines 243, 250) and
      its builder shuffles the key batch across GPUs (line 196).
  Not reproduced: the queue's start. Both main.py files load the teacher checkpoint with
  `strict=False` after renaming only keys containing "encoder" (Retro lines 345, 350; DisCo
  lines 339, 344), so `module.queue`, the teacher's own MoCo queue, becomes the student's
  initial queue; `convert` leaves MoCo's queue out of the teacher directory
  (retro_jax/convert/formats.py), so the queue starts random and unit-norm here as well.
  Mixed precision (Retro's `autocast`) is not reproduced either: float32 throughout (the
  reference form leaves student.dtype as the recipe sets it).

  Args:
    config: an unlocked config of method 'retro' or 'disco' (`contrastive_config`).

  Returns:
    `config`, changed.

  Raises:
    ValueError: another method.
  """
  if config.method not in ("retro", "disco"):
    raise ValueError(f"the authors' reference form is defined for 'retro' and 'disco' "
                     f"configs, not {config.method!r}")
  config.teacher.bn_mode = "batch"
  if config.method == "retro":
    config.objective.consistency_pairing = "cross_view"
  if config.student.name.startswith(_DROP_PATH_FAMILIES):
    config.student.kwargs.drop_path_rate = 0.0
  config.student.bn_groups = (1 if config.method == "retro" else
                              max(1, config.global_batch_size // _AUTHORS_GPU_BATCH))
  return config


VARIANTS = ("smoke", "reference", "reference_smoke")


def finish(config: ml_collections.ConfigDict, variant: str | None,
           path: str) -> ml_collections.ConfigDict:
  """Applies the variant and locks the config.

  Variants: None (the recipe), 'smoke' (`smoke`), 'reference' (`authors_reference`, Retro and
  DisCo configs only) and 'reference_smoke' (the reference form, then `smoke`).
  """
  if variant not in (None, *VARIANTS):
    raise ValueError(f"unknown variant {variant!r} of {path}; expected one of {VARIANTS}")
  if variant in ("reference", "reference_smoke"):
    try:
      authors_reference(config)
    except ValueError as error:
      raise ValueError(f"variant {variant!r} of {path}: {error}") from None
  if variant in ("smoke", "reference_smoke"):
    smoke(config)
  config.lock()
  return config

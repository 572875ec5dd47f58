"""The CPU-sized Fashion-MNIST recipes of the quickstart and the study (configs/quickstart.py,
configs/study_fashion_mnist.py): one teacher stage, the student arms, the evaluation.

Every stage is a MoCo-style training config (`recipes.contrastive_config`) on 32 px
Fashion-MNIST with standard ImageNet stems (a low-resolution stem cost roughly 7x per step in
a first, unpaired probe: docs/results.md).
The values marked "sweep" come from the teacher-regime sweep recorded in docs/results.md.
"""

from __future__ import annotations

import ml_collections

from retro_jax.data import presets
from retro_jax.train import recipes

TEACHER = {"width": 32}  # half-width ResNet-18, 2.9 M parameters
# Quarter-width ResNet-18 (0.7 M); timm's zero_init_last_bn, as the authors' ResNet students.
STUDENT = {"width": 16, "zero_init_residual": True}
LR_SCALE = 1.0  # sweep: x the recipe's 0.03 x batch / 256 (x4 was worse)
ARMS = ("mocov2", "disco", "retro", "retro_reference")


def stage(method: str, *, student_kwargs: dict, steps: int, global_batch_size: int = 128,
          lr_scale: float = LR_SCALE, crop_scale: tuple[float, float] = (0.2, 1.0),
          queue_size: int = 4096, momentum: float = 0.99, monitor_every: int = 100,
          student: str = "resnet18") -> ml_collections.ConfigDict:
  """A MoCo-style stage for a 2-core CPU on 32 px Fashion-MNIST.

  The recipe's SGD (lr 0.03 x batch / 256 times `lr_scale`, cosine per step since the runs
  are shorter than a few epochs), MoCo-v2's augmentation at 32 px without blur
  (`mocov2_lowres`, crops of `crop_scale`), a queue of `queue_size` keys with key momentum
  `momentum`, and the online k-NN monitor every `monitor_every` steps (bank train[:5000],
  test[:1000]).
  """
  config = recipes.contrastive_config(method, student, optimizer="moco_v2",
                                      global_batch_size=global_batch_size,
                                      student_kwargs=student_kwargs)
  config.total_steps = steps
  config.objective.queue_size = queue_size
  config.objective.momentum = momentum
  config.optimizer.lr = config.optimizer.lr * lr_scale
  config.optimizer.schedule_unit = "step"
  config.data.dataset = "tfds:fashion_mnist"
  config.data.split = "train"
  config.data.augmentation = presets.preset("mocov2_lowres", size=32, scale=crop_scale)
  config.log_every_steps = 10
  config.checkpoint_every_steps = 100
  config.monitor.every_steps = monitor_every
  config.monitor.batch_size = 256
  config.monitor.bank_split = "train[:5000]"
  config.monitor.test_split = "test[:1000]"
  config.monitor.augmentation = presets.preset("eval_lowres", size=32)
  return config


def teacher(steps: int) -> ml_collections.ConfigDict:
  """The MoCo-v2 teacher stage."""
  return stage("mocov2", student_kwargs=TEACHER, steps=steps, monitor_every=200)


def students(steps: int, arms=ARMS) -> ml_collections.ConfigDict:
  """The student arms, in table order, with the same budget (steps, batch, data, optimiser).

    mocov2           MoCo-v2 alone: own MLP head (width-width-128), no teacher
    disco            DisCo: own head width-2048-128 (DisCo's enlarged head) + consistency
    retro            Retro as the library's default (the best reading: `same_view`
                     consistency, teacher BN in eval mode)
    retro_reference  Retro in the authors' code form (`recipes.authors_reference`)
  """
  unknown = [arm for arm in arms if arm not in ARMS]
  if unknown:
    raise ValueError(f"unknown arms {unknown}; expected some of {ARMS}")
  out = ml_collections.ConfigDict()
  for arm in arms:
    method = "retro" if arm.startswith("retro") else arm
    config = stage(method, student_kwargs=STUDENT, steps=steps)
    if arm == "disco":
      config.student.head_hidden = 2048
    if arm == "retro_reference":
      recipes.authors_reference(config)
    out[arm] = config
  return out


def evaluation() -> ml_collections.ConfigDict:
  """k-NN (k = 20, 200) and a linear probe, bank / probe set train[:10000], the whole test."""
  return ml_collections.ConfigDict(dict(
      train_split="train[:10000]", test_split="test", protocols=["knn", "linear"],
      features=["backbone", "embedding"], knn_ks=[20, 200], image_size=32,
      linear_epochs=30, linear_lr=1.0, linear_batch_size=256, batch_size=512))


DIAGNOSTICS = ("info_nce", "accuracy", "positive_similarity", "negative_similarity",
               "consistency_q", "consistency_k")


def study_config(title: str, *, teacher_steps: int, student_steps: int, seeds, arms=ARMS,
                 final: str = "retro", export: bool = False,
                 untrained_teacher: bool = True) -> ml_collections.ConfigDict:
  """An unlocked study config (the layout of retro_jax/study.py) on these recipes."""
  config = ml_collections.ConfigDict()
  config.task = "study"
  config.title = title
  config.seed = 0  # the teacher's
  config.data_dir = ""  # TFDS data directory ("" = TFDS's default, ~/tensorflow_datasets)
  config.seeds = list(seeds)
  config.teacher = teacher(teacher_steps)
  config.students = students(student_steps, arms)
  config.final = final
  config.baseline = "mocov2"  # the paired differences are taken against this arm
  config.export = export
  config.untrained_teacher = untrained_teacher
  config.evaluation = evaluation()
  config.diagnostics = list(DIAGNOSTICS)
  return config


def tiny(config: ml_collections.ConfigDict) -> None:
  """Cuts a study config to a few steps of 32 with small splits (the `:test` variants)."""
  for run in (config.teacher, *config.students.values()):
    run.total_steps = 3
    run.global_batch_size = 32
    run.objective.queue_size = 256
    run.checkpoint_every_steps = 2
    run.log_every_steps = 1
    run.monitor.every_steps = 3
    run.monitor.batch_size = 64
    run.monitor.bank_split = "train[:256]"
    run.monitor.test_split = "test[:128]"
  config.evaluation.train_split = "train[:512]"
  config.evaluation.test_split = "test[:256]"
  config.evaluation.linear_epochs = 2

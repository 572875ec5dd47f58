r"""The quickstart: MoCo-v2 teacher -> Retro student on Fashion-MNIST, on a 2-core CPU.

Command (after `bash scripts/run.sh` has installed everything, or by itself):

    python -m retro_jax.main --config configs/quickstart.py --workdir runs/quickstart

Stages (retro_jax/quickstart.py; each resumes or is skipped when done): prepare Fashion-MNIST
offline from Debian's `dataset-fashion-mnist`; pretrain a half-width ResNet-18 teacher (2.9 M
parameters) with MoCo-v2; distil a quarter-width ResNet-18 student (0.8 M) with Retro through
the teacher's frozen MoCo-v2 head; evaluate the teacher, the student and the untrained student
network (weighted k-NN, k = 20 and 200, and a linear probe on frozen features, trained on
train[:10000] and tested on the whole test split; on the backbone features and on the head's
embedding: the MoCo-v2 head's for the teacher, the pooled adapter output, the authors'
protocol, for the student); export the student; print the table. Hardware: a 2-core CPU
without an accelerator, at most 10 minutes in total (the measured time is in the README).

It demonstrates the whole path, not the method's accuracy: 32 px images through ImageNet-style
networks (standard stems, so the last feature map is 1 x 1), a few hundred steps (less than
one epoch), short MoCo schedules (queue 4,096, key momentum 0.99, the recipe's lr 0.03 x batch
/ 256 with a per-step cosine; 0.12 was measured worse: teacher k-NN top-1 73.95 % against
75.62 %). Expected: all rows well above chance (10 %); at this length the trained networks do
not beat the untrained one's random features (see the README's table); the numbers printed
are the ones measured in the run. A real user converts a pretrained teacher and runs a
`configs/effb0.py`-style config with `--config.teacher.checkpoint` instead.

Variants: `:test` runs every stage with a handful of steps and small evaluation splits (the
same code path; what the tests run).
"""

from __future__ import annotations

import ml_collections

from retro_jax.data import presets
from retro_jax.train import recipes

IMAGE_SIZE = 32


def _stage(method: str, student_kwargs: dict, steps: int) -> ml_collections.ConfigDict:
  config = recipes.contrastive_config(method, "resnet18", optimizer="moco_v2",
                                      global_batch_size=128, student_kwargs=student_kwargs)
  config.total_steps = steps
  config.objective.queue_size = 4096
  config.objective.momentum = 0.99
  config.optimizer.schedule_unit = "step"  # the run is < 1 epoch: cosine over steps
  config.data.dataset = "tfds:fashion_mnist"
  config.data.split = "train"
  config.data.augmentation = presets.preset("mocov2_lowres", size=IMAGE_SIZE)
  config.input.mean = list(presets.IMAGENET_MEAN)
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  config.monitor.every_steps = 100
  config.monitor.batch_size = 256
  config.monitor.bank_split = "train[:5000]"
  config.monitor.test_split = "test[:1000]"
  config.monitor.augmentation = presets.preset("eval_lowres", size=IMAGE_SIZE)
  return config


def get_config(variant: str | None = None):
  config = ml_collections.ConfigDict()
  config.task = "quickstart"
  config.seed = 0
  config.data_dir = ""  # TFDS data directory ("" = TFDS's default, ~/tensorflow_datasets)
  config.teacher_stage = _stage("mocov2", {"width": 32}, steps=300)
  config.student_stage = _stage("retro", {"width": 16}, steps=200)
  config.evaluation = dict(train_split="train[:10000]", test_split="test",
                           protocols=["knn", "linear"], features=["backbone", "embedding"],
                           image_size=IMAGE_SIZE,
                           linear_epochs=30, linear_lr=1.0, linear_batch_size=256,
                           batch_size=512)
  if variant == "test":
    for stage in (config.teacher_stage, config.student_stage):
      stage.total_steps = 3
      stage.global_batch_size = 32
      stage.objective.queue_size = 256
      stage.checkpoint_every_steps = 2
      stage.log_every_steps = 1
      stage.monitor.every_steps = 3
      stage.monitor.batch_size = 64
      stage.monitor.bank_split = "train[:256]"
      stage.monitor.test_split = "test[:128]"
    config.evaluation.train_split = "train[:512]"
    config.evaluation.test_split = "test[:256]"
    config.evaluation.linear_epochs = 2
  elif variant is not None:
    raise ValueError(f"unknown variant {variant!r} of configs/quickstart.py; expected 'test'")
  config.lock()
  return config

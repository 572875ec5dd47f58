r"""The Fashion-MNIST study: is a Retro student better than DisCo's and than MoCo-v2 alone?

Command (2-core CPU, no accelerator; unattended, resumable: run it again after an interruption):

    python -m retro_jax.main --config configs/study_fashion_mnist.py --workdir runs/study

What it runs (retro_jax/study.py; the measured table, wall times and analysis are in
docs/results.md):
  teacher   MoCo-v2, half-width ResNet-18 (width 32, 2.9 M parameters), 32 px, 2,000 steps
            of 128 (4.3 epochs) at the recipe's lr (0.03 x 128 / 256, per-step cosine), queue
            4,096, key momentum 0.99, SyncBN; the sweep (`:sweep`, scripts/study_sweep.sh)
            found 4x the lr worse and MoCo's shuffle-BN (4 groups of 32) no better.
  students  a quarter-width ResNet-18 (width 16, 0.7 M parameters) with timm's
            zero_init_last_bn (the authors' ResNet students), the SAME budget for every arm
            (400 steps of 128, the same augmentation, optimiser and queue), seeds 0, 1, 2:
              mocov2           MoCo-v2 alone (own MLP head 128-128-128), no teacher
              disco            DisCo: own head 128-2048-128 + consistency to the teacher
              retro            Retro as the library's default (the best reading): DisCo's
                               consistency pairing (`same_view`), teacher BN in eval mode
              retro_reference  Retro in the authors' code form (`recipes.authors_reference`):
                               `cross_view` consistency (student(view 1) vs teacher(view 2)),
                               teacher BN on batch statistics
  baselines the untrained student network (each seed) and the untrained teacher network
  evaluation weighted k-NN (k = 20, 200) and a linear probe on frozen features, bank / probe
            training set train[:10000], the whole test split (10,000); backbone features, and
            each head's embedding (Retro: the pooled adapter output, the authors' protocol)

Variants:
  :sweep   the teacher alone for 600 steps, the sweep's base point: scripts/study_sweep.sh
           runs it at each setting (--config.teacher.optimizer.lr=..., ...student.bn_groups=...)
  :test    every stage with 3 steps, 2 seeds, the arms mocov2 and retro, and small splits:
           the same path, for the tests
"""

from __future__ import annotations

from retro_jax.train import fashion_mnist_recipes as recipes

TEACHER_STEPS = 2000
STUDENT_STEPS = 400
SWEEP_STEPS = 600
# The arms of `:test`: the final arm and the baseline (the other arms differ only in config).
TEST_ARMS = ("mocov2", "retro")


def get_config(variant: str | None = None):
  config = recipes.study_config(
      "retro_jax study: MoCo-v2 teacher -> students on Fashion-MNIST",
      teacher_steps=TEACHER_STEPS, student_steps=STUDENT_STEPS, seeds=(0, 1, 2))
  if variant == "sweep":
    config.teacher.total_steps = SWEEP_STEPS
    config.students = {}
    config.seeds = []
    config.final = "teacher"
  elif variant == "test":
    config.seeds = [0, 1]
    config.students = {arm: config.students[arm] for arm in TEST_ARMS}
    recipes.tiny(config)
  elif variant is not None:
    raise ValueError(f"unknown variant {variant!r} of configs/study_fashion_mnist.py; "
                     "expected 'sweep' or 'test'")
  config.lock()
  return config

r"""The quickstart: a MoCo-v2 teacher, then a Retro student against MoCo-v2 alone, on a 2-core CPU.

Command (after `bash scripts/run.sh` has installed everything, or by itself):

    python -m retro_jax.main --config configs/quickstart.py --workdir runs/quickstart

A one-seed study (retro_jax/study.py; each stage resumes or is skipped when done): prepare
Fashion-MNIST offline from Debian's `dataset-fashion-mnist`; pretrain a half-width ResNet-18
teacher (2.9 M parameters) with MoCo-v2 for 500 steps of 128; train a quarter-width ResNet-18
student (0.7 M, timm's zero-initialised last BN as the authors' students) twice with the same
budget, 200 steps: with Retro through the teacher's frozen MoCo-v2 head, and with MoCo-v2
alone (the papers' comparison); evaluate the teacher, both students and the untrained student
network (weighted k-NN, k = 20 and 200, and a linear probe on frozen features, trained on
train[:10000] and tested on the whole test split; backbone features and each head's
embedding); export the Retro student; print the table. Hardware: a 2-core CPU without an
accelerator, at most 10 minutes in total (the measured time and table are in the README).

The settings are the study's (configs/study_fashion_mnist.py, docs/results.md) at a shorter
length: 32 px images, standard ImageNet stems, the recipe's learning rate 0.03 x batch / 256
with a per-step cosine. The untrained teacher network, the study's random-features reference,
is left out here for time (`--config.untrained_teacher=True` adds it, ~45 s). The study's table,
over three seeds, is the evidence; this run is one seed of a shorter schedule.

Variants: `:test` runs every stage with a handful of steps and small evaluation splits (the
same code path; what the tests run).
"""

from __future__ import annotations

from retro_jax.train import fashion_mnist_recipes as recipes

TEACHER_STEPS = 500
STUDENT_STEPS = 200


def get_config(variant: str | None = None):
  config = recipes.study_config(
      "retro_jax quickstart: MoCo-v2 teacher -> Retro student on Fashion-MNIST",
      teacher_steps=TEACHER_STEPS, student_steps=STUDENT_STEPS, seeds=(0,),
      arms=("retro", "mocov2"), export=True, untrained_teacher=False)
  if variant == "test":
    recipes.tiny(config)
  elif variant is not None:
    raise ValueError(f"unknown variant {variant!r} of configs/quickstart.py; expected 'test'")
  config.lock()
  return config

"""A config file for the fault drills: configs/resnet18.py:smoke at 1/8 of the width.

Retro with a ResNet-18 student (and random ResNet-18 teacher) whose stages have 8, 16, 32 and
64 channels instead of 64 to 512: the same graph, so the same wiring is exercised, for ~1/60
of the arithmetic (a training step ~1.5 s instead of ~10 s on the 2-core CPU of the tests).
"""

from __future__ import annotations

from retro_jax.train import recipes

WIDTH = 8
# The teacher the drills save as a model directory; also the config's own random teacher.
TEACHER = dict(architecture="resnet18", backbone_kwargs={"low_res_stem": True, "width": WIDTH},
               head_kind="mlp", head_kwargs={"dims": [8 * WIDTH, 8 * WIDTH, 128]})


def get_config(variant: str | None = None):
  """The config; variant 'training_view_monitor' is a mistake found only once the model and
  the checkpoints are set up: the k-NN monitor given the two-view training augmentation."""
  config = recipes.contrastive_config("retro", "resnet18", optimizer="retro",
                                      student_kwargs={"zero_init_residual": True,
                                                      "width": WIDTH})
  config = recipes.smoke(config)
  config.teacher.random_spec = TEACHER
  if variant == "training_view_monitor":
    config.monitor.augmentation = config.data.augmentation
  elif variant is not None:
    raise ValueError(f"unknown variant {variant!r}; expected training_view_monitor or none")
  config.lock()
  return config

r"""Fine-tuning a model directory on a labelled dataset (also: the augmented linear protocol).

Commands (a TPU or GPU host; MODEL_DIR is a training run's WORKDIR/student, an `export`, or a
`convert` output):

    # fine-tune every weight on ImageNet, test on its validation split
    python -m retro_jax.main --config configs/finetune.py --workdir runs/ft \
        --config.init_checkpoint=MODEL_DIR --config.data.data_dir=DIR
    # the reference linear evaluation: frozen network (eval mode), Linear on top, random
    # crops + flips, SGD 0.9, lr 3.0 halved at epochs 5, 10, ..., 45, 60, 80, 100 epochs
    python -m retro_jax.main --config configs/finetune.py:linear --workdir runs/lin \
        --config.init_checkpoint=MODEL_DIR --config.data.data_dir=DIR
    # Retro's protocol reads the pooled adapter output: --config.features=embedding
    # semi-supervised: --config.data.label_fraction=0.01 or --config.data.split_file=1percent.txt
    # 4 CPU steps on 32 px Fashion-MNIST (what the tests run):
    python -m retro_jax.main --config configs/finetune.py:smoke --workdir runs/ft_smoke \
        --config.init_checkpoint=MODEL_DIR --config.data.data_dir=DIR

Recipes:
  * `:linear` is DisCo's/Retro's `main_lincls.py` (retro.md section 4.1, peers.md section 2.4):
    Linear(D, C) initialised N(0, 0.01), bias 0, on the frozen network in eval mode; SGD
    momentum 0.9, weight decay 0, batch 256, 100 epochs, lr 3.0 (DisCo's commands; per 256
    images, scaled linearly with the batch) x0.5 at the milestones
    (`optim.recipe_config("linear_eval")`); train RandomResizedCrop(224, scale (0.08, 1)) +
    flip, test Resize(256) + CenterCrop(224). The script reports the best test top-1 over the
    epochs; this reports the last epoch's test accuracy.
  * the default (full fine-tuning) is our reading, not a recipe from the papers (Retro reports
    no ImageNet fine-tuning): SGD momentum 0.9, lr 0.01 per 256 images, cosine per step, no
    weight decay, 30 epochs, the same crops and classifier initialisation, batch norm in
    train mode.
Expected: not measured here (no accelerator was available); the smoke run checks the wiring.

Variants: `:smoke`, `:linear`, `:linear,smoke`.
"""

from __future__ import annotations

import ml_collections

from retro_jax.data import presets
from retro_jax.train import optim

_VARIANTS = ("smoke", "linear")


def _crop_and_flip(size: int) -> ml_collections.ConfigDict:
  """torchvision's RandomResizedCrop(size) (scale (0.08, 1)) + RandomHorizontalFlip, normalise."""
  config = presets.preset("mocov2", size=size, scale=(0.08, 1.0))
  view = config.views[0]
  for op in ("color_jitter", "grayscale", "gaussian_blur", "solarize"):
    view.photometric[op] = None
  return ml_collections.ConfigDict({"views": [view]})


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = set(filter(None, (variant or "").split(",")))
  unknown = sorted(variants - set(_VARIANTS))
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown} of configs/finetune.py; expected some of "
                     f"{_VARIANTS}, comma-separated")
  config = ml_collections.ConfigDict()
  config.task = "finetune"
  config.seed = 0
  config.init_checkpoint = ""
  config.features = "backbone"  # or "embedding": the model's head output (Retro's adapter)
  config.freeze_backbone = False
  config.num_classes = 0  # 0: from the dataset's label feature / class folders
  config.classifier_init_std = 0.01
  config.global_batch_size = 256
  config.eval_batch_size = 256
  config.epochs = 30
  config.total_steps = 0  # > 0 overrides epochs
  config.data = dict(dataset="tfds:imagenet2012", data_dir="", train_split="train",
                     test_split="validation", label_fraction=0.0, split_file="",
                     shuffle_buffer=10_000, augmentation=_crop_and_flip(224),
                     eval_augmentation=presets.preset("eval"))
  config.optimizer = dict(name="sgd", lr=0.01, lr_scaling="linear", momentum=0.9,
                          weight_decay=0.0, schedule="cosine", schedule_unit="step")
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5000
  config.keep_checkpoints = 2

  if "linear" in variants:
    config.freeze_backbone = True
    config.epochs = 100
    config.optimizer = optim.recipe_config("linear_eval")
  if "smoke" in variants:
    config.global_batch_size = 16
    config.eval_batch_size = 16
    config.total_steps = 4
    config.data.dataset = "tfds:fashion_mnist"
    config.data.train_split = "train[:256]"
    config.data.test_split = "test[:100]"  # not a multiple of the batch: the last is partial
    config.data.shuffle_buffer = 256
    config.data.augmentation = _crop_and_flip(32)
    config.data.eval_augmentation = presets.preset("eval_lowres", size=32)
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
  config.lock()
  return config

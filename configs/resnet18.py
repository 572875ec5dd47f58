r"""Retro: ResNet-18 student, MoCo-v2 ResNet-50 teacher, ImageNet.

Command (a TPU or GPU host; convert the teacher first, see configs/effb0.py):

    python -m retro_jax.main --config configs/resnet18.py --workdir runs/resnet18 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Recipe: configs/effb0.py's (200 epochs, batch 256, SGD 0.03 x batch / 256, wd 1e-4, cosine per
epoch, queue 65,536, T = 0.2) with a ResNet-18 student; the adapter maps layer4's 512 x 7 x 7
map to 2048 channels.
Expected: the Retro paper's ResNet-18 row was not available to us (retro.md section 4: only
the EfficientNet-B0 rows are known); not reproduced here (no accelerator was available).

Open points and the reading used:
  * adapter: the InvertedResidual (SiLU), as the Retro code's pre-training builder and its
    "fix transfer" commit; the code's linear-evaluation script builds the SimKD bottleneck
    instead (`--config.student.adapter=simkd`). retro.md section 7, point 12.
  * as configs/effb0.py for the consistency pairing and weight, and batch norm.

Variants: `:smoke` trains 4 steps on CPU (retro_jax.train.recipes.smoke).
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("retro", "resnet18", optimizer="retro")
  return recipes.finish(config, variant, "configs/resnet18.py")

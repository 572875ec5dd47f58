r"""MoCo-v2 ResNet-50 from scratch: a teacher for Retro/DisCo, or the "student alone" baseline.

Command (a TPU or GPU host):

    python -m retro_jax.main --config configs/mocov2_r50.py --workdir runs/mocov2_r50

Recipe (MoCo v2, `facebookresearch/moco` with --mlp --aug-plus --cos): 200 epochs, batch 256,
SGD 0.03 x batch / 256, momentum 0.9, wd 1e-4, cosine per epoch; queue 65,536, T = 0.2,
m = 0.999; head 2048 -> 2048 -> 128.
Expected: 67.5 % ImageNet linear top-1 after 200 epochs (MoCo v2 paper, Table 1; 71.1 % after
800 epochs). Not reproduced here (no accelerator was available). Most users convert the
released checkpoint instead (`python -m retro_jax convert --format moco`).

Open points: batch norm is synchronised over the global batch; MoCo's per-GPU BN with
shuffle-BN for the keys is `--config.student.bn_groups=8` (8 groups of 32 at batch 256;
README, "Batch norm of the MoCo-style methods").

Variants: `:smoke` trains 4 steps on CPU with a ResNet-18 (retro_jax.train.recipes.smoke).
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("mocov2", "resnet50", optimizer="moco_v2")
  if variant == "smoke":
    config.student.name = "resnet18"
    config.student.kwargs = {"low_res_stem": True}
  return recipes.finish(config, variant, "configs/mocov2_r50.py")

r"""Retro: EfficientNet-B0 student, MoCo-v2 ResNet-50 teacher, ImageNet (the paper's headline).

Command (a TPU or GPU host; convert the teacher first):

    python -m retro_jax convert --src moco_v2_800ep_pretrain.pth.tar --format moco \
        --arch resnet50 --out teachers/mocov2_r50
    python -m retro_jax.main --config configs/effb0.py --workdir runs/effb0 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Recipe (retro.md, the authors' code, inherited from DisCo): 200 epochs, global batch 256,
SGD momentum 0.9, lr 0.03 x batch / 256, weight decay 1e-4 on every tensor, cosine per
epoch; queue 65,536, T = 0.2, EMA 0.999; the inverted-residual adapter on the pre-pool map
into the teacher's frozen MoCo-v2 head (2048 -> 2048 -> 128); MoCo-v2 `aug_plus` views.
Expected: 66.9 % ImageNet linear top-1 with the MoCo-v2 ResNet-50 (800 ep) teacher (the
Retro paper, Table 1); not reproduced here (no accelerator was available).

Open points and the reading used (retro_jax/objectives/retro.py):
  * objective.consistency_pairing='same_view' (DisCo's form: student(view 2) vs teacher(view
    2)); 'cross_view' is the authors' code (student(view 1) vs teacher(view 2)).
  * objective.consistency_weight=32: the reference sums the squared error over each GPU's 32
    examples; 32 x the per-sample mean gives the same gradient scale at batch 256.
  * BN is synchronised over the global batch (the reference: per-GPU BN, shuffle-BN keys).

Variants: `:smoke` trains 4 steps on CPU (32 px Fashion-MNIST, batch 16, a random ResNet-18
teacher; `retro_jax.train.recipes.smoke`): it checks the wiring, not the result.
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("retro", "efficientnet_b0", optimizer="retro")
  return recipes.finish(config, variant, "configs/effb0.py")

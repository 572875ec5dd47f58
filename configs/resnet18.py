r"""Retro: ResNet-18 student, MoCo-v2 ResNet-50 teacher, ImageNet.

Command (a TPU or GPU host; convert the teacher first, see configs/effb0.py):

    python -m retro_jax.main --config configs/resnet18.py --workdir runs/resnet18 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Recipe: configs/effb0.py's (200 epochs, batch 256, SGD 0.03 x batch / 256, wd 1e-4, cosine per
epoch, queue 65,536, T = 0.2; the 200-epoch MoCo-v2 ResNet-50 teacher) with a ResNet-18
student; the adapter maps layer4's 512 x 7 x 7 map to 2048 channels.
Student initialisation: the last BN scale of every residual block starts at 0
(`student.kwargs.zero_init_residual=True`). The authors' ResNet-18 is their copy of timm's
(`from models.resnet import resnet18`, `DisCo/main.py` line 36), whose `ResNet.__init__` has
`zero_init_last_bn=True` (`DisCo/models/resnet.py` line 556) and then zeroes each block's last
BN weight (lines 616-619; `BasicBlock.zero_init_last_bn` zeroes `bn2.weight`, lines 290-291).
It changes the initial weights only: the torch export ignores it.
Expected: the Retro paper's ResNet-18 row was not available to us (retro.md section 4: only
the EfficientNet-B0 rows are known); not reproduced here (no accelerator was available).

Open points: this config uses the first reading; `:reference` the authors' code
(`retro_jax.train.recipes.authors_reference`):
  * adapter: the InvertedResidual (SiLU) in both, as the Retro code's pre-training builder
    (`DisCo/moco/builder_kq_mse_largeembedding_2048.py` line 137) and its "fix transfer"
    commit; the code's linear-evaluation script builds the SimKD bottleneck instead
    (`--config.student.adapter=simkd`). retro.md section 7, point 12.
  * consistency pairing 'same_view' (:reference 'cross_view'), teacher BN 'eval' (:reference
    'batch'), student BN synchronised over the global batch (both: the authors' SyncBN), a
    random initial queue (both): as configs/effb0.py explains.

Variants: `:smoke` trains 4 steps on CPU (retro_jax.train.recipes.smoke); `:reference` is the
authors' code form, `:reference_smoke` its 4-step CPU run.
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("retro", "resnet18", optimizer="retro",
                                      student_kwargs={"zero_init_residual": True})
  return recipes.finish(config, variant, "configs/resnet18.py")

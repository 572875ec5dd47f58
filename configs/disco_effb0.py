r"""DisCo (the baseline Retro builds on): EfficientNet-B0 student with its own head, MoCo-v2
ResNet-50 teacher, ImageNet.

Command (a TPU or GPU host; convert the teacher first, see configs/effb0.py):

    python -m retro_jax.main --config configs/disco_effb0.py --workdir runs/disco_effb0 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Teacher: DisCo's released 200-epoch MoCo-v2 ResNet-50 (`ResNet50-checkpoint_0199.pth.tar`,
DisCo-pytorch README.md line 32), the one DisCo's command for this pair loads (Reproduction.md
line 68).

Recipe (DisCo's code, `Yuting-Gao/DisCo-pytorch`): 200 epochs, batch 256, SGD 0.03 x batch /
256, wd 1e-4, cosine per epoch; queue 65,536, T = 0.2, m = 0.999; the student head is
1280 -> 2048 -> 128 (MLP with ReLU); consistency: squared error of the L2-normalised student
and teacher embeddings on both views. Student: EfficientNet-B0 without stochastic depth
(`student.kwargs.drop_path_rate=0`): DisCo's builder calls `base_encoder(num_classes=dim,
pretrained=False)` (`DisCo/moco/builder_kq_mse_largeembedding_2048.py` line 27), leaving timm's
default `drop_path_rate=0.` (`DisCo/models/efficientnet.py` line 336).
Expected: DisCo's abstract reports +19.7 points of linear top-1 over the MoCo-v2 student alone
with the ResNet-50 teacher; the absolute figure was not available to us. Not reproduced here.

Open points: this config uses the first reading; `:reference` uses DisCo's code
(`retro_jax.train.recipes.authors_reference`, which cites the lines):
  * student batch norm: synchronised over the global batch (`student.bn_groups=1`);
    :reference uses DisCo's per-GPU BN, 8 groups of 32 at batch 256 with MoCo's shuffle-BN
    for the keys (`student.bn_groups=8`): DisCo's main.py runs DistributedDataParallel
    without SyncBatchNorm.
  * teacher.bn_mode: 'eval' (running statistics); :reference 'batch' (DisCo's teacher runs in
    train mode, with batch statistics; per GPU, as the student, under :reference).
  * objective.consistency_weight=32 in both: the reference sums the squared error over each
    GPU's 32 examples (its gradient is 32 x that of the per-sample mean at batch 256 on 8 GPUs).
  * the queue starts random in both: DisCo's student starts from the teacher checkpoint's
    `module.queue`, which `convert` does not keep.

Variants: `:smoke` trains 4 steps on CPU with a ResNet-18 student (retro_jax.train.recipes.smoke;
EfficientNet-B0 itself is smoke-tested by configs/effb0.py); `:reference` is DisCo's code form
above, `:reference_smoke` its 4-step CPU run (ResNet-18 student, 8 BN groups of 2).
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("disco", "efficientnet_b0", optimizer="disco",
                                      head_hidden=2048, student_kwargs={"drop_path_rate": 0.0})
  if variant in ("smoke", "reference_smoke"):
    # DisCo's wiring; EfficientNet-B0 itself is smoke-tested by effb0.py. DisCo's ResNet-18
    # is timm's, zero_init_last_bn=True (DisCo/models/resnet.py line 556), as configs/resnet18.py.
    config.student.name = "resnet18"
    config.student.kwargs = {"low_res_stem": True, "zero_init_residual": True}
  return recipes.finish(config, variant, "configs/disco_effb0.py")

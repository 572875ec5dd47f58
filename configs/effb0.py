r"""Retro: EfficientNet-B0 student, MoCo-v2 ResNet-50 teacher, ImageNet (the paper's headline).

Command (a TPU or GPU host; convert the teacher first):

    python -m retro_jax convert --src ResNet50-checkpoint_0199.pth.tar --format moco \
        --arch resnet50 --out teachers/mocov2_r50
    python -m retro_jax.main --config configs/effb0.py --workdir runs/effb0 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Precision: float32 throughout by default. On a TPU or a GPU with bfloat16 tensor cores (NVIDIA
Ampere and later) add `--config.student.dtype=bfloat16` (mixed precision: float32 parameters
and optimiser state, bfloat16 activations, float32 losses; retro_jax/train/precision.py) and
`--config.teacher.dtype=bfloat16` (the frozen teacher in bfloat16). On a CPU neither gains.

Teacher: the MoCo-v2 ResNet-50 after 200 epochs that DisCo released
(`ResNet50-checkpoint_0199.pth.tar`, DisCo-pytorch README.md line 32) and that DisCo's command
for this pair loads (Reproduction.md line 68: `--teacher_arch resnet50 --teacher
/path/to/ckpt/checkpoint_0199.pth.tar`). The Retro code (`beandkay/Reused-Teacher-Projector`,
a fork of DisCo-pytorch) keeps DisCo's README and Reproduction.md unchanged and names no other
teacher.

Recipe (retro.md, the authors' code, inherited from DisCo): 200 epochs, global batch 256,
SGD momentum 0.9, lr 0.03 x batch / 256, weight decay 1e-4 on every tensor, cosine per
epoch; queue 65,536, T = 0.2, EMA 0.999; the inverted-residual adapter on the pre-pool map
into the teacher's frozen MoCo-v2 head (2048 -> 2048 -> 128); MoCo-v2 `aug_plus` views.
Student: EfficientNet-B0 without stochastic depth (`student.kwargs.drop_path_rate=0`), as the
authors build it: their builder calls `base_encoder(num_classes=dim, pretrained=False)`
(`DisCo/moco/builder_kq_mse_largeembedding_2048.py` line 36), so timm's constructor default
`drop_path_rate=0.` holds (`DisCo/models/efficientnet.py` line 336). Our backbone's own
default is torchvision's 0.2. The momentum encoder never drops paths in any case.

Expected: the Retro paper's abstract (arXiv 2405.15311) reports 66.9 % ImageNet linear top-1
for EfficientNet-B0 distilled from a ResNet-50 (69.3 % from ResNet-101, 69.8 % from
ResNet-152); it does not say how or how long the teachers were pre-trained, and the paper's
tables were not available to us. Not reproduced here (no accelerator was available).

Open points: this config uses the first reading; `:reference` uses the authors' code
(`retro_jax.train.recipes.authors_reference`, which cites the lines):
  * objective.consistency_pairing: 'same_view' (DisCo's form: student(view 2) vs teacher(view
    2)); :reference 'cross_view', what the authors' builder computes (student(view 1) vs
    teacher(view 2)).
  * teacher.bn_mode: 'eval' (running statistics); :reference 'batch' (their teacher runs in
    train mode, with batch statistics).
    Evidence for these two defaults: in the Fashion-MNIST study (docs/results.md, 3 seeds)
    the :reference form scored -0.85 ± 1.33 (k-NN k=20), -1.15 ± 2.16 (k=200) and
    -0.14 ± 1.28 (linear) points against the default, paired by seed: no resolved
    difference, so the defaults stay the best reading; at 224 px the default's second
    student forward costs ~1.8x the cross_view step on CPU (issue 12's measurement).
  * student batch norm: synchronised over the global batch in both. The authors' main.py
    converts the whole model to SyncBatchNorm (`DisCo/main.py` line 241), which makes their
    builder's shuffle-BN a no-op; per-GPU BN with shuffle-BN is DisCo's and MoCo's setting
    (configs/disco_effb0.py:reference).
  * objective.consistency_weight=32 in both: the reference sums the squared error over each
    GPU's 32 examples; 32 x the per-sample mean gives the same gradient scale at batch 256.
  * the queue starts random in both: the authors' student starts from the teacher
    checkpoint's `module.queue`, which `convert` does not keep.

Variants: `:smoke` trains 4 steps on CPU (32 px Fashion-MNIST, batch 16, a random ResNet-18
teacher; `retro_jax.train.recipes.smoke`): it checks the wiring, not the result.
`:reference` is the authors' code form above; `:reference_smoke` its 4-step CPU run.
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("retro", "efficientnet_b0", optimizer="retro",
                                      student_kwargs={"drop_path_rate": 0.0})
  return recipes.finish(config, variant, "configs/effb0.py")

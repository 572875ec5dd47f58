r"""DisCo (the baseline Retro builds on): EfficientNet-B0 student with its own head, MoCo-v2
ResNet-50 teacher, ImageNet.

Command (a TPU or GPU host; convert the teacher first, see configs/effb0.py):

    python -m retro_jax.main --config configs/disco_effb0.py --workdir runs/disco_effb0 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Recipe (DisCo's code, `Yuting-Gao/DisCo-pytorch`): 200 epochs, batch 256, SGD 0.03 x batch /
256, wd 1e-4, cosine per epoch; queue 65,536, T = 0.2, m = 0.999; the student head is
1280 -> 2048 -> 128 (MLP with ReLU); consistency: squared error of the L2-normalised student
and teacher embeddings on both views.
Expected: DisCo's abstract reports +19.7 points of linear top-1 over the MoCo-v2 student alone
with the ResNet-50 teacher; the absolute figure was not available to us. Not reproduced here.

Open points and the reading used:
  * objective.consistency_weight=32: the reference sums the squared error over each GPU's 32
    examples (its gradient is 32 x that of the per-sample mean at batch 256 on 8 GPUs).
  * batch norm synchronised over the global batch (the reference: per-GPU, shuffle-BN keys).

Variants: `:smoke` trains 4 steps on CPU with a ResNet-18 student (retro_jax.train.recipes.smoke;
EfficientNet-B0 itself is smoke-tested by configs/effb0.py).
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("disco", "efficientnet_b0", optimizer="disco",
                                      head_hidden=2048)
  if variant == "smoke":  # DisCo's wiring; EfficientNet-B0 itself is smoke-tested by effb0.py
    config.student.name = "resnet18"
    config.student.kwargs = {"low_res_stem": True}
  return recipes.finish(config, variant, "configs/disco_effb0.py")

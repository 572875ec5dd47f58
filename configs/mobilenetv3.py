r"""Retro: MobileNetV3-Large student, MoCo-v2 ResNet-50 teacher, ImageNet.

Command (a TPU or GPU host; convert the teacher first, see configs/effb0.py):

    python -m retro_jax.main --config configs/mobilenetv3.py --workdir runs/mobilenetv3 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Recipe: configs/effb0.py's plus gradient clipping at global norm 5 (the Retro code clips for
MobileNetV3 only), with the adapter's activations HardMish as in the Retro training builder.
Expected: the paper's MobileNetV3 row was not available to us (retro.md section 4); not
reproduced here (no accelerator was available).

Open points and the reading used:
  * adapter input: torchvision's MobileNetV3-Large feature map (960 channels, before the
    classifier); the Retro code uses timm's model, which pools *before* its 960 -> 1280
    conv_head, so its adapter sees a 1280 x 1 x 1 map. Ours keeps the spatial map.
  * adapter activation: HardMish, as in pre-training (the code's linear-evaluation script uses
    HardSwish; retro.md section 7, point 11).

Variants: `:smoke` trains 4 steps on CPU (retro_jax.train.recipes.smoke).
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config("retro", "mobilenet_v3_large", optimizer="retro_mobilenetv3",
                                      adapter_kwargs={"activation": "hard_mish"})
  return recipes.finish(config, variant, "configs/mobilenetv3.py")

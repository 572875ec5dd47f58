r"""Retro: MobileNetV3-Large student, MoCo-v2 ResNet-50 teacher, ImageNet.

Command (a TPU or GPU host; convert the teacher first, see configs/effb0.py):

    python -m retro_jax.main --config configs/mobilenetv3.py --workdir runs/mobilenetv3 \
        --config.teacher.checkpoint=teachers/mocov2_r50

Recipe: configs/effb0.py's (the 200-epoch MoCo-v2 ResNet-50 teacher) plus gradient clipping at
global norm 5, which the Retro code applies to MobileNetV3 only (`DisCo/main.py` lines
473-478: `clip_grad_norm_(model.parameters(), 5.)` when `args.arch == 'mobilenetv3'`), and the
adapter's activations HardMish, as its builder (`HardMishMe`,
`DisCo/moco/builder_kq_mse_largeembedding_2048.py` line 135).
Student: the authors' network, their copy of timm's `mobilenetv3_large_100` (`DisCo/main.py`
lines 35, 212), built with `student.kwargs`:
  * conv_head=True: timm's `forward_features` pools, then applies `conv_head` (1x1, 960 ->
    1280, with bias: `head_bias=True`, `DisCo/models/mobilenetv3.py` line 80) and Hardswish
    (lines 129-136); the builder puts the adapter on that output, so the adapter maps a
    1280 x 1 x 1 map to 2048 channels (not a 960 x 7 x 7 one).
  * bn_eps=1e-5, bn_momentum=0.1: `mobilenetv3_large_100` passes no BN arguments (lines
    368-371), so `resolve_bn_args` (line 351; `DisCo/models/efficientnet_blocks.py` lines
    27-35) returns none and torch's `BatchNorm2d` defaults hold; our backbone's own defaults
    are torchvision's (1e-3, 0.01).
  * no stochastic depth: the constructor's `drop_path_rate=0.` (line 81) holds, and our
    MobileNetV3 has none.
Expected: the paper's MobileNetV3 row was not available to us (retro.md section 4); not
reproduced here (no accelerator was available).

Open points: this config uses the first reading; `:reference` the authors' code
(`retro_jax.train.recipes.authors_reference`):
  * adapter activation: HardMish in both, as in pre-training (the code's linear-evaluation
    script uses HardSwish; retro.md section 7, point 11).
  * consistency pairing 'same_view' (:reference 'cross_view'), teacher BN 'eval' (:reference
    'batch'), student BN synchronised over the global batch (both: the authors' SyncBN), a
    random initial queue (both): as configs/effb0.py explains.

Variants: `:smoke` trains 4 steps on CPU (retro_jax.train.recipes.smoke); `:reference` is the
authors' code form, `:reference_smoke` its 4-step CPU run.
"""

from __future__ import annotations

from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.contrastive_config(
      "retro", "mobilenet_v3_large", optimizer="retro_mobilenetv3",
      student_kwargs={"conv_head": True, "bn_eps": 1e-5, "bn_momentum": 0.1},
      adapter_kwargs={"activation": "hard_mish"})
  return recipes.finish(config, variant, "configs/mobilenetv3.py")

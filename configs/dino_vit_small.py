r"""DINO ViT-S/16 from scratch: a teacher for RoB-DINO, or the "student alone" baseline.

Command (a TPU or GPU host):

    python -m retro_jax.main --config configs/dino_vit_small.py --workdir runs/dino_vits

Recipe (DINO `main_dino.py` defaults with its README's ViT-S/16 settings): 100 epochs, global
batch 1,024, AdamW lr 5e-4 x batch / 256 after 10 warm-up epochs, cosine to 1e-6, weight decay
cosine 0.04 -> 0.4 (not on biases and norms), per-tensor gradient clipping at 3.0; 2 x 224
crops at (0.4, 1) and 8 x 96 at (0.05, 0.4) (the `dino` preset); DINO head 2048 hidden, 256
bottleneck, 65,536 prototypes, trainable weight-norm gain (norm_last_layer False); teacher
temperature 0.04 -> 0.07 over 30 epochs, student 0.1, centre momentum 0.9; teacher EMA
momentum 0.996 -> 1 (cosine); the last layer frozen during the first epoch; drop-path 0.1.
Expected: DINO's README lists its ViT-S/16 results; not reproduced here (no accelerator).

Open points: the teacher EMA is applied at the start of the next step (the same sequence as
DINO's after-step update); batch norm does not arise (ViT).

Variants: `:smoke` trains 4 steps on CPU (32 px Fashion-MNIST, two 32 px and two 16 px crops,
batch 16, 256 prototypes).
"""

from __future__ import annotations

from retro_jax.data import presets
from retro_jax.train import recipes


def get_config(variant: str | None = None):
  config = recipes.multicrop_config(
      "dino", "vit_small_patch16", optimizer="dino", epochs=100, global_batch_size=1024,
      augmentation=presets.preset("dino"), student_kwargs={"drop_path_rate": 0.1},
      head={"out_features": 65536, "hidden_features": 2048, "bottleneck_features": 256,
            "norm_last_layer": False})
  if variant == "smoke":
    config.student.name = "vit_tiny_patch16"
  return recipes.finish(config, variant, "configs/dino_vit_small.py")

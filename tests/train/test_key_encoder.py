"""The momentum (key) encoder of the MoCo-style methods never drops paths.

The authors' students are built without stochastic depth (timm's `drop_path_rate=0.`
default, Reused-Teacher-Projector `DisCo/models/efficientnet.py` line 336, never overridden by
`base_encoder(num_classes=dim, pretrained=False)` in `DisCo/moco/builder_kq_mse_largeembedding_2048.py`
line 36); a student built with drop-path > 0 must still get deterministic keys.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from retro_jax.objectives import mocov2
from retro_jax.train.contrastive_methods import ContrastiveMethod


def test_key_encoder_never_drops_paths():
  """Train mode, two different random keys: the key encoder's outputs are equal (ViT-Tiny)."""
  method = ContrastiveMethod("mocov2", mocov2.Config(queue_size=32), "vit_tiny_patch16",
                             {"img_size": 32, "drop_path_rate": 0.5})
  model = method.build(None, rngs=nnx.Rngs(0))
  model.train()
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  def forward(backbone, x):
    return np.asarray(backbone(x).pooled)

  # Each call draws the next key of the dropout streams: the student's two outputs differ...
  first, second = forward(model.backbone, images), forward(model.backbone, images)
  assert not np.allclose(first, second)
  # ... the key encoder's do not, even reseeded in between.
  nnx.reseed(model.ema_backbone, dropout=2, default=3)
  first = forward(model.ema_backbone, images)
  nnx.reseed(model.ema_backbone, dropout=4, default=5)
  np.testing.assert_array_equal(forward(model.ema_backbone, images), first)


@pytest.mark.parametrize("student, kwargs", [
    ("efficientnet_b0", {"drop_path_rate": 0.2}),
    ("vit_tiny_patch16", {"img_size": 32, "drop_path_rate": 0.1}),
])
def test_every_dropout_of_the_key_encoder_is_off(student, kwargs):
  """Built abstractly (EfficientNet-B0's eager init and forward cost ~1.5 minutes on CPU)."""
  method = ContrastiveMethod("mocov2", mocov2.Config(queue_size=32), student, kwargs)
  model = nnx.eval_shape(lambda: method.build(None, rngs=nnx.Rngs(0)))
  student_rates = [m.rate for _, m in nnx.iter_modules(model.backbone)
                   if isinstance(m, nnx.Dropout)]
  key_rates = [m.rate for _, m in nnx.iter_modules(model.ema_backbone)
               if isinstance(m, nnx.Dropout)]
  assert len(key_rates) == len(student_rates) and max(student_rates) > 0
  assert not any(key_rates)
  assert not jax.tree.leaves(nnx.state(model.ema_backbone, nnx.RngState))

"""Flax NNX backbones, heads and adapters, registered by name.

Models know nothing about training: they map NHWC float32 images to features. Every
backbone returns a `BackboneOutput` and states its `feature_width`; `model.train()` and
`model.eval()` switch batch-norm statistics and dropout/drop-path.
"""

from retro_jax.models.registry import BackboneOutput
from retro_jax.models.registry import backbone_names
from retro_jax.models.registry import create_backbone
from retro_jax.models.registry import register_backbone

__all__ = ["BackboneOutput", "backbone_names", "create_backbone", "register_backbone"]

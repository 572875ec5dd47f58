"""The name -> constructor registry of backbones, and what every backbone returns.

Naming contract (what lets one rule-based converter load PyTorch checkpoints): a backbone's
NNX attribute tree mirrors the PyTorch module tree of its reference layout (torchvision for
ResNet, EfficientNet and MobileNetV3; timm for ViT), so `'.'.join(path)` of every parameter
is the torch state-dict key up to the leaf name (`kernel`<->`weight`, `scale`<->`weight`,
`mean`<->`running_mean`, `var`<->`running_var`). Raw parameters such as ViT's `cls_token`
keep the torch shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from flax import nnx


class BackboneOutput(NamedTuple):
  """What a backbone returns.

  feature_map: the last feature map before pooling, (B, H, W, C) for convolutional nets,
    or the tokens (B, 1 + N, C) for a ViT (class token first).
  pooled: the pooled feature (B, C): global average pool, or the class token for a ViT.
  """

  feature_map: jax.Array
  pooled: jax.Array


BackboneFactory = Callable[..., nnx.Module]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
  """Class or function decorator adding a backbone constructor under `name`."""

  def add(factory: BackboneFactory) -> BackboneFactory:
    if name in _BACKBONES:
      raise ValueError(f"backbone {name!r} is registered twice")
    _BACKBONES[name] = factory
    return factory

  return add


def _import_model_families() -> None:
  # Each family registers its names when imported; importing them here keeps the
  # registry complete without the callers knowing which file defines which name.
  import importlib  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top

  import retro_jax.models as package  # pylint: disable=g-import-not-at-top

  for info in pkgutil.iter_modules(package.__path__):
    if info.name != "registry":
      importlib.import_module(f"{package.__name__}.{info.name}")


def backbone_names() -> list[str]:
  """All registered backbone names, sorted."""
  _import_model_families()
  return sorted(_BACKBONES)


def create_backbone(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
  """Builds the backbone registered as `name`; unknown names list the known ones."""
  _import_model_families()
  try:
    factory = _BACKBONES[name]
  except KeyError:
    raise ValueError(
        f"unknown backbone {name!r}; known backbones: {', '.join(sorted(_BACKBONES))}"
    ) from None
  return factory(rngs=rngs, **kwargs)

"""A backbone with an optional projection head, described by plain data.

This is what a converted teacher, a trained student or an export is: `EncoderSpec` (JSON-ready
names and keyword arguments) rebuilds the module, so a checkpoint directory needs no pickled
code. `Encoder` names its parts `backbone` and `head`, so the torch keys of a teacher
checkpoint map to `backbone.<torch key>` and `head.<torch key>`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from flax import nnx

from retro_jax.models import heads
from retro_jax.models import registry
from retro_jax.models.adapters import create_adapter


class PooledAdapter(nnx.Module):
  """Retro's student-side projection: the dimension adapter on the pre-pool feature map, then
  global average pooling. Saved as a trained Retro student's head, its embedding is the
  feature the authors' linear evaluation uses (`head_kind='adapter'`)."""

  takes_feature_map = True  # Encoder feeds it the feature map, not the pooled feature

  def __init__(self, kind: str, in_features: int, out_features: int, *,
               rngs: nnx.Rngs | None = None, adapter: nnx.Module | None = None, **kwargs: Any):
    """Builds the adapter (`rngs`) or wraps a trained one (`adapter`, e.g. for saving)."""
    if adapter is None:
      adapter = create_adapter(kind, in_features, out_features, rngs=rngs, **kwargs)
    self.adapter = adapter
    self.in_features, self.out_features = in_features, out_features

  def embed(self, feature_map: jax.Array) -> jax.Array:
    return jax.numpy.mean(self.adapter(feature_map), axis=(1, 2))

# Head kinds a spec can name: the classes of `retro_jax.models.heads`.
HEADS: dict[str, type[nnx.Module]] = {
    "mlp": heads.MLPHead,
    "dino": heads.DINOHead,
    "msn": heads.MSNHead,
    "swav": heads.SwAVHead,
    "adapter": PooledAdapter,
}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Everything needed to rebuild an `Encoder` (with fresh parameters)."""

  architecture: str
  backbone_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  head_kind: str | None = None
  head_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> EncoderSpec:
    return cls(**data)


class EncoderOutput(NamedTuple):
  features: jax.Array  # the pooled backbone feature
  feature_map: jax.Array  # pre-pool feature map (CNN) or tokens (ViT)
  embedding: jax.Array | None  # the head's projection before any L2 normalisation


class Encoder(nnx.Module):
  """Backbone plus optional head; `head` is None for a backbone-only model."""

  def __init__(self, backbone: nnx.Module, head: nnx.Module | None = None):
    self.backbone = backbone
    self.head = head
    self.feature_width = backbone.feature_width

  def __call__(self, images: jax.Array) -> EncoderOutput:
    out = self.backbone(images)
    embedding = None
    if self.head is not None:
      takes_map = getattr(self.head, "takes_feature_map", False)
      embedding = self.head.embed(out.feature_map if takes_map else out.pooled)
    return EncoderOutput(out.pooled, out.feature_map, embedding)


def build_encoder(spec: EncoderSpec, *, rngs: nnx.Rngs) -> Encoder:
  """Builds the encoder a spec describes; unknown names raise with the known ones."""
  backbone = registry.create_backbone(spec.architecture, rngs=rngs, **spec.backbone_kwargs)
  if spec.head_kind is None:
    return Encoder(backbone)
  if spec.head_kind not in HEADS:
    raise ValueError(f"unknown head kind {spec.head_kind!r}; known: {', '.join(HEADS)}")
  return Encoder(backbone, HEADS[spec.head_kind](**spec.head_kwargs, rngs=rngs))


def abstract_encoder(spec: EncoderSpec) -> Encoder:
  """The encoder's structure with shapes only (no compute): fill its weights from a file.

  Eager construction runs and compiles every initialiser (tens of seconds for a ResNet-50 on
  a 2-core CPU) only for the values to be overwritten; this takes about a second.
  """
  return nnx.eval_shape(lambda: build_encoder(spec, rngs=nnx.Rngs(0)))


def materialize_rng_state(model: nnx.Module, seed: int = 0) -> None:
  """Gives concrete keys to the RNG streams of a model built by `abstract_encoder`.

  Raises:
    ValueError: a variable is still abstract, i.e. some weight was never filled.
  """
  tags = sorted({v.tag for _, v in nnx.iter_graph(model) if isinstance(v, nnx.RngKey)})
  if tags:
    nnx.reseed(model, **{tag: seed * 1009 + i for i, tag in enumerate(tags)})
  abstract = [".".join(map(str, path)) for path, v in nnx.iter_graph(model)
              if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if abstract:
    raise ValueError(f"{len(abstract)} variables were never given values: {abstract[:20]}")

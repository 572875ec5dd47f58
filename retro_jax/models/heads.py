"""Projection heads in the torch layouts of the reference code: MoCo-v2/DisCo MLP, DINO, MSN,
SwAV.

Every head follows the naming contract of `retro_jax.models.registry`: its NNX attribute
tree mirrors the torch module, so a checkpoint's head entries (with the prefix of the head
stripped) load with `retro_jax.convert.state_dict.load_state_dict`:

  MLPHead (MoCo `fc`, DisCo student head)   0.weight, 0.bias, [1.* BN], 2.weight, ...
  DINOHead (DINO's `DINOHead`)               mlp.0.*, mlp.2.*, mlp.4.*, last_layer.weight_g,
                                             last_layer.weight_v
  MSNHead (VISSL's `msn_head`)               fc.fc1.*, fc.bn1.*, fc.fc2.*, fc.bn2.*, fc.fc3.*,
                                             prototypes
  SwAVHead (SwAV's projection + prototypes)  projection_head.0.*, .1.* BN, .3.*,
                                             prototypes.weight

Each head's `__call__` gives its training output (embedding, prototype logits, prototype
probabilities) and `embed` the projection before any L2 normalisation. Initialisation
follows each reference, so heads trained from scratch start where torch's would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from retro_jax.models.batch_norm import BatchNorm

# torch BatchNorm1d: eps 1e-5, momentum 0.1 (flax counts the other way).
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9
# DINO and VISSL initialise their head Linears with trunc_normal_(std=0.02) and zero biases.
_TRUNC_NORMAL = nnx.initializers.truncated_normal(stddev=0.02)
# torch's nn.Linear default, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# F.normalize's floor on the norm.
_NORMALIZE_EPSILON = 1e-12


def gelu(x: jax.Array) -> jax.Array:
  """torch's default nn.GELU: the exact (erf) form, not the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": jax.nn.relu, "gelu": gelu}


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """torch's F.normalize(x, p=2): x / max(||x||, 1e-12)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _NORMALIZE_EPSILON)


def _uniform(bound: float) -> nnx.Initializer:
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def torch_default_linear(in_features: int, out_features: int, *, use_bias: bool = True,
                         dtype: Any = None, rngs: nnx.Rngs) -> nnx.Linear:
  """An nnx.Linear initialised like a fresh torch nn.Linear (weight and bias U(+-1/sqrt(in)));
  `dtype` is its computation dtype (parameters stay float32)."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias,
                    kernel_init=_TORCH_LINEAR_INIT,
                    bias_init=_uniform(1.0 / math.sqrt(in_features)), dtype=dtype, rngs=rngs)


def _trunc_normal_linear(in_features: int, out_features: int, *, dtype: Any = None,
                         rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_features, out_features, kernel_init=_TRUNC_NORMAL,
                    bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)


def _batch_norm(features: int, *, dtype: Any = None, rngs: nnx.Rngs) -> BatchNorm:
  return BatchNorm(features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON,
                   use_fast_variance=False, dtype=dtype, rngs=rngs)


class TorchSequential(nnx.Module):
  """torch's nn.Sequential: children applied in order under their torch names.

  Layers without parameters (activations) are kept as plain functions under their own
  index, so the indices of the parameterised layers match torch's ('0', '2', ...).
  """

  def __init__(self, layers: Sequence[tuple[str, Callable[[jax.Array], jax.Array]]]):
    self._order = tuple(name for name, _ in layers)
    for name, layer in layers:
      setattr(self, name, layer)

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self._order:
      x = getattr(self, name)(x)
    return x


def _numbered(layers: Sequence[Callable[[jax.Array], jax.Array]]) -> TorchSequential:
  return TorchSequential([(str(i), layer) for i, layer in enumerate(layers)])


class MLPHead(TorchSequential):
  """Linear [-> BN] [-> activation] ... -> Linear, as an unnamed torch Sequential.

  The head *is* the Sequential, so its keys carry no prefix: the MoCo-v2 head (`fc` of the
  MoCo and DisCo checkpoints: Linear(d, d), ReLU, Linear(d, 128)) has keys `0.*`, `2.*` and
  is `moco_v2_head`; DisCo's student head (Linear(C, 2048), ReLU, Linear(2048, 128)) is
  `MLPHead((C, 2048, 128))`; VISSL's `mlp` head, which has no activation by default, is
  `activation=None`. The output is not normalised: the objectives do that.
  """

  def __init__(self, dims: Sequence[int], *, activation: str | None = "relu",
               batch_norm: bool = False, dtype: Any = None, rngs: nnx.Rngs):
    """Builds the head with torch's default Linear initialisation.

    Args:
      dims: widths (input, hidden..., output); at least two.
      activation: 'relu', 'gelu' or None, after every hidden layer (after its BN).
      batch_norm: a BatchNorm1d after every hidden Linear.
      dtype: computation dtype (e.g. jnp.bfloat16; the output has it); parameters and batch
        statistics stay float32. None: the input's.
      rngs: initialisation randomness.
    """
    if len(dims) < 2:
      raise ValueError(f"an MLP head needs an input and an output width, got dims={dims}")
    if activation is not None and activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}; expected one of "
                       f"{sorted(ACTIVATIONS)} or None")
    layers: list[Callable[[jax.Array], jax.Array]] = []
    for i, (width_in, width_out) in enumerate(zip(dims[:-1], dims[1:])):
      layers.append(torch_default_linear(width_in, width_out, dtype=dtype, rngs=rngs))
      if i < len(dims) - 2:
        if batch_norm:
          layers.append(_batch_norm(width_out, dtype=dtype, rngs=rngs))
        if activation is not None:
          layers.append(ACTIVATIONS[activation])
    super().__init__([(str(i), layer) for i, layer in enumerate(layers)])
    self.in_features, self.out_features = dims[0], dims[-1]

  def embed(self, x: jax.Array) -> jax.Array:
    """The projection before L2 normalisation (the head has none, so `__call__`)."""
    return self(x)


def moco_v2_head(in_features: int = 2048, out_features: int = 128, *,
                 rngs: nnx.Rngs) -> MLPHead:
  """MoCo-v2's projection head: Linear(d, d), ReLU, Linear(d, 128), biases, no BN."""
  return MLPHead((in_features, in_features, out_features), rngs=rngs)


class FrozenParam(nnx.Param):
  """A parameter that loads and saves like any other but is never trained.

  DINO's `norm_last_layer=True` fixes the weight-norm gain at 1 (`requires_grad=False`, and
  DINO's optimiser never sees it). The forward pass wraps it in `stop_gradient`; optimisers
  must also leave it out, or decoupled weight decay would still shrink it: build them with
  `wrt=nnx.All(nnx.Param, nnx.Not(FrozenParam))`.
  """


class WeightNormLinear(nnx.Module):
  """`torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))` with its torch parameters.

  weight = weight_g * weight_v / ||weight_v||, the norm taken per output unit (over dim 1
  of the (out, in) weight, torch's `norm_except_dim(v, 2, dim=0)`); `weight_g` (out, 1) and
  `weight_v` (out, in) are raw parameters in torch's shapes, so checkpoints copy as they are.
  """

  def __init__(self, in_features: int, out_features: int, *, fixed_norm: bool,
               dtype: Any = None, rngs: nnx.Rngs):
    """Builds the layer like DINO: v as a fresh nn.Linear weight, g = 1.

    Args:
      in_features: input width.
      out_features: output width (prototypes).
      fixed_norm: hold `weight_g` in a `FrozenParam` (DINO's `norm_last_layer`).
      dtype: computation dtype of the product (the weight is normalised in float32 first);
        None: the input's and the weight's, promoted.
      rngs: initialisation randomness.
    """
    bound = 1.0 / math.sqrt(in_features)
    self.fixed_norm = fixed_norm
    self.dtype = dtype
    self.weight_v = nnx.Param(
        _uniform(bound)(rngs.params(), (out_features, in_features), jnp.float32))
    gain_type = FrozenParam if fixed_norm else nnx.Param
    self.weight_g = gain_type(jnp.ones((out_features, 1), jnp.float32))

  def weight(self) -> jax.Array:
    """The effective (out, in) weight."""
    v = self.weight_v[...]
    g = self.weight_g[...]
    if self.fixed_norm:
      g = jax.lax.stop_gradient(g)
    return g * v / jnp.sqrt(jnp.sum(jnp.square(v), axis=1, keepdims=True))

  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.weight()
    if self.dtype is not None:
      x, weight = x.astype(self.dtype), weight.astype(self.dtype)
    return jnp.matmul(x, weight.T)


class DINOHead(nnx.Module):
  """DINO's projection head: MLP -> L2 normalisation -> weight-normalised prototypes.

  `mlp` is DINO's Sequential (Linear(in, hidden), [BN], GELU, ..., Linear(hidden,
  bottleneck); a single Linear when `num_layers == 1`), `last_layer` the weight-normalised
  Linear(bottleneck, K) without bias. The output is the K prototype logits, before DINO's
  temperature and softmax.
  """

  def __init__(self, in_features: int, out_features: int, *, norm_last_layer: bool = True,
               num_layers: int = 3, hidden_features: int = 2048,
               bottleneck_features: int = 256, batch_norm: bool = False, dtype: Any = None,
               rngs: nnx.Rngs):
    """Builds the head with DINO's initialisation.

    Args:
      in_features: backbone width.
      out_features: number of prototypes K (65,536 for DINO's released heads).
      norm_last_layer: fix the weight-norm gain (see `FrozenParam`); DINO's ViT-B/16
        teacher uses True, its ViT-S/16 and RoB's students False.
      num_layers: Linear layers in `mlp` (DINO's `nlayers`, at least 1).
      hidden_features: width of the hidden layers.
      bottleneck_features: width of the L2-normalised bottleneck.
      batch_norm: BatchNorm1d after each hidden Linear (DINO's `use_bn`, used for ResNets).
      dtype: computation dtype of every layer (e.g. jnp.bfloat16); parameters stay float32,
        the bottleneck is L2-normalised in float32 and the logits come out in `dtype`.
      rngs: initialisation randomness.
    """
    num_layers = max(num_layers, 1)
    self.in_features, self.out_features = in_features, out_features
    if num_layers == 1:
      self.mlp = _trunc_normal_linear(in_features, bottleneck_features, dtype=dtype, rngs=rngs)
    else:
      widths = [in_features] + [hidden_features] * (num_layers - 1) + [bottleneck_features]
      layers: list[Callable[[jax.Array], jax.Array]] = []
      for i in range(num_layers):
        layers.append(_trunc_normal_linear(widths[i], widths[i + 1], dtype=dtype, rngs=rngs))
        if i < num_layers - 1:
          if batch_norm:
            layers.append(_batch_norm(widths[i + 1], dtype=dtype, rngs=rngs))
          layers.append(gelu)
      self.mlp = _numbered(layers)
    self.last_layer = WeightNormLinear(bottleneck_features, out_features,
                                       fixed_norm=norm_last_layer, dtype=dtype, rngs=rngs)

  def embed(self, x: jax.Array) -> jax.Array:
    """The bottleneck projection before L2 normalisation, (..., bottleneck)."""
    return self.mlp(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., in) features -> (..., K) prototype logits."""
    # The norm in float32 at least: a bfloat16 sum of squares over the bottleneck is coarse.
    embedding = self.embed(x)
    normalized = l2_normalize(embedding.astype(jnp.promote_types(embedding.dtype, jnp.float32)))
    return self.last_layer(normalized.astype(embedding.dtype))


class MSNHead(nnx.Module):
  """VISSL's `msn_head`: MLP -> L2 norm -> cosine to prototypes -> softmax(/ temperature).

  `fc` holds fc1, [bn1], GELU, fc2, [bn2], GELU, fc3 under VISSL's names; `prototypes` is the
  (K, out) matrix, L2-normalised on use. The output is a probability vector over the K
  prototypes: softmax(normalize(fc(x)) @ normalize(prototypes).T / temperature), mixed with
  the uniform distribution by `label_smoothing` (VISSL's product with smoothed one-hot
  prototype labels, in closed form). RoB-MSN's teachers use temperature 0.025, which is MSN's
  tau = 0.1 times its target sharpening T = 0.25.

  Checked against vissl/models/heads/msn_head.py (commit 04788de9): layers, names, the
  trunc_normal_(0.02) Linears with zero biases and the U(+-sqrt(1 / out)) prototypes are
  VISSL's, which are also MSN's own `init_model` head and prototypes (facebookresearch/msn
  src/msn_train.py). Two defaults differ on purpose: `batch_norm=True` and
  `temperature=0.025` are RoB's teacher configs' (`teacher/msn_vit_*.yaml`), where VISSL's
  constructor defaults are `use_bn=False`, `temperature=0.1`. `return_query` is `embed`
  followed by `l2_normalize`.
  """

  def __init__(self, in_features: int, num_prototypes: int = 1024, *,
               hidden_features: int = 2048, out_features: int = 256, batch_norm: bool = True,
               temperature: float = 0.025, label_smoothing: float = 0.0, rngs: nnx.Rngs):
    """Builds the head with VISSL's initialisation.

    Args:
      in_features: backbone width.
      num_prototypes: K.
      hidden_features: width of the two hidden layers.
      out_features: width of the projection the prototypes live in.
      batch_norm: BatchNorm1d after the hidden Linears (`use_bn`; True for RoB's teachers).
      temperature: softmax temperature of the cosine scores.
      label_smoothing: VISSL's prototype-label smoothing (0 in every RoB config).
      rngs: initialisation randomness.
    """
    self.temperature = temperature
    self.label_smoothing = label_smoothing
    layers: list[tuple[str, Callable[[jax.Array], jax.Array]]] = [
        ("fc1", _trunc_normal_linear(in_features, hidden_features, rngs=rngs))]
    if batch_norm:
      layers.append(("bn1", _batch_norm(hidden_features, rngs=rngs)))
    layers += [("gelu1", gelu),
               ("fc2", _trunc_normal_linear(hidden_features, hidden_features, rngs=rngs))]
    if batch_norm:
      layers.append(("bn2", _batch_norm(hidden_features, rngs=rngs)))
    layers += [("gelu2", gelu),
               ("fc3", _trunc_normal_linear(hidden_features, out_features, rngs=rngs))]
    self.fc = TorchSequential(layers)
    bound = (1.0 / out_features) ** 0.5
    self.prototypes = nnx.Param(
        _uniform(bound)(rngs.params(), (num_prototypes, out_features), jnp.float32))

  def embed(self, x: jax.Array) -> jax.Array:
    """The projection before L2 normalisation, (..., out)."""
    return self.fc(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., in) features -> (..., K) prototype probabilities (rows sum to 1)."""
    query = l2_normalize(self.embed(x))
    supports = l2_normalize(self.prototypes[...])
    # Full precision even where the default matmul is bf16 (TPU): the 1/0.025 temperature
    # would multiply its rounding error by 40. The matrix is small (K x out).
    scores = jnp.matmul(query, supports.T, precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(scores / self.temperature, axis=-1)
    if self.label_smoothing:
      num_prototypes = supports.shape[0]
      probs = (1.0 - self.label_smoothing) * probs + self.label_smoothing / num_prototypes
    return probs


class SwAVHead(nnx.Module):
  """SwAV's projection head and prototypes (`src/resnet50.py` of facebookresearch/swav).

  `projection_head` is SwAV's Sequential Linear(in, hidden), BatchNorm1d, ReLU, Linear(hidden,
  out) (keys 0.*, 1.*, 3.*; VISSL's `swav_head` with `use_bn` builds the same), `prototypes`
  its Linear(out, K) without bias. The output is the prototype scores of the L2-normalised
  projection, normalize(z) . C^T, with the prototypes as stored: SwAV re-normalises them
  before each training step, not in the forward, and RoB's frozen teacher uses them as they
  are. The prototype product runs at full precision (the scores are divided by RoB-SwAV's
  eps = 0.03 and the student's 0.1).
  """

  def __init__(self, in_features: int, num_prototypes: int = 3000, *,
               hidden_features: int = 2048, out_features: int = 128, batch_norm: bool = True,
               rngs: nnx.Rngs):
    """Builds the head with torch's default Linear initialisation (SwAV and VISSL keep it).

    Args:
      in_features: backbone width (2048 for ResNet-50).
      num_prototypes: K (3,000 for SwAV's released models).
      hidden_features: width of the hidden layer (SwAV's `hidden_mlp`).
      out_features: width of the projection the prototypes live in (`feat_dim`).
      batch_norm: the BatchNorm1d after the hidden Linear.
      rngs: initialisation randomness.
    """
    self.in_features, self.out_features = in_features, out_features
    self.num_prototypes = num_prototypes
    self.projection_head = MLPHead((in_features, hidden_features, out_features),
                                   activation="relu", batch_norm=batch_norm, rngs=rngs)
    self.prototypes = nnx.Linear(out_features, num_prototypes, use_bias=False,
                                 kernel_init=_TORCH_LINEAR_INIT,
                                 precision=jax.lax.Precision.HIGHEST, rngs=rngs)

  def embed(self, x: jax.Array) -> jax.Array:
    """The projection before L2 normalisation, (..., out)."""
    return self.projection_head(x)

  def prototype_matrix(self) -> jax.Array:
    """The (K, out) prototypes, torch's `prototypes.weight`."""
    return self.prototypes.kernel[...].T

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., in) features -> (..., K) prototype scores."""
    return self.prototypes(l2_normalize(self.embed(x)))

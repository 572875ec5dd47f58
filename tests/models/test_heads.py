"""Projection heads against torch modules written in the reference code's own layout.

The torch references are small `torch.nn` modules as MoCo, DisCo, DINO and VISSL define them
(DINO's `DINOHead` and VISSL's `MSNHead` transcribed from their published code). Flax heads
are built abstractly and filled by `load_state_dict`, so each comparison also checks that
the key layout matches the reference exactly. Widths are small; the structure is the same.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch import nn

from retro_jax.convert.state_dict import load_state_dict
from retro_jax.convert.state_dict import model_state_dict
from retro_jax.models import heads

import msn_reference
from torch_reference import RTOL
from torch_reference import randomise
from torch_reference import relative_error

# DINO's checkpoints come from the deprecated `nn.utils.weight_norm` (keys weight_g/weight_v);
# the reference uses it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


def _flax(factory, torch_module: nn.Module) -> nnx.Module:
  model = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
  load_state_dict(model, torch_module.state_dict())
  model.eval()
  return model


def _features(batch: int, width: int, seed: int) -> np.ndarray:
  return np.random.RandomState(seed).randn(batch, width).astype(np.float32)


def _torch_out(module: nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return module(torch.from_numpy(x)).numpy()


@nnx.jit
def _apply(model, x):
  return model(x)


@nnx.jit
def _embed(model, x):
  return model.embed(x)


class TorchDINOHead(nn.Module):
  """DINO's `DINOHead` (facebookresearch/dino, vision_transformer.py), init left to torch."""

  def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
               hidden_dim=2048, bottleneck_dim=256):
    super().__init__()
    nlayers = max(nlayers, 1)
    if nlayers == 1:
      self.mlp = nn.Linear(in_dim, bottleneck_dim)
    else:
      layers = [nn.Linear(in_dim, hidden_dim)]
      if use_bn:
        layers.append(nn.BatchNorm1d(hidden_dim))
      layers.append(nn.GELU())
      for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim))
        if use_bn:
          layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
      layers.append(nn.Linear(hidden_dim, bottleneck_dim))
      self.mlp = nn.Sequential(*layers)
    self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    x = self.mlp(x)
    x = nn.functional.normalize(x, dim=-1, p=2)
    return self.last_layer(x)


class TorchMSNHead(nn.Module):
  """VISSL's `msn_head` (vissl/models/heads/msn_head.py), init left to torch."""

  def __init__(self, in_dim, num_prototypes, use_bn=False, hidden_dim=2048, output_dim=256,
               label_smoothing=0.0, temperature=0.1):
    super().__init__()
    self.temperature = temperature
    self.fc = msn_reference.projection(in_dim, hidden_dim, output_dim, use_bn)
    bound = (1.0 / output_dim) ** 0.5
    self.prototypes = nn.Parameter(torch.empty(num_prototypes, output_dim).uniform_(-bound, bound))
    off_value = label_smoothing / num_prototypes
    on_value = 1.0 - label_smoothing + off_value
    labels = torch.full((num_prototypes, num_prototypes), off_value).scatter_(
        1, torch.arange(num_prototypes).view(-1, 1), on_value)
    self.register_buffer("proto_labels", labels, persistent=False)

  def forward(self, x):
    query = nn.functional.normalize(self.fc(x), dim=-1, p=2)
    supports = nn.functional.normalize(self.prototypes)
    return torch.softmax(query @ supports.T / self.temperature, dim=1) @ self.proto_labels


# --- MLP heads (MoCo-v2 `fc`, DisCo student head, VISSL `mlp`) ---------------------------

def test_moco_v2_head_matches_moco_fc_sequential():
  torch_fc = randomise(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)), seed=0)
  assert set(torch_fc.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
  model = _flax(lambda rngs: heads.moco_v2_head(64, 16, rngs=rngs), torch_fc)
  x = _features(4, 64, seed=1)
  expected = _torch_out(torch_fc, x)
  assert relative_error(_apply(model, jnp.asarray(x)), expected) <= RTOL
  assert relative_error(_embed(model, jnp.asarray(x)), expected) <= RTOL


@pytest.mark.parametrize("activation,batch_norm", [("relu", False), ("gelu", True), (None, False),
                                                   (None, True)])
def test_mlp_head_matches_torch_sequential(activation, batch_norm):
  layers = []
  dims = (48, 64, 40, 16)
  for i, (width_in, width_out) in enumerate(zip(dims[:-1], dims[1:])):
    layers.append(nn.Linear(width_in, width_out))
    if i < len(dims) - 2:
      if batch_norm:
        layers.append(nn.BatchNorm1d(width_out))
      if activation:
        layers.append({"relu": nn.ReLU, "gelu": nn.GELU}[activation]())
  torch_head = randomise(nn.Sequential(*layers), seed=2)
  model = _flax(lambda rngs: heads.MLPHead(dims, activation=activation, batch_norm=batch_norm,
                                           rngs=rngs), torch_head)
  x = _features(4, 48, seed=3)
  assert relative_error(_apply(model, jnp.asarray(x)), _torch_out(torch_head, x)) <= RTOL


def test_mlp_head_batch_norm_train_mode_uses_batch_statistics_like_torch():
  torch_head = randomise(nn.Sequential(nn.Linear(24, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                       nn.Linear(32, 8)), seed=4)
  # Load copies: torch's train-mode forward updates its running statistics in place, and
  # the loaded JAX arrays may share memory with the torch tensors on CPU.
  model = nnx.eval_shape(lambda: heads.MLPHead((24, 32, 8), batch_norm=True, rngs=nnx.Rngs(0)))
  load_state_dict(model, {k: v.clone() for k, v in torch_head.state_dict().items()})
  x = _features(16, 24, seed=5)
  torch_head.train()
  model.train()
  expected = _torch_out(torch_head, x)
  assert relative_error(_apply(model, jnp.asarray(x)), expected) <= RTOL
  # Running means move by torch's momentum 0.1. (Running variances differ by design: torch
  # stores the unbiased batch variance, flax the biased one.)
  np.testing.assert_allclose(model_state_dict(model)["1.running_mean"],
                             torch_head[1].running_mean.numpy(), rtol=1e-5, atol=1e-6)


def test_mlp_head_rejects_bad_configuration():
  with pytest.raises(ValueError, match="activation"):
    heads.MLPHead((4, 4), activation="tanh", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="input and an output"):
    heads.MLPHead((4,), rngs=nnx.Rngs(0))


# --- DINO head ---------------------------------------------------------------------------

DINO_KW = {"hidden_features": 64, "bottleneck_features": 32}
TORCH_DINO_KW = {"hidden_dim": 64, "bottleneck_dim": 32}


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_dino(norm_last_layer):
  torch_head = randomise(TorchDINOHead(48, 100, norm_last_layer=norm_last_layer,
                                       **TORCH_DINO_KW), seed=6)
  if not norm_last_layer:  # a trained gain: not all ones
    with torch.no_grad():
      torch_head.last_layer.weight_g.uniform_(0.5, 2.0)
  keys = set(torch_head.state_dict())
  assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g",
          "last_layer.weight_v"} <= keys
  model = _flax(lambda rngs: heads.DINOHead(48, 100, norm_last_layer=norm_last_layer,
                                            **DINO_KW, rngs=rngs), torch_head)
  x = _features(4, 48, seed=7)
  assert relative_error(_apply(model, jnp.asarray(x)), _torch_out(torch_head, x)) <= RTOL
  with torch.no_grad():
    bottleneck = torch_head.mlp(torch.from_numpy(x)).numpy()
  assert relative_error(_embed(model, jnp.asarray(x)), bottleneck) <= RTOL


@pytest.mark.parametrize("num_layers,batch_norm", [(1, False), (2, True), (4, False)])
def test_dino_head_variants_match_dino(num_layers, batch_norm):
  torch_head = randomise(TorchDINOHead(48, 100, use_bn=batch_norm, nlayers=num_layers,
                                       **TORCH_DINO_KW), seed=8)
  model = _flax(lambda rngs: heads.DINOHead(48, 100, num_layers=num_layers,
                                            batch_norm=batch_norm, **DINO_KW, rngs=rngs),
                torch_head)
  x = _features(4, 48, seed=9)
  assert relative_error(_apply(model, jnp.asarray(x)), _torch_out(torch_head, x)) <= RTOL


def test_weight_norm_is_per_output_unit_like_torch():
  linear = nn.utils.weight_norm(nn.Linear(6, 5, bias=False))
  with torch.no_grad():
    linear.weight_g.uniform_(0.5, 2.0)
  layer = nnx.eval_shape(lambda: heads.WeightNormLinear(6, 5, fixed_norm=False,
                                                        rngs=nnx.Rngs(0)))
  load_state_dict(layer, linear.state_dict())
  linear(torch.zeros(1, 6))  # torch recomputes `weight` from g and v on each forward
  np.testing.assert_allclose(layer.weight(), linear.weight.detach().numpy(), rtol=1e-6)
  row_norms = np.linalg.norm(np.asarray(layer.weight()), axis=1)
  np.testing.assert_allclose(row_norms, linear.weight_g.detach().numpy()[:, 0], rtol=1e-6)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_gain_is_frozen_only_with_norm_last_layer(norm_last_layer):
  # Jitted: one compile costs less on CPU than running each initialiser eagerly.
  head = nnx.jit(lambda: heads.DINOHead(8, 10, norm_last_layer=norm_last_layer,
                                        hidden_features=16, bottleneck_features=4,
                                        rngs=nnx.Rngs(0)))()
  gain = head.last_layer.weight_g
  assert gain.shape == (10, 1) and np.all(np.asarray(gain[...]) == 1.0)
  assert isinstance(gain, heads.FrozenParam) == norm_last_layer
  trainable = nnx.state(head, nnx.All(nnx.Param, nnx.Not(heads.FrozenParam)))
  assert ("weight_g" in trainable["last_layer"]) != norm_last_layer

  x = jnp.asarray(_features(3, 8, seed=10))
  grads = nnx.jit(nnx.grad(lambda h: jnp.sum(h(x) * jnp.arange(10.0))))(head)
  gain_grad = np.asarray(grads["last_layer"]["weight_g"][...])
  assert np.any(gain_grad != 0) != norm_last_layer
  assert np.any(np.asarray(grads["last_layer"]["weight_v"][...]) != 0)


# --- MSN head ----------------------------------------------------------------------------

MSN_KW = {"hidden_features": 64, "out_features": 32}
TORCH_MSN_KW = {"hidden_dim": 64, "output_dim": 32}


def _msn_numpy(state: dict[str, np.ndarray], x: np.ndarray, temperature: float,
               label_smoothing: float = 0.0) -> np.ndarray:
  """The MSN head's equation in float64 NumPy from the torch parameters (BN in eval mode)."""
  def linear(name, h):
    return h @ state[f"fc.{name}.weight"].T + state[f"fc.{name}.bias"]

  def batch_norm(name, h):
    normed = (h - state[f"fc.{name}.running_mean"]) / np.sqrt(
        state[f"fc.{name}.running_var"] + 1e-5)
    return normed * state[f"fc.{name}.weight"] + state[f"fc.{name}.bias"]

  from scipy.special import erf, softmax  # pylint: disable=g-import-not-at-top
  gelu = lambda h: 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
  state = {k: v.astype(np.float64) for k, v in state.items()}
  h = gelu(batch_norm("bn1", linear("fc1", x.astype(np.float64))))
  h = gelu(batch_norm("bn2", linear("fc2", h)))
  z = linear("fc3", h)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  c = state["prototypes"] / np.linalg.norm(state["prototypes"], axis=1, keepdims=True)
  p = softmax(z @ c.T / temperature, axis=1)
  k = c.shape[0]
  return p @ ((1.0 - label_smoothing) * np.eye(k) + label_smoothing / k)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_msn_head_matches_vissl_and_its_equation(label_smoothing):
  torch_head = randomise(TorchMSNHead(48, 100, use_bn=True, label_smoothing=label_smoothing,
                                      temperature=0.025, **TORCH_MSN_KW), seed=11)
  model = _flax(lambda rngs: heads.MSNHead(48, 100, label_smoothing=label_smoothing,
                                           **MSN_KW, rngs=rngs), torch_head)
  x = _features(4, 48, seed=12)
  probs = np.asarray(_apply(model, jnp.asarray(x)))
  assert probs.shape == (4, 100)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
  assert relative_error(probs, _torch_out(torch_head, x)) <= RTOL
  state = {k: v.detach().numpy() for k, v in torch_head.state_dict().items()}
  assert relative_error(probs, _msn_numpy(state, x, 0.025, label_smoothing)) <= RTOL
  with torch.no_grad():
    projection = torch_head.fc(torch.from_numpy(x)).numpy()
  assert relative_error(_embed(model, jnp.asarray(x)), projection) <= RTOL


def test_msn_head_without_batch_norm_matches_vissl():
  torch_head = randomise(TorchMSNHead(48, 100, temperature=0.1, **TORCH_MSN_KW), seed=13)
  model = _flax(lambda rngs: heads.MSNHead(48, 100, batch_norm=False, temperature=0.1,
                                           **MSN_KW, rngs=rngs), torch_head)
  x = _features(4, 48, seed=14)
  assert relative_error(_apply(model, jnp.asarray(x)), _torch_out(torch_head, x)) <= RTOL


def test_msn_head_defaults_are_robs_teacher_head():
  model = nnx.eval_shape(lambda: heads.MSNHead(1024, rngs=nnx.Rngs(0)))
  assert model.temperature == 0.025
  assert model.prototypes.shape == (1024, 256)
  assert model.fc.fc1.kernel.shape == (1024, 2048) and model.fc.fc3.kernel.shape == (2048, 256)
  assert model.fc.bn1.scale.shape == (2048,) and model.fc.bn2.scale.shape == (2048,)

"""Retro's dimension adapters against their torch references.

The InvertedResidual reference is timm's own `InvertedResidual` (what the Retro code builds);
SimKD's bottleneck and the plain 1x1 block are small torch Sequentials written here in their
reference layout. Batch-norm statistics and affine parameters are random, so a wrong
epsilon, padding or statistics mapping shows up as a large error.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from timm.layers.activations import HardMish
from timm.models._efficientnet_blocks import InvertedResidual
from torch import nn

from retro_jax.convert.state_dict import load_state_dict
from retro_jax.models import adapters

from torch_reference import RTOL
from torch_reference import nchw
from torch_reference import num_params
from torch_reference import randomise
from torch_reference import relative_error

TORCH_ACTIVATIONS = {"silu": nn.SiLU, "hard_mish": HardMish, "hard_swish": nn.Hardswish}


def _timm_inverted_residual(in_chs: int, out_chs: int, activation: str) -> nn.Module:
  # Retro's call: InvertedResidual(s_n, t_n, exp_ratio=2, act_layer=..., norm BatchNorm2d).
  return InvertedResidual(in_chs, out_chs, dw_kernel_size=3, exp_ratio=2.0,
                          act_layer=TORCH_ACTIVATIONS[activation])


def _simkd_transfer(s_n: int, t_n: int, factor: int = 2) -> nn.Sequential:
  """SimKD's `transfer` (models/util.py) with its conv1x1 / conv3x3 helpers inlined."""
  return nn.Sequential(
      nn.Conv2d(s_n, t_n // factor, kernel_size=1, padding=0, stride=1, bias=False),
      nn.BatchNorm2d(t_n // factor),
      nn.ReLU(inplace=True),
      nn.Conv2d(t_n // factor, t_n // factor, kernel_size=3, stride=1, padding=1, bias=False),
      nn.BatchNorm2d(t_n // factor),
      nn.ReLU(inplace=True),
      nn.Conv2d(t_n // factor, t_n, kernel_size=1, padding=0, stride=1, bias=False),
      nn.BatchNorm2d(t_n),
      nn.ReLU(inplace=True),
  )


class TorchConv1x1(nn.Module):
  def __init__(self, in_chs: int, out_chs: int, batch_norm: bool):
    super().__init__()
    self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=not batch_norm)
    self.bn = nn.BatchNorm2d(out_chs) if batch_norm else None

  def forward(self, x):
    x = self.conv(x)
    return x if self.bn is None else self.bn(x)


def _flax(kind: str, in_width: int, out_width: int, torch_module: nn.Module, **kwargs):
  model = nnx.eval_shape(lambda: adapters.create_adapter(kind, in_width, out_width,
                                                         rngs=nnx.Rngs(0), **kwargs))
  load_state_dict(model, torch_module.state_dict())
  model.eval()
  return model


@nnx.jit
def _apply(model, x):
  return model(x)


def _maps(channels: int, seed: int, size: int = 6) -> np.ndarray:
  return np.random.RandomState(seed).randn(2, size, size, channels).astype(np.float32)


def _torch_out(module: nn.Module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return module(nchw(x)).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("activation", ["silu", "hard_mish", "hard_swish"])
def test_inverted_residual_matches_timm(activation):
  reference = randomise(_timm_inverted_residual(16, 40, activation), seed=0)
  assert not reference.has_skip
  model = _flax("inverted_residual", 16, 40, reference, activation=activation)
  x = _maps(16, seed=1)
  out = _apply(model, jnp.asarray(x))
  assert out.shape == (2, 6, 6, 40)
  assert relative_error(out, _torch_out(reference, x)) <= RTOL


@pytest.mark.parametrize("implementation", ["grouped", "shifted"])
def test_inverted_residual_matches_timm_with_either_depthwise_kernel(implementation):
  reference = randomise(_timm_inverted_residual(8, 24, "silu"), seed=2)
  model = _flax("inverted_residual", 8, 24, reference)
  model.conv_dw.implementation = implementation
  x = _maps(8, seed=3, size=5)
  assert relative_error(_apply(model, jnp.asarray(x)), _torch_out(reference, x)) <= RTOL


def test_inverted_residual_train_mode_matches_timm():
  reference = randomise(_timm_inverted_residual(8, 24, "silu"), seed=4)
  # Copies: torch's train-mode forward updates its BN statistics in place.
  model = nnx.eval_shape(lambda: adapters.create_adapter("inverted_residual", 8, 24,
                                                         rngs=nnx.Rngs(0)))
  load_state_dict(model, {k: v.clone() for k, v in reference.state_dict().items()})
  model.train()
  reference.train()
  x = _maps(8, seed=5)
  assert relative_error(_apply(model, jnp.asarray(x)), _torch_out(reference, x)) <= RTOL


def test_simkd_matches_simkd_transfer():
  reference = randomise(_simkd_transfer(16, 48), seed=6)
  model = _flax("simkd", 16, 48, reference)
  x = _maps(16, seed=7)
  out = _apply(model, jnp.asarray(x))
  assert out.shape == (2, 6, 6, 48)
  assert relative_error(out, _torch_out(reference, x)) <= RTOL
  assert float(jnp.min(out)) >= 0.0  # SimKD ends with a ReLU


@pytest.mark.parametrize("batch_norm", [True, False])
def test_conv1x1_matches_torch(batch_norm):
  reference = randomise(TorchConv1x1(16, 24, batch_norm), seed=8)
  model = _flax("conv1x1", 16, 24, reference, batch_norm=batch_norm)
  x = _maps(16, seed=9)
  assert relative_error(_apply(model, jnp.asarray(x)), _torch_out(reference, x)) <= RTOL


@pytest.mark.parametrize("kind,in_width,expected", [
    # retro.md 1.5, computed from the layer definitions: EfficientNet-B0 / MobileNetV3 and
    # ResNet-18/34 students with InvertedResidual, ResNet-18 with SimKD.
    ("inverted_residual", 1280, 8_557_056),
    ("inverted_residual", 512, 2_638_848),
    ("simkd", 512, 12_066_816),
    ("conv1x1", 512, 512 * 2048 + 2 * 2048),
])
def test_parameter_counts(kind, in_width, expected):
  model = nnx.eval_shape(lambda: adapters.create_adapter(kind, in_width, 2048, rngs=nnx.Rngs(0)))
  assert num_params(model) == expected
  with torch.device("meta"):
    reference = {"inverted_residual": lambda: _timm_inverted_residual(in_width, 2048, "silu"),
                 "simkd": lambda: _simkd_transfer(in_width, 2048),
                 "conv1x1": lambda: TorchConv1x1(in_width, 2048, True)}[kind]()
  assert sum(p.numel() for p in reference.parameters()) == expected


def test_inverted_residual_rounds_hidden_width_like_timm():
  # 2 x 20 = 40 is a multiple of 8; 2 x 13 = 26 rounds to 24 in timm's make_divisible.
  for in_width in (20, 13):
    model = nnx.eval_shape(lambda w=in_width: adapters.InvertedResidualAdapter(
        w, 32, rngs=nnx.Rngs(0)))
    reference = _timm_inverted_residual(in_width, 32, "silu")
    assert model.conv_pw.kernel.shape == (1, 1, in_width, reference.conv_pw.out_channels)


def test_create_adapter_rejects_unknown_kind_and_activation():
  with pytest.raises(ValueError, match="unknown adapter 'mlp'.*conv1x1, inverted_residual, simkd"):
    adapters.create_adapter("mlp", 8, 16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown activation"):
    adapters.create_adapter("inverted_residual", 8, 16, activation="gelu", rngs=nnx.Rngs(0))


def test_hard_mish_matches_timm():
  x = np.linspace(-4.0, 4.0, 81, dtype=np.float32)
  expected = HardMish()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(adapters.hard_mish(jnp.asarray(x)), expected, rtol=1e-6, atol=1e-7)


def test_initialisation_is_torchs_default():
  # One jitted build (cheaper on CPU than eager initialisers): conv weights in
  # U(+-1/sqrt(fan_in)) like a fresh nn.Conv2d, BN at scale 1 and bias 0.
  model = nnx.jit(lambda: adapters.create_adapter("inverted_residual", 16, 40,
                                                  rngs=nnx.Rngs(0)))()
  for conv, fan_in in ((model.conv_pw, 16), (model.conv_dw, 9), (model.conv_pwl, 32)):
    kernel = np.asarray(conv.kernel[...])
    bound = 1.0 / math.sqrt(fan_in)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound
  for bn in (model.bn1, model.bn2, model.bn3):
    np.testing.assert_array_equal(bn.scale[...], 1.0)
    np.testing.assert_array_equal(bn.bias[...], 0.0)

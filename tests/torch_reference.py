"""Helpers shared by the tests that compare with PyTorch references.

A parity test builds the torch model (torchvision, timm, or a module transcribed from the
reference code), gives it non-trivial batch-norm statistics and affine parameters, loads its
state dict into the Flax NNX model and compares both forwards on the same random images.
`tests/` is on `sys.path` during pytest runs (it holds conftest.py), so test modules in any
folder below it import this one as `torch_reference`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

# Bound on the relative L2 error between a float32 Flax forward and its torch reference.
RTOL = 1e-5


def relative_error(actual, expected) -> float:
  """The relative L2 error ||actual - expected|| / ||expected||, computed in float64.

  Args:
    actual: the result under test: a NumPy or JAX array (any float dtype) or a CPU tensor.
    expected: the reference result, of the same shape.

  Returns:
    The error as a Python float.
  """
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def randomise(model: nn.Module, seed: int) -> nn.Module:
  """Random batch-norm parameters and statistics, and random conv and linear biases.

  Initialisation leaves these at constants (BN scale 1, bias 0, mean 0, variance 1; the
  biases of torchvision's convs and linears at 0), which would hide a swapped mean/variance
  or scale/bias, a wrong epsilon or a missing bias. Every batch norm (1-D, 2-D, 3-D and
  timm's BatchNormAct2d) gets scale ~ U(0.5, 1.5), bias ~ N(0, 0.1^2), running mean
  ~ N(0, 0.1^2) and running variance ~ U(0.5, 1.5); every `nn.Conv2d` and `nn.Linear` bias
  ~ N(0, 0.1^2). Weights keep their initialisation. LayerNorms are not touched.

  Args:
    model: the torch model, changed in place.
    seed: seed of the generator that draws every value, in module order.

  Returns:
    `model`, in eval mode.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        module.weight.uniform_(0.5, 1.5, generator=gen)
        module.bias.normal_(0.0, 0.1, generator=gen)
        module.running_mean.normal_(0.0, 0.1, generator=gen)
        module.running_var.uniform_(0.5, 1.5, generator=gen)
      elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
        module.bias.normal_(0.0, 0.1, generator=gen)
  return model.eval()


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
  """`model`'s state dict without the `classifier.*` entries of a torchvision classifier."""
  return {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}


def random_images(size: int, *, channels: int = 3, seed: int = 0) -> np.ndarray:
  """Two float32 NHWC images of `size` x `size` pixels, every value ~ N(0, 1)."""
  return np.random.default_rng(seed).normal(size=(2, size, size, channels)).astype(np.float32)


def nchw(images: np.ndarray) -> torch.Tensor:
  """NHWC images as the NCHW tensor torch's convolutions take (a view: no copy)."""
  return torch.from_numpy(images.transpose(0, 3, 1, 2))


def num_params(model: nnx.Module) -> int:
  """The number of parameter entries (`nnx.Param`) of an NNX model, abstract or not."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# One jitted forward for every model: equal graph definitions share the compiled program.
_forward = nnx.jit(lambda model, x: model(x))


def assert_feature_parity(model: nnx.Module, features, images: np.ndarray) -> jax.Array:
  """Asserts that a CNN backbone's outputs equal its torch reference's.

  `feature_map` must equal torch's `features(x)` (NCHW, compared in NHWC) and `pooled` its
  spatial mean, each within `RTOL`.

  Args:
    model: the Flax backbone, in the mode to compare.
    features: the torch callable that maps NCHW images to the last feature map.
    images: NHWC float32 images.

  Returns:
    The Flax model's pooled feature.
  """
  with torch.no_grad():
    ref_map = features(nchw(images)).numpy().transpose(0, 2, 3, 1)
  out = _forward(model, jnp.asarray(images))
  assert out.feature_map.shape == ref_map.shape
  assert relative_error(out.feature_map, ref_map) <= RTOL
  assert relative_error(out.pooled, ref_map.mean(axis=(1, 2))) <= RTOL
  return out.pooled


class DinoHead(nn.Module):
  """DINO's `DINOHead` (vision_transformer.py of the DINO release), default settings."""

  def __init__(self, in_dim, out_dim, norm_last_layer=True, hidden_dim=2048, bottleneck_dim=256):
    super().__init__()
    self.mlp = nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
        nn.Linear(hidden_dim, bottleneck_dim))
    self.last_layer = nn.utils.weight_norm(
        nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
    return self.last_layer(x)

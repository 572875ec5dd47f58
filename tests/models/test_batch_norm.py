"""Grouped batch norm: one group is flax's BatchNorm, G groups are G separate BatchNorms.

References: torch's BatchNorm2d/1d in train mode on each slice (outputs, running means) and
NumPy for the running variances (flax keeps the biased variance, torch the unbiased one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from retro_jax.models import create_backbone
from retro_jax.models.batch_norm import BatchNorm
from retro_jax.models.batch_norm import set_batch_groups
from retro_jax.train import mesh as mesh_lib

C = 6


def _bn(groups: int, fast: bool) -> BatchNorm:
  bn = BatchNorm(C, momentum=0.9, epsilon=1e-5, use_fast_variance=fast, batch_groups=groups,
                 rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
  bn.mean[...] = jnp.asarray(rng.normal(size=C), jnp.float32)
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)
  return bn


def _images(shape) -> np.ndarray:
  return np.random.default_rng(2).normal(1.0, 2.0, shape).astype(np.float32)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shape", [(16, 5, 5, C), (16, C)])
def test_one_group_is_flax_batch_norm_exactly(shape, fast):
  x = _images(shape)
  ours, plain = _bn(1, fast), _bn(1, fast)
  reference = nnx.BatchNorm(C, momentum=0.9, epsilon=1e-5, use_fast_variance=fast,
                            rngs=nnx.Rngs(0))
  nnx.update(reference, nnx.state(plain))
  np.testing.assert_array_equal(ours(x), reference(x))
  np.testing.assert_array_equal(ours.mean[...], reference.mean[...])
  np.testing.assert_array_equal(ours.var[...], reference.var[...])


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("groups", [2, 4, 8])
@pytest.mark.parametrize("shape", [(16, 5, 5, C), (16, C)])
def test_groups_are_separate_torch_batch_norms_of_the_slices(shape, groups, fast):
  x = _images(shape)
  bn = _bn(groups, fast)
  mean0, var0 = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
  y = np.asarray(bn(jnp.asarray(x)))
  size = shape[0] // groups
  torch_means, numpy_vars = [], []
  for g in range(groups):
    piece = x[g * size:(g + 1) * size]
    torch_bn = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(
        C, eps=1e-5, momentum=0.1)
    with torch.no_grad():
      torch_bn.weight.copy_(torch.tensor(np.asarray(bn.scale[...])))
      torch_bn.bias.copy_(torch.tensor(np.asarray(bn.bias[...])))
      torch_bn.running_mean.copy_(torch.tensor(mean0))
      torch_bn.running_var.copy_(torch.tensor(var0))
    torch_bn.train()
    nchw = torch.tensor(np.moveaxis(piece, -1, 1) if len(shape) == 4 else piece)
    with torch.no_grad():
      out = torch_bn(nchw).numpy()
    out = np.moveaxis(out, 1, -1) if len(shape) == 4 else out
    # Fast variance (E[x^2] - E[x]^2) of 2 examples loses a few float32 digits.
    np.testing.assert_allclose(y[g * size:(g + 1) * size], out, atol=1e-4, rtol=1e-4)
    torch_means.append(torch_bn.running_mean.numpy())
    axes = tuple(range(piece.ndim - 1))
    numpy_vars.append(0.9 * var0 + 0.1 * piece.astype(np.float64).var(axis=axes))
  # Running statistics: the mean over the groups of what each group's BN would keep.
  np.testing.assert_allclose(bn.mean[...], np.mean(torch_means, 0), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(bn.var[...], np.mean(numpy_vars, 0), atol=1e-5, rtol=1e-5)


def test_eval_mode_ignores_the_groups():
  x = _images((8, 3, 3, C))
  grouped, plain = _bn(4, True), _bn(1, True)
  grouped.eval(), plain.eval()
  np.testing.assert_array_equal(grouped(x), plain(x))


def _tiny_resnet(groups: int = 1):
  model = create_backbone("resnet18", width=8, low_res_stem=True, rngs=nnx.Rngs(3))
  model.train()
  assert set_batch_groups(model, groups) == 20
  return model


@nnx.jit
def _train_forward(model, x):
  return model(x).pooled


def test_grouped_resnet_is_separate_forwards_of_the_slices():
  """A ResNet-18 (width 8, 16 px) with 4 groups: 4 forwards of 4 copies on the slices."""
  x = jnp.asarray(_images((8, 16, 16, 3)))
  grouped = _tiny_resnet(4)
  out = _train_forward(grouped, x)
  copies = [_tiny_resnet(1) for _ in range(4)]
  pieces = [_train_forward(copy, x[2 * g:2 * g + 2]) for g, copy in enumerate(copies)]
  np.testing.assert_allclose(out, jnp.concatenate(pieces), atol=1e-5, rtol=1e-5)
  stats = jax.tree.map(lambda *s: np.mean(s, 0),
                       *[nnx.state(c, nnx.BatchStat) for c in copies])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               nnx.state(grouped, nnx.BatchStat), stats)
  # One group: unchanged from global BN (the same code path as an unmodified model).
  unmodified = create_backbone("resnet18", width=8, low_res_stem=True, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(_train_forward(_tiny_resnet(1), x),
                                _train_forward(unmodified, x))


def test_per_device_groups_under_jit_with_the_batch_sharded():
  """8 groups of a batch sharded over 8 devices: per-device BN, as the unsharded forward."""
  mesh = mesh_lib.make_mesh(jax.devices())
  groups = len(jax.devices())
  x = jnp.asarray(_images((2 * groups, 16, 16, 3)))
  model = _tiny_resnet(groups)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    model = nnx.merge(graphdef, state)
    return model(x).pooled, nnx.state(model, nnx.BatchStat)

  expected, expected_stats = forward(state, x)
  sharded = jax.device_put(x, mesh_lib.batch_sharding(mesh))
  out, stats = forward(jax.device_put(state, mesh_lib.replicated(mesh)), sharded)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               stats, expected_stats)


def test_bad_groups_are_refused():
  model = _tiny_resnet(1)
  for bad in (0, -2, 2.0, True, "4"):
    with pytest.raises(ValueError, match="batch_groups must be a positive integer"):
      set_batch_groups(model, bad)
  set_batch_groups(model, 3)
  with pytest.raises(ValueError, match="student.bn_groups must divide"):
    model(jnp.zeros((8, 16, 16, 3)))
  holder = nnx.List([nnx.BatchNorm(4, rngs=nnx.Rngs(0))])
  with pytest.raises(TypeError, match="without batch_groups"):
    set_batch_groups(holder, 2)

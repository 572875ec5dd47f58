"""The rule-based torch <-> NNX state-dict mapping, against real torch modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

from retro_jax.convert.state_dict import StateDictMismatchError
from retro_jax.convert.state_dict import load_state_dict
from retro_jax.convert.state_dict import model_state_dict


class Small(nnx.Module):
  """Conv (dense and depthwise), BatchNorm, LayerNorm, Linear and a raw parameter."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.dw = nnx.Conv(8, 8, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=8,
                       rngs=rngs)
    self.norm = nnx.LayerNorm(8, epsilon=1e-5, rngs=rngs)
    self.fc = nnx.List([nnx.Linear(8, 5, rngs=rngs)])
    self.token = nnx.Param(np.zeros((1, 1, 8), np.float32))

  def __call__(self, x):
    x = self.dw(self.bn(self.conv(x)))
    x = self.norm(x.mean(axis=(1, 2)) + self.token[0, 0])
    return self.fc[0](x)


class TorchSmall(torch.nn.Module):
  """The same network written with torch.nn: the reference."""

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(8)
    self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    self.norm = torch.nn.LayerNorm(8)
    self.fc = torch.nn.Sequential(torch.nn.Linear(8, 5))
    self.token = torch.nn.Parameter(torch.randn(1, 1, 8))

  def forward(self, x):
    x = self.dw(self.bn(self.conv(x)))
    x = self.norm(x.mean(dim=(2, 3)) + self.token[0, 0])
    return self.fc(x)


@pytest.fixture
def torch_model():
  torch.manual_seed(0)
  model = TorchSmall()
  with torch.no_grad():  # Non-trivial statistics, so a swapped mean/var would show.
    model.bn.running_mean.normal_(0, 0.5)
    model.bn.running_var.uniform_(0.5, 1.5)
    model.bn.weight.normal_(1, 0.2)
    model.bn.bias.normal_(0, 0.2)
    model.norm.weight.normal_(1, 0.2)
  return model.eval()


def test_loaded_model_computes_what_torch_computes(torch_model):
  model = Small(rngs=nnx.Rngs(0))
  load_state_dict(model, torch_model.state_dict())
  model.eval()
  x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()
  got = np.asarray(model(x.transpose(0, 2, 3, 1)))
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-6


def test_round_trip_gives_back_the_torch_state_dict(torch_model):
  model = Small(rngs=nnx.Rngs(0))
  state = torch_model.state_dict()
  load_state_dict(model, state)
  back = model_state_dict(model)
  assert set(back) == {k for k in state if not k.endswith("num_batches_tracked")}
  for key, array in back.items():
    np.testing.assert_array_equal(array, state[key].numpy(), err_msg=key)
  # And torch itself accepts it (strict), once its bookkeeping counter is put back.
  back["bn.num_batches_tracked"] = np.array(0)
  TorchSmall().load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in back.items()},
                               strict=True)


def _kernel(model: Small) -> np.ndarray:
  return np.asarray(model.conv.kernel.get_value()).copy()


@pytest.mark.parametrize("damage, kind, key", [
    (lambda s: s.pop("bn.running_var"), "missing from the state dict", "bn.running_var"),
    (lambda s: s.update({"fc.1.weight": torch.zeros(5, 8)}), "unexpected in the state dict",
     "fc.1.weight"),
    (lambda s: s.update({"fc.0.weight": torch.zeros(5, 9)}), "shape mismatch",
     "fc.0.weight: file (5, 9), model expects (5, 8)"),
    (lambda s: s.update({"conv.weight": torch.zeros(8, 3, 5, 5)}), "shape mismatch",
     "conv.weight: file (8, 3, 5, 5), model expects (8, 3, 3, 3)"),
])
def test_any_mismatch_raises_and_loads_nothing(torch_model, damage, kind, key):
  model = Small(rngs=nnx.Rngs(0))
  before = _kernel(model)
  state = dict(torch_model.state_dict())
  damage(state)
  with pytest.raises(StateDictMismatchError) as error:
    load_state_dict(model, state, context="teacher.pth (torchvision): ")
  message = str(error.value)
  assert message.startswith("teacher.pth (torchvision): state dict does not match")
  assert f"1 {kind}:" in message and key in message
  np.testing.assert_array_equal(_kernel(model), before)  # Nothing was loaded partially.


def test_long_lists_are_cut_at_twenty_with_counts():
  model = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(0)) for _ in range(30)])
  with pytest.raises(StateDictMismatchError) as error:
    load_state_dict(model, {})
  assert len(error.value.missing) == 60
  assert "60 missing from the state dict:" in str(error.value)
  assert "... and 40 more" in str(error.value)

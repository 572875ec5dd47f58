"""SwAV's ResNet in torch, written from facebookresearch/swav `src/resnet50.py`, and its files.

`SwAVResNet` is SwAV's `ResNet(block, layers, normalize=True, hidden_mlp, output_dim,
nmb_prototypes)`: a zero `ConstantPad2d(1)` before a 7x7 stride-2 conv1 with padding 2, SwAV's
BasicBlock / Bottleneck (copies of torchvision's, taken from torchvision here), the projection
head Linear -> BatchNorm1d -> ReLU -> Linear, L2 normalisation and prototypes Linear without
bias. `save_released` writes its state dict as SwAV's released files are: bare, every key under
`module.` (DistributedDataParallel's prefix). Shared by the conversion and engine tests.
"""

from __future__ import annotations

import pathlib

import torch
import torchvision
from torch import nn

from torch_reference import randomise


class SwAVResNet(nn.Module):
  """SwAV's ResNet with its head (widen 1), random weights and randomised BN statistics."""

  def __init__(self, depth: int = 50, *, hidden_mlp: int = 2048, output_dim: int = 128,
               nmb_prototypes: int = 3000, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)
    trunk = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]()
    self.padding = nn.ConstantPad2d(1, 0.0)
    # "change padding 3 -> 2 compared to original torchvision code because added a padding
    # layer" (src/resnet50.py).
    self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=2, bias=False)
    nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
    self.bn1, self.relu, self.maxpool = trunk.bn1, trunk.relu, trunk.maxpool
    self.layer1, self.layer2, self.layer3, self.layer4 = (
        trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    width = trunk.fc.in_features
    self.projection_head = nn.Sequential(nn.Linear(width, hidden_mlp), nn.BatchNorm1d(hidden_mlp),
                                         nn.ReLU(inplace=True), nn.Linear(hidden_mlp, output_dim))
    self.prototypes = nn.Linear(output_dim, nmb_prototypes, bias=False)
    randomise(self, seed)

  def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
    x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x: torch.Tensor):
    """(pooled features, projection before normalisation, prototype scores)."""
    features = self.forward_backbone(x)
    projection = self.projection_head(features)
    return features, projection, self.prototypes(nn.functional.normalize(projection, dim=1, p=2))


def save_released(model: SwAVResNet, path: pathlib.Path) -> pathlib.Path:
  """Writes `model` as SwAV's released `.pth.tar` files are: a bare state dict, `module.*`."""
  torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
  return path

"""SwAV's ResNet in torch, written from facebookresearch/swav `src/resnet50.py`, and its files.

`SwAVResNet` is SwAV's `ResNet(block, layers, normalize=True, hidden_mlp, output_dim,
nmb_prototypes)`: a zero `ConstantPad2d(1)` before a 7x7 stride-2 conv1 with padding 2, SwAV's
`_make_layer` of its BasicBlock / Bottleneck (copies of torchvision's, taken from torchvision
here), the projection head Linear -> BatchNorm1d -> ReLU -> Linear, L2 normalisation and
prototypes Linear without bias. `save_released` writes its state dict as SwAV's released files are: bare, every key under
`module.` (DistributedDataParallel's prefix). Shared by the conversion and engine tests.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn
from torchvision.models import resnet

from torch_reference import randomise


class SwAVResNet(nn.Module):
  """SwAV's ResNet with its head (widen 1), random weights and randomised BN statistics."""

  def __init__(self, depth: int = 50, *, width: int = 64, hidden_mlp: int = 2048,
               output_dim: int = 128, nmb_prototypes: int = 3000, seed: int = 0):
    """`width` is SwAV's width_per_group * widen (64; 128 for ResNet-50w2); the tests also
    build narrower ResNet-18s, which SwAV's BasicBlock check (base_width 64) would refuse."""
    super().__init__()
    torch.manual_seed(seed)
    block, layers = {18: (resnet.BasicBlock, (2, 2, 2, 2)),
                     50: (resnet.Bottleneck, (3, 4, 6, 3))}[depth]
    self.padding = nn.ConstantPad2d(1, 0.0)
    # "change padding 3 -> 2 compared to original torchvision code because added a padding
    # layer" (src/resnet50.py).
    self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=2, bias=False)
    self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self._inplanes = width
    self.layer1 = self._make_layer(block, width, layers[0], 1)
    self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
    self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
    self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    width = self._inplanes
    self.projection_head = nn.Sequential(nn.Linear(width, hidden_mlp), nn.BatchNorm1d(hidden_mlp),
                                         nn.ReLU(inplace=True), nn.Linear(hidden_mlp, output_dim))
    self.prototypes = nn.Linear(output_dim, nmb_prototypes, bias=False)
    randomise(self, seed)

  def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """src/resnet50.py `_make_layer` (groups 1, no dilation)."""
    downsample = None
    if stride != 1 or self._inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self._inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self._inplanes, planes, stride, downsample)]
    self._inplanes = planes * block.expansion
    layers += [block(self._inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

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

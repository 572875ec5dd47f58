"""The reference input pipeline: MoCo-v2's `aug_plus` two-crop loader, as its repository has it.

torchvision `ImageFolder` + `TwoCropsTransform` of the composed transforms + a `DataLoader`;
`GaussianBlur` is MoCo's own PIL `ImageFilter.GaussianBlur(radius=sigma)` with sigma drawn from
U(0.1, 2.0). Written here (not imported from the MoCo repository, which is not a package) so
the benchmark measures exactly the pipeline people report as data-bound.
"""

from __future__ import annotations

import random

from PIL import ImageFilter
import torch
import torchvision
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
  """MoCo's blur: PIL's Gaussian filter with a radius drawn from U(sigma)."""

  def __init__(self, sigma=(0.1, 2.0)):
    self.sigma = sigma

  def __call__(self, image):
    return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCropsTransform:
  """Two independent draws of the same transform: the query and the key view."""

  def __init__(self, transform):
    self.transform = transform

  def __call__(self, image):
    return [self.transform(image), self.transform(image)]


def aug_plus(size: int = 224) -> transforms.Compose:
  """MoCo-v2's `augmentation` list for `--aug-plus`, at `size` pixels."""
  return transforms.Compose([
      transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
      transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
      transforms.RandomGrayscale(p=0.2),
      transforms.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
  ])


def moco_loader(root: str, batch_size: int, workers: int, size: int = 224,
                seed: int = 0) -> torch.utils.data.DataLoader:
  """MoCo's training loader over an image folder (shuffled, dropping the last batch)."""
  dataset = torchvision.datasets.ImageFolder(root, TwoCropsTransform(aug_plus(size)))
  generator = torch.Generator().manual_seed(seed)
  return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                     num_workers=workers, pin_memory=False, drop_last=True,
                                     generator=generator)

"""Fixtures shared by the data tests."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.datasets


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
  """Six 40x48 uint8 RGB crops of scikit-learn's sample photos (sky, foliage, petals, edges,
  saturated and grey pixels)."""
  china, flower = sklearn.datasets.load_sample_images().images
  corners = [(china, 0, 0), (china, 200, 150), (china, 300, 500), (flower, 0, 0),
             (flower, 150, 250), (flower, 350, 400)]
  return np.stack([img[y:y + 40, x:x + 48] for img, y, x in corners])

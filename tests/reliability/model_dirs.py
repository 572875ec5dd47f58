"""The smallest model directories the bad-input tests need, written by the library itself.

The weights are random NumPy values put into the shape-only model (`abstract_encoder`), so no
initialiser is compiled: a directory takes well under a second.
"""

from __future__ import annotations

import pathlib
import shutil

import jax
import numpy as np
from flax import nnx

from retro_jax import checkpoint
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder
from retro_jax.models.encoder import materialize_rng_state

INPUT = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
# ResNet-18 at width 4 (of 64) with a low-resolution stem and an MLP head.
TINY = EncoderSpec("resnet18", {"width": 4, "low_res_stem": True}, "mlp", {"dims": [32, 16, 8]})
# The smallest backbone that `export --format torch` accepts (torchvision's layout).
TORCH_EXPORTABLE = EncoderSpec("mobilenet_v3_small")


def save_random(directory: pathlib.Path, spec: EncoderSpec = TINY) -> pathlib.Path:
  """A model directory of `spec` with random weights (positive batch-norm variances)."""
  model = abstract_encoder(spec)
  rng = np.random.default_rng(0)

  def value(path, leaf):
    if any(getattr(key, "key", None) == "var" for key in path):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
    return rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype)

  weights = nnx.state(model, (nnx.Param, nnx.BatchStat))
  nnx.update(model, jax.tree.map_with_path(value, weights))
  materialize_rng_state(model)
  return checkpoint.save_model(directory, model, spec, {"input": INPUT})


def truncated_copy(model_dir: pathlib.Path, directory: pathlib.Path) -> pathlib.Path:
  """A copy of `model_dir` whose largest weights file is cut to 1,000 bytes."""
  shutil.copytree(model_dir, directory)
  largest = max((p for p in (directory / checkpoint.STATE_DIR).rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as file:
    file.truncate(1000)
  return directory

"""A model directory as a Flax module for your own code: `load_student`.

    import retro_jax
    model, preprocess = retro_jax.load_student("exports/effb0")
    features = model(preprocess(images)).features    # NHWC uint8 images -> pooled features

`preprocess` does to raw images what the run's input pipeline did before the network: pixel
values to [0, 1], grayscale to RGB (as retro_jax/data/host_ops.py does), then the mean/std
that the directory's model.json records. It is written with jax.numpy, so it also runs inside
`jax.jit`. Resizing is left to the caller (the networks take any size; the run's evaluation
size is in its config).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax import checkpoint
from retro_jax.models.encoder import Encoder


class PreprocessError(ValueError):
  """Images that the model cannot take (rank, channels or dtype)."""


def make_preprocess(mean, std) -> Callable[[jax.Array | np.ndarray], jax.Array]:
  """The normalisation of a model whose inputs were normalised with `mean`/`std` (per channel).

  The returned function takes NHWC images: uint8 pixels (0-255) or floating-point pixels in
  [0, 1]; one channel is repeated to the model's channel count.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)

  def preprocess(images):
    if images.ndim != 4:
      raise PreprocessError(f"preprocess takes NHWC images (4 dimensions), got shape "
                            f"{tuple(images.shape)}")
    if images.dtype == np.uint8:
      images = jnp.asarray(images, jnp.float32) / 255.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
      images = jnp.asarray(images, jnp.float32)
    else:
      raise PreprocessError(f"preprocess takes uint8 pixels (0-255) or floating-point pixels "
                            f"in [0, 1], got {images.dtype}")
    channels = images.shape[-1]
    if channels == 1 and len(mean) != 1:
      images = jnp.repeat(images, len(mean), axis=-1)
    elif channels != len(mean):
      raise PreprocessError(f"the model takes {len(mean)} channels, the images have "
                            f"{channels} (shape {tuple(images.shape)}; NHWC expected)")
    return (images - mean) / std

  return preprocess


def load_student(directory: str | pathlib.Path) -> tuple[Encoder, Callable]:
  """The model of a retro_jax model directory (eval mode) and its input preprocessing.

  Args:
    directory: an `export --format orbax` output, a run's WORKDIR/student, or a `convert`
      output.

  Returns:
    (model, preprocess): `model(preprocess(images))` gives `.features` (pooled backbone
    features), `.feature_map` and, with a head, `.embedding`. Call `model.train()` before
    fine-tuning it (batch statistics); `nnx.split(model)` gives its graph and weights.
  """
  description = checkpoint.read_description(directory)  # Checked before any weight is read.
  normalisation = description.get("input")
  if not (isinstance(normalisation, dict) and "mean" in normalisation and "std" in normalisation):
    raise checkpoint.ModelDirectoryError(
        f"{pathlib.Path(directory) / checkpoint.MODEL_JSON} records no input normalisation "
        "(\"input\": {\"mean\", \"std\"}); export the model again with retro_jax export")
  model, _ = checkpoint.load_model(directory)
  return model, make_preprocess(normalisation["mean"], normalisation["std"])

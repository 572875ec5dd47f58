"""The convert and embed command lines run in-process, for the end-to-end conversion tests."""

from __future__ import annotations

import pathlib

import numpy as np

from retro_jax import embed
from retro_jax.convert import cli as convert_cli


def run_convert(*args) -> int:
  """Runs `python -m retro_jax.convert` with `args` (each passed through `str`).

  Args:
    *args: the command-line arguments: strings, paths or anything else `str` renders.

  Returns:
    The exit status.
  """
  return convert_cli.main([str(a) for a in args])


def run_embed(checkpoint, images: np.ndarray, tmp_path: pathlib.Path, output: str) -> np.ndarray:
  """Embeds `images` with `python -m retro_jax.embed` and asserts that it succeeds.

  Args:
    checkpoint: the model directory written by `convert`.
    images: NHWC images, float32 or uint8.
    tmp_path: a folder for the input and output `.npy` files.
    output: what to write: "features" or "embedding".

  Returns:
    The array `embed` wrote.
  """
  images_path, out_path = tmp_path / f"images_{output}.npy", tmp_path / f"out_{output}.npy"
  np.save(images_path, images)
  assert embed.main(["--checkpoint", str(checkpoint), "--images", str(images_path), "--out",
                     str(out_path), "--output", output, "--batch-size", "2"]) == 0
  return np.load(out_path)

"""Runs a saved model on an array of images: `python -m retro_jax.embed`.

  python -m retro_jax.embed --checkpoint teachers/mocov2_r50 --images x.npy --out f.npy \\
      [--output features|embedding] [--batch-size 64]

IN.npy is an NHWC image array. uint8 images are scaled to [0, 1] and normalised with the
model's mean/std (from its model.json); float32 images are taken as already normalised.
`features` writes the pooled backbone features, `embedding` the projection head's output
before any L2 normalisation. The model runs in eval mode (running batch-norm statistics).
Works on converted teachers and on trained or exported students (any retro_jax model
directory).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from retro_jax import output_paths
from retro_jax import storage
from retro_jax import user_errors

OUTPUTS = ("features", "embedding")


class EmbedError(user_errors.UserError):
  """A user-facing failure: printed as one message, exit code 1."""


def read_images(path: storage.Path) -> np.ndarray:
  if not path.is_file():
    raise EmbedError(f"--images {path}: no such file")
  try:
    with path.open("rb") as file:
      images = np.load(file, allow_pickle=False)
  except (ValueError, OSError) as error:
    raise EmbedError(f"--images {path} is not a NumPy .npy array: {error}") from None
  if images.ndim != 4 or images.shape[-1] != 3:
    raise EmbedError(f"--images must be NHWC with 3 channels, got shape {images.shape}")
  if not len(images):
    raise EmbedError(f"--images {path} holds no images (shape {images.shape})")
  if images.dtype not in (np.uint8, np.float32):
    raise EmbedError(f"--images must be uint8 (raw pixels) or float32 (normalised), "
                     f"got {images.dtype}")
  return images


def embed(model, images: np.ndarray, *, mean, std, output: str = "features",
          batch_size: int = 64, progress=None) -> np.ndarray:
  """Pooled features or head embeddings of `images`, computed in batches of `batch_size`."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if output == "embedding" and model.head is None:
    raise EmbedError("this model has no projection head: use --output features")
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    if batch.dtype == np.uint8:
      batch = (batch.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
          std, np.float32)
    result = nnx.merge(graphdef, state)(batch)
    return result.features if output == "features" else result.embedding

  chunks = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    valid = len(batch)
    if valid < batch_size:  # Pad the last batch: one shape, one compilation.
      batch = np.concatenate([batch, np.zeros((batch_size - valid, *batch.shape[1:]),
                                              batch.dtype)])
    chunks.append(np.asarray(forward(state, batch))[:valid])
    if progress is not None:
      progress(start + valid, len(images))
  return np.concatenate(chunks).astype(np.float32)


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.embed") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  parser.add_argument("--checkpoint", required=True, type=storage.argument,
                      help="a retro_jax model directory (converted, trained or exported)")
  parser.add_argument("--images", required=True, type=storage.argument,
                      help="NHWC .npy array")
  parser.add_argument("--out", required=True, type=storage.argument,
                      help="the .npy file to write, at exactly this path (replaced if it "
                      "exists)")
  parser.add_argument("--output", choices=OUTPUTS, default="features")
  parser.add_argument("--batch-size", type=int, default=64)
  user_errors.add_debug_flag(parser)
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error("--batch-size must be positive")
  output_paths.check_file(args.out, "--out")  # Before any model is loaded or run.
  images = read_images(args.images)
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top

  model, description = checkpoint.load_model(args.checkpoint)
  result = embed(model, images, mean=description["input"]["mean"],
                 std=description["input"]["std"], output=args.output,
                 batch_size=min(args.batch_size, len(images)),
                 progress=lambda done, total: print(f"\rembedded {done}/{total}", end="",
                                                    file=sys.stderr))
  print(file=sys.stderr)
  args.out.parent.mkdir(parents=True, exist_ok=True)
  partial = args.out.with_name(args.out.name + ".partial")
  with partial.open("wb") as file:  # np.save(path) would add .npy to another suffix.
    np.save(file, result)
  partial.replace(args.out)  # Atomic: an interrupted run leaves no half-written array.
  print(f"wrote {args.output} {result.shape} float32 to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

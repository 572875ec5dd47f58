"""Small image folders and TFDS datasets built on the spot, for the source and pipeline tests.

Images are random noise of a few tens of pixels in the formats the sources accept; every TFDS
example carries `number`, the order in which the builder generated it, so a test can tell
which record is which after TFDS has shuffled them into its files.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# PIL format names by file extension.
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
           ".webp": "WEBP"}


def encoded_image(rng: np.random.Generator, extension: str = ".png",
                  size: tuple[int, int] | None = None) -> bytes:
  """A random RGB image of `size` (height, width; default 24-48 px sides), encoded."""
  height, width = size or tuple(rng.integers(24, 49, size=2))
  pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, FORMATS[extension.lower()])
  return buffer.getvalue()


def truncated_jpeg(rng: np.random.Generator) -> bytes:
  """A JPEG cut off after its headers and a little of its data."""
  data = encoded_image(rng, ".jpg", (48, 48))
  return data[:len(data) // 4]


def make_image_folder(root: pathlib.Path, counts: dict[str, int], seed: int = 0,
                      extensions: tuple[str, ...] = (".jpg", ".png", ".JPEG", ".bmp", ".webp")
                      ) -> pathlib.Path:
  """root/<class>/<n>.<ext>, `counts[class]` images each, extensions taken in turn."""
  rng = np.random.default_rng(seed)
  for name, count in counts.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
      extension = extensions[i % len(extensions)]
      (root / name / f"{i:03d}{extension}").write_bytes(encoded_image(rng, extension))
  return root


class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """`train` and `test` splits of random PNG images; `bad` lists generation numbers whose
  image is replaced by a truncated JPEG."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Test data."}

  def __init__(self, *, sizes: dict[str, int], bad: tuple[int, ...] = (), **kwargs):
    self._sizes = sizes
    self._bad = bad
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "number": tfds.features.Scalar(np.int64)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in self._sizes.items()}

  def _generate_examples(self, split, n):
    rng = np.random.default_rng(len(split))
    for number in range(n):
      image = (truncated_jpeg(rng) if number in self._bad and split == "train"
               else encoded_image(rng, ".png"))
      yield number, {"image": io.BytesIO(image), "label": number % 3, "number": number}


def build_tiny_tfds(data_dir: pathlib.Path, name: str = "tiny_images",
                    sizes: dict[str, int] | None = None, bad: tuple[int, ...] = (),
                    num_shards: int = 3) -> pathlib.Path:
  """Prepares a `TinyImages` dataset called `name` in `data_dir`, split into `num_shards`."""
  # Unregistered, so that every test may build its own; readers find it through `data_dir`.
  builder_class = type(name.title().replace("_", ""), (TinyImages,), {"name": name},
                       skip_registration=True)
  builder = builder_class(sizes=sizes or {"train": 48, "test": 20}, bad=bad,
                          data_dir=str(data_dir), file_format="tfrecord")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      num_shards=num_shards))
  return data_dir

"""How TensorFlow and TFDS are set up inside a JAX process.

TensorFlow is only the host-side input pipeline here: it must never take a GPU or TPU away
from JAX, and TFDS must never sit in its download retries (about 200 s per attempt when the
network is unreachable) instead of failing with a clear message.

Importing TensorFlow imports JAX, so any XLA flags must be set before calling anything here.
"""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def import_tensorflow() -> ModuleType:
  """Imports TensorFlow with every accelerator hidden from it, once per process."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  # Must run before TF initialises its devices; the first call in a process does.
  for kind in ("GPU", "TPU"):
    tf.config.set_visible_devices([], kind)
  return tf


def disable_tfds_download_retries() -> None:
  """Makes a TFDS download attempt fail at its first connection error.

  TFDS mounts a urllib3 `Retry(total=MAX_RETRIES, backoff_factor=0.2)` on every download
  session and reads `MAX_RETRIES` at call time, so setting it to zero is enough.
  """
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top

  downloader.MAX_RETRIES = 0

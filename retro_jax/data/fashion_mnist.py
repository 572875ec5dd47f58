"""Fashion-MNIST for TFDS, built offline from the files of Debian's `dataset-fashion-mnist`.

TFDS's own `fashion_mnist` builder (tensorflow_datasets/image_classification/mnist.py) does the
work, unchanged; only where its four `.gz` downloads come from changes, through TFDS's
manual-download mechanism (see `retro_jax.data.prepare`). TFDS accepts a manual file only if
its size and SHA-256 equal those it registers for the upstream download
(tensorflow_datasets/url_checksums/fashion_mnist.txt), and no check is skipped here: the
files TFDS reads are byte-identical to the upstream downloads.

Why Debian's files differ, and how they are made identical again. Upstream compressed the
IDX files with GNU gzip, which stores the original file name (the FNAME field) and a
modification time in the gzip header (RFC 1952). Debian's package build normalises gzip
headers for reproducible builds (strip-nondeterminism): it removes the name and sets the time
to the package date (2020-06-05). The compressed stream and the CRC-32/size trailer are left
alone, so the decompressed IDX content is upstream's, each Debian file is shorter by exactly
its name plus the terminating NUL (23 or 24 bytes), and putting the two fields back gives the
upstream bytes. The upstream times below were recovered once by trying candidate seconds
(August 2017) until the SHA-256 equalled TFDS's registered one; all four files matched
(train files 2017-08-31 10:50:06 UTC, t10k files 10:50:27 UTC): proof that nothing but
these two header fields differs.

Every file is checked against TFDS's registry before anything is built (for a clear message),
and again by TFDS's download manager. Files that already are the upstream downloads (fetched
elsewhere and passed with `--source-dir`) are taken as they are; anything else is refused with
both checksums in the message.
"""

from __future__ import annotations

import hashlib
import pathlib
import struct
from collections.abc import Mapping
from typing import Any

from retro_jax.data import prepare

DEFAULT_SOURCE_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

# Upstream gzip modification times (seconds since 1970, UTC), by registered file name.
UPSTREAM_GZIP_MTIME = {
    "train-images-idx3-ubyte.gz": 1504176606,
    "train-labels-idx1-ubyte.gz": 1504176606,
    "t10k-images-idx3-ubyte.gz": 1504176627,
    "t10k-labels-idx1-ubyte.gz": 1504176627,
}

_GZIP_DEFLATE = b"\x1f\x8b\x08"  # gzip magic number and compression method 8 (deflate).
_FNAME = 0x08  # Header flag: an original file name follows the 10-byte header.

HOW_TO_GET = (
    "Get the four Fashion-MNIST .gz files with one of:\n"
    "  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs them into "
    f"{DEFAULT_SOURCE_DIR})\n"
    "  --source-dir DIR   a folder holding train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
    "(e.g. data/fashion of https://github.com/zalandoresearch/fashion-mnist)\n"
    "  --download   on a machine that reaches the internet")


def restore_upstream_header(filename: str, data: bytes) -> bytes | None:
  """Puts back the gzip header fields Debian's build removed; None if `data` is not such a file.

  Args:
    filename: the registered upstream file name, e.g. "train-images-idx3-ubyte.gz".
    data: the bytes of the local `.gz` file.

  Returns:
    The upstream file's bytes (when `data` is the Debian copy of it), or None when `filename`
    is not a Fashion-MNIST file or `data` is not a gzip file without a stored name.
  """
  mtime = UPSTREAM_GZIP_MTIME.get(filename)
  if mtime is None or data[:3] != _GZIP_DEFLATE or data[3] != 0:
    return None
  # Header: magic, method, flags, mtime (little-endian), extra flags and OS (kept), then FNAME.
  name = filename.removesuffix(".gz").encode("latin-1") + b"\0"
  return data[:3] + bytes([_FNAME]) + struct.pack("<I", mtime) + data[8:10] + name + data[10:]


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def stage(source_dir: pathlib.Path, staging_dir: pathlib.Path, url_infos: Mapping[str, Any],
          log: prepare.Log) -> pathlib.Path:
  """Writes the upstream `.gz` files into `staging_dir`, TFDS's manual directory for the build.

  Args:
    source_dir: folder holding the four files (Debian's copies or the upstream downloads).
    staging_dir: an empty, temporary folder.
    url_infos: TFDS's registry for `fashion_mnist`: URL -> UrlInfo(size, checksum, filename).
    log: receives one line per file.

  Returns:
    `staging_dir`, now holding the four files under their registered names.

  Raises:
    SourceMissingError: some files are not in `source_dir` (nothing was written).
    SourceMismatchError: a file is neither the upstream one nor Debian's copy of it.
  """
  infos = sorted(url_infos.values(), key=lambda info: info.filename)
  if not infos:
    raise prepare.PrepareError("TFDS registers no files for fashion_mnist: is TFDS installed "
                               "completely?")
  missing = [info.filename for info in infos if not (source_dir / info.filename).is_file()]
  if missing:
    raise prepare.SourceMissingError(
        f"Fashion-MNIST files not found in {source_dir}: {', '.join(missing)}")
  for info in infos:
    path = source_dir / info.filename
    data = path.read_bytes()
    restored = restore_upstream_header(info.filename, data)
    if _sha256(data) == info.checksum:
      how = "the upstream file"
    elif restored is not None and _sha256(restored) == info.checksum:
      data, how = restored, "Debian's copy, upstream gzip header restored"
    else:
      raise prepare.SourceMismatchError(
          f"{path} is not the Fashion-MNIST file TFDS registers: SHA-256 {_sha256(data)} "
          f"({len(data):,} bytes), expected {info.checksum} ({info.size:,} bytes) for the "
          "upstream file or for Debian's copy with its gzip header restored. The file is "
          "corrupt or comes from elsewhere.")
    (staging_dir / info.filename).write_bytes(data)
    log(f"  {info.filename}: {how}; SHA-256 equals TFDS's registered {info.checksum[:16]}...")
  return staging_dir


RECIPE = prepare.Recipe(name="fashion_mnist", default_source_dir=DEFAULT_SOURCE_DIR,
                        how_to_get=HOW_TO_GET, stage=stage)

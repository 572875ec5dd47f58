"""Where a run's files go: a local folder or cloud storage (gs://, s3://, ...), one path type.

Every path a user names for output or a model (workdirs, checkpoints, model directories,
exports, metrics, reports, study folders, `embed --out`) goes through `path()`, which returns
an `etils.epath.Path`, the path type Orbax itself uses: local paths become absolute, and
`gs://bucket/x` stays a URI. `pathlib.Path("gs://bucket/x").absolute()` would instead silently
become the local folder ./gs:/bucket/x, and a Colab run's checkpoints would die with the VM.

epath reads and writes gs:// through TensorFlow's file system (installed with retro_jax), and
s3:// / az:// / hf:// through fsspec (install s3fs, adlfs or huggingface_hub). Orbax's own GCS
code (the bucket's layout, deleting old checkpoints) also needs `google-cloud-storage`: the
`gcs` extra (`pip install "retro_jax[gcs]"`; Colab has it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import re
import shutil
import tempfile

from etils import epath

from retro_jax.user_errors import UserError

Path = epath.Path  # What `path()` returns: pathlib's API, local or in the cloud.

# The schemes epath reads and writes (etils/epath/gpath.py `_URI_PREFIXES`).
CLOUD_SCHEMES = ("gs", "s3", "az", "hf")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StoragePathError(UserError, ValueError):
  """A path whose storage retro_jax cannot write (an unknown scheme, a missing client)."""


def _gcs_client_missing() -> bool:
  """Whether Orbax's GCS helpers would fail to import google.cloud.storage."""
  try:
    return importlib.util.find_spec("google.cloud.storage") is None
  except ModuleNotFoundError:  # no google.cloud namespace at all
    return True


def path(value: str | os.PathLike) -> epath.Path:
  """The user's path `value` as an epath.Path: a cloud URI kept as it is, a local path (or a
  file:// URI) absolute.

  Raises:
    StoragePathError: an unknown scheme (`ftp://...`), `gs:/x` with one slash (which would be a
      local folder named "gs:"), or gs:// without google-cloud-storage.
  """
  if isinstance(value, epath.Path) and not is_local(value):
    return value
  text = os.fspath(value)
  match = _URI.match(text)
  if match is None:
    first = text.split("/", 1)[0]
    if first.endswith(":") and first[:-1].lower() in CLOUD_SCHEMES:
      raise StoragePathError(f"{text}: did you mean {first}//{text[len(first):].lstrip('/')}? "
                             f"(as written, it is a local folder named {first!r})")
    # pathlib's absolute() (not abspath): the same strings as before for recorded identities.
    return epath.Path(pathlib.Path(text).expanduser().absolute())
  scheme = match.group(1).lower()
  if scheme == "file":
    return epath.Path(pathlib.Path(text[len("file://"):]).absolute())
  if scheme not in CLOUD_SCHEMES:
    raise StoragePathError(f"{text}: retro_jax cannot write {scheme}:// paths; use a local path "
                           f"or one of {', '.join(s + '://' for s in CLOUD_SCHEMES)}")
  if scheme == "gs" and _gcs_client_missing():
    raise StoragePathError(f"{text}: gs:// paths need google-cloud-storage (Orbax lists and "
                           "deletes checkpoints with it): pip install \"retro_jax[gcs]\"")
  return epath.Path(text)


def argument(value: str) -> epath.Path:
  """`path` as an argparse `type=`: a refused path is a usage error that says why."""
  try:
    return path(value)
  except StoragePathError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def is_local(value: str | os.PathLike) -> bool:
  """Whether `value` is a path on this machine's file system (not a cloud URI)."""
  return _URI.match(os.fspath(value)) is None


def files(directory: epath.Path) -> list[str]:
  """The relative (posix) names of every file under `directory`, in pathlib's order (part by
  part, as sorting `rglob`'s paths gave; `checkpoint.content_digest` depends on it). epath's
  rglob refuses `**` patterns, so this walks."""
  found = []
  for root, _, names in directory.walk():
    found += [(root / name).relative_to(directory).as_posix() for name in names]
  return sorted(found, key=lambda name: pathlib.PurePosixPath(name).parts)


class LocalMirror:
  """A local folder whose files are copied to `target` (any epath) on `sync()`.

  For writers that only know local files (TensorFlow's summary writer on s3:// or a mocked
  gs://, for one): they write into `local`, and each sync uploads what changed. With a local
  `target`, `local` is `target` itself and sync does nothing.
  """

  def __init__(self, target: epath.Path):
    self.target = target
    self._temporary = None if is_local(target) else tempfile.mkdtemp(prefix="retro_jax_mirror_")
    self.local = target if self._temporary is None else epath.Path(self._temporary)
    self._sizes: dict[str, int] = {}

  def sync(self) -> None:
    if self._temporary is None:
      return
    for name in files(self.local):
      size = (self.local / name).stat().length
      if self._sizes.get(name) != size:  # Appended to, or new: upload it whole.
        (self.target / name).parent.mkdir(parents=True, exist_ok=True)
        (self.local / name).copy(self.target / name, overwrite=True)
        self._sizes[name] = size

  def close(self) -> None:
    self.sync()
    if self._temporary is not None:
      shutil.rmtree(self._temporary, ignore_errors=True)

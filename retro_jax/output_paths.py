"""Checks that a command's outputs can be written, before it spends any compute.

A CLI calls `check_directory` / `check_file` on each path it will write (a workdir, a model
directory, an .npy file) right after parsing its arguments, so a path that is a file, lies
under a file, or is on a read-only file system (or not writable by this user) is refused in a
second, with the flag and the reason, instead of failing after training or feature
extraction. Nothing is created here: missing directories are made later by the writer.

Writability is `os.access(..., W_OK)` with the effective user (what the kernel checks when
the file is opened), on the path itself or, if it does not exist yet, on the nearest
existing parent directory, where it would be created. A cloud path (gs://...) is only checked
for a scheme retro_jax can write (`storage.path`): a bucket's permissions show at the first
write, which the runs make before any long computation (the workdir is created at once).
"""

from __future__ import annotations

import os
import pathlib

from retro_jax import storage
from retro_jax.user_errors import UserError


class OutputPathError(UserError):
  """An output path that cannot be written (a file in the way, read-only, no permission)."""


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
  for candidate in (path, *path.parents):
    if candidate.exists():
      return candidate
  return pathlib.Path(path.anchor or ".")


def _not_writable(directory: pathlib.Path) -> str | None:
  """Why files cannot be created in the existing `directory`, or None if they can."""
  effective = os.access in os.supports_effective_ids
  if os.access(directory, os.W_OK | os.X_OK, effective_ids=effective):
    return None
  try:
    read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
  except OSError:
    read_only = False
  return "is on a read-only file system" if read_only else "is not writable (permission denied)"


def _check_where(path: pathlib.Path, flag: str, directory: pathlib.Path) -> None:
  """Refuses `path` (the user's `flag`) when `directory`, where it goes, cannot take it."""
  existing = _nearest_existing(directory)
  if not existing.is_dir():
    where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
    raise OutputPathError(f"{flag} {path} {where}, not a directory; choose another path")
  if (why := _not_writable(existing)) is not None:
    where = "" if existing == path else f" cannot be created: {existing}"
    raise OutputPathError(f"{flag} {path}{where} {why}; choose another path")


def check_directory(path: str | os.PathLike, flag: str) -> storage.Path:
  """Refuses a directory to be written (made if missing) that cannot be.

  Args:
    path: the directory the command will write into (it may not exist yet).
    flag: how the user named it, for the message (e.g. "--workdir").

  Returns:
    `path` as a `storage.path` (local and absolute, or a cloud URI).

  Raises:
    OutputPathError: `path` or one of its parents is a file, or the directory where it is (or
      would be) created is not writable.
  """
  where = storage.path(path)  # Refuses an unknown scheme or "gs:/x" first.
  if storage.is_local(where):
    path = pathlib.Path(path)  # As the user wrote it, for the messages.
    _check_where(path, flag, path)
  return where


def check_file(path: str | os.PathLike, flag: str) -> storage.Path:
  """Refuses a file to be written (or replaced) that cannot be; its directory may be missing.

  Raises:
    OutputPathError: `path` is a directory, one of its parents is a file, or its directory
      (where it is written, then renamed into place) is not writable.
  """
  where = storage.path(path)
  if storage.is_local(where):
    path = pathlib.Path(path)
    if path.is_dir():
      raise OutputPathError(f"{flag} {path} is a directory; name the file to write")
    _check_where(path, flag, path.parent)
  return where

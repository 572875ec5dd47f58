"""A local stand-in for Google Cloud Storage: gs://BUCKET/KEY lives in ROOT/BUCKET/KEY.

Our code sees and passes on gs:// URIs unchanged; the storage underneath is swapped at the
points where the real thing would reach the network:
  - etils.epath (our files and Orbax's): its backend for every path, through epath's own
    `epath.testing.mock_epath`, maps gs:// to ROOT (with TensorFlow installed, epath would
    send gs:// to TensorFlow's GCS client before looking at the mocked backends: its
    `_is_tf_installed` answers False here);
  - Orbax's TensorStore arrays: `gcs_utils.get_kvstore_for_gcs`, the kvstore spec of a GCS
    path, becomes TensorStore's file driver under ROOT;
  - Orbax's bucket lookup (`is_hierarchical_namespace_enabled`, google-cloud-storage): a
    bucket with a flat namespace, as most are;
  - retro_jax.storage's check that google-cloud-storage is installed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib

from etils.epath import gpath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

from retro_jax import storage

PREFIX = "gs://"


@contextlib.contextmanager
def fake_gcs(root: pathlib.Path, monkeypatch):
  """Within: gs:// paths read and write `root` (one folder per bucket)."""

  def local(path):
    text = os.fspath(path)
    return str(root / text[len(PREFIX):]) if text.startswith(PREFIX) else text

  def as_uri(text: str) -> str:
    prefix = str(root) + os.sep
    return PREFIX + text[len(prefix):] if text.startswith(prefix) else text

  def one(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def two(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  def glob(original, pattern):
    return [as_uri(p) for p in original(local(pattern))]

  def walk(original, top, **kwargs):
    for directory, dirs, files in original(local(top), **kwargs):
      yield as_uri(directory), dirs, files

  def kvstore(path: str) -> dict:
    return {"driver": "file", "path": local(path)}

  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(storage, "_gcs_client_missing", lambda: False)
  with epath_testing.mock_epath(
      copy=two, rename=two, replace=two, exists=one, isdir=one, listdir=one, makedirs=one,
      mkdir=one, open=one, remove=one, rmtree=one, stat=one, glob=glob, walk=walk):
    yield


def local_folders_named_gs(*roots: pathlib.Path) -> list[pathlib.Path]:
  """Folders named 'gs:' under `roots`: what pathlib makes of gs://bucket/x."""
  return [p for root in roots for p in root.rglob("gs:")]


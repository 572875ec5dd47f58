"""Builds TFDS catalog datasets from local files, with TFDS's own builders, or downloads them.

A *recipe* says how to feed one TFDS catalog builder from files already on disk: it puts
the files the builder would download into a folder that TFDS reads as the builder's manual
directory (`DownloadConfig.manual_dir`). TFDS's download manager takes
`manual_dir/<registered file name>` in place of a download, but only after checking it against
the size and SHA-256 that TFDS registers for the URL, so the prepared dataset is the one a
normal download gives: same builder code, version, features, split names and example keys.

Where the files are missing, the dataset is downloaded by TFDS itself if its download host
answers a quick connection test; with neither, `prepare` fails at once with a message saying
how to get the files. TFDS's download retries are switched off first
(`tf_runtime.disable_tfds_download_retries`), so nothing ever waits minutes on an unreachable
host.

Adding a dataset: a module defining `RECIPE = Recipe(...)` and one line in `DATASETS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from retro_jax import output_paths
from retro_jax.data import tf_runtime
from retro_jax.user_errors import UserError

# TFDS name -> (module defining RECIPE, one-line summary). Add a line per dataset.
DATASETS: dict[str, tuple[str, str]] = {
    "fashion_mnist": ("retro_jax.data.fashion_mnist",
                      "Fashion-MNIST, 60,000 + 10,000 28x28 grey images, from the IDX files of "
                      "Debian's dataset-fashion-mnist"),
}

# Seconds to wait for the download host before calling it unreachable.
CONNECT_TIMEOUT_S = 3.0

Log = Callable[[str], None]


class PrepareError(UserError, RuntimeError):
  """The dataset cannot be prepared; the message says why and what to do."""


class UnknownDatasetError(PrepareError):
  """No recipe has this name; the message lists the known ones (a usage error: exit 2)."""

  exit_code = 2


class SourceMissingError(PrepareError):
  """Some of the files a recipe needs are not in its source folder."""


class SourceMismatchError(PrepareError):
  """A source file is there but is not the file TFDS registers; nothing was built."""


# stage(source_dir, staging_dir, url_infos, log) -> manual_dir: checks the files in source_dir
# and returns the folder TFDS must read them from (source_dir itself, or staging_dir after
# writing there). url_infos is TFDS's registry for the builder: URL -> UrlInfo (size, checksum,
# filename). Raises SourceMissingError / SourceMismatchError.
StageFn = Callable[[pathlib.Path, pathlib.Path, Mapping[str, Any], Log], pathlib.Path]


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to feed one TFDS catalog builder from local files.

  Attributes:
    name: the TFDS catalog name of the dataset.
    default_source_dir: where the files are when no `source_dir` is given.
    how_to_get: appended to every error: how a user gets the files.
    stage: puts the files where TFDS reads them (see `StageFn`).
    downloadable: whether TFDS can download the dataset itself (imagenet2012 cannot).
  """

  name: str
  default_source_dir: pathlib.Path
  how_to_get: str
  stage: StageFn
  downloadable: bool = True


@dataclasses.dataclass(frozen=True)
class Prepared:
  """What `prepare` did and where the dataset is."""

  name: str
  version: str
  data_dir: str  # the versioned folder, <data dir>/<name>/<version>
  splits: dict[str, int]  # split name -> number of examples
  built: bool  # False when it was already prepared
  source: str | None  # the local folder read, "download", or None when nothing was built


def recipe(name: str) -> Recipe:
  """The recipe of a dataset listed in `DATASETS`."""
  if name not in DATASETS:
    raise UnknownDatasetError(
        f"no offline recipe for {name!r}; datasets that can be prepared: "
        f"{', '.join(DATASETS)}. (Any other TFDS dataset downloads itself: tfds.load(name).)")
  return importlib.import_module(DATASETS[name][0]).RECIPE


def _print(message: str) -> None:
  print(message, flush=True)


def download_hosts(url_infos: Mapping[str, Any] | None) -> list[tuple[str, int]]:
  """The (host, port) pairs of the URLs TFDS would download."""
  hosts = set()
  for url in url_infos or {}:
    parts = urllib.parse.urlsplit(url)
    hosts.add((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
  return sorted(hosts)


def unreachable(hosts: list[tuple[str, int]], timeout: float = CONNECT_TIMEOUT_S) -> str | None:
  """Why the first unreachable host cannot be reached, or None when all answer."""
  if not hosts:
    return "TFDS registers no download URL for it"
  for host, port in hosts:
    try:
      socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:  # DNS failure, refused, timed out, blocked by a test harness.
      return f"{host}:{port} is unreachable ({error})"
  return None


def summary(builder, built: bool, source: str | None) -> Prepared:
  return Prepared(name=builder.name, version=str(builder.version), data_dir=str(builder.data_dir),
                  splits={s: info.num_examples for s, info in builder.info.splits.items()},
                  built=built, source=source)


def counts(prepared: Prepared) -> str:
  return ", ".join(f"{split} {n:,}" for split, n in prepared.splits.items())


def _stage(the_recipe: Recipe, builder, source: pathlib.Path, staging: pathlib.Path,
           may_download: bool, log: Log) -> tuple[pathlib.Path | None, str]:
  """The manual dir for TFDS, or (None, why) when the files are missing and a download may do."""
  log(f"{the_recipe.name}: reading the files from {source}")
  try:
    return the_recipe.stage(source, staging, builder.url_infos or {}, log), ""
  except SourceMissingError as error:
    if not may_download:
      raise PrepareError(f"{error}\n{the_recipe.how_to_get}") from None
    return None, str(error)
  except SourceMismatchError as error:
    raise PrepareError(f"{error}\n{the_recipe.how_to_get}") from None


def prepare(name: str, *, data_dir: str | os.PathLike | None = None,
            source_dir: str | os.PathLike | None = None, download: bool | None = None,
            force: bool = False, log: Log = _print) -> Prepared:
  """Builds TFDS's `name` dataset into `data_dir`, from local files or by downloading.

  Args:
    name: a dataset listed in `DATASETS`.
    data_dir: TFDS data directory; None means TFDS's default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets), where `tfds.load(name)` looks without a `data_dir`.
    source_dir: folder holding the files; None means the recipe's default folder.
    download: True: download only; False: local files only; None: local files, or a
      download when they are missing and the download host answers. Giving `source_dir`
      implies False.
    force: rebuild even when the dataset is already prepared.
    log: receives the progress messages (TFDS prints its own progress bars to stderr).

  Returns:
    What was done and where the dataset is.

  Raises:
    PrepareError: the files are missing or wrong and the download is impossible; the message
      says what to do. Nothing is left half-built.
  """
  the_recipe = recipe(name)
  if download and source_dir is not None:
    raise ValueError("source_dir and download=True exclude each other")
  if download and not the_recipe.downloadable:
    raise PrepareError(f"TFDS cannot download {name}: it needs local files.\n"
                       f"{the_recipe.how_to_get}")
  # Imported here: `python -m retro_jax.data --help` must stay instant.
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import download_manager
  # pylint: enable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
  if not force and builder.data_path.exists() and builder.is_prepared():
    prepared = summary(builder, built=False, source=None)
    log(f"{name} {prepared.version} is already prepared in {prepared.data_dir} "
        f"({counts(prepared)}); nothing to do (--force rebuilds it).")
    return prepared

  output_paths.check_directory(
      builder.data_dir_root, "--data-dir" if data_dir is not None else
      "the TFDS data directory ($TFDS_DATA_DIR, else ~/tensorflow_datasets; --data-dir sets it)")
  tf_runtime.disable_tfds_download_retries()
  with tempfile.TemporaryDirectory(prefix=f"retro_jax-{name}-") as staging:
    source, manual_dir, missing = None, None, ""
    if not download:
      source = pathlib.Path(source_dir if source_dir is not None
                            else the_recipe.default_source_dir)
      # Auto-download only when the user named no folder: a named folder must hold the files.
      may_download = source_dir is None and download is None and the_recipe.downloadable
      manual_dir, missing = _stage(the_recipe, builder, source, pathlib.Path(staging),
                                   may_download, log)
    if manual_dir is None:
      why = unreachable(download_hosts(builder.url_infos))
      if why is not None:
        reason = f"{missing}, and the download" if missing else "the download"
        raise PrepareError(f"cannot prepare {name}: {reason} is impossible: {why}.\n"
                           f"{the_recipe.how_to_get}")
      log(f"{name}: downloading with TFDS into {builder.data_dir_root}/downloads")

    log(f"{name}: building version {builder.version} with TFDS's own builder into "
        f"{builder.data_dir} ...")
    start = time.perf_counter()
    # Only now (the checks above fail in a second without it): TF with no GPU/TPU, before TFDS
    # imports it.
    tf_runtime.import_tensorflow()
    config = tfds.download.DownloadConfig(
        manual_dir=manual_dir,
        # Extractions of local files are throwaway: the files stay where they are.
        extract_dir=None if manual_dir is None else pathlib.Path(staging) / "extracted",
        download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if force
                       else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS),
        try_download_gcs=False)
    try:
      builder.download_and_prepare(download_config=config)
    # requests' ConnectionError is an OSError; a checksum error means a corrupted download.
    except (OSError, download_manager.NonMatchingChecksumError) as error:
      if manual_dir is not None:
        raise  # Local files were verified before: this is not a download problem.
      raise PrepareError(f"downloading {name} failed: {error}\n{the_recipe.how_to_get}") from None

  prepared = summary(builder, built=True,
                      source="download" if manual_dir is None else str(source))
  root = "" if data_dir is None else f", data_dir={os.fspath(data_dir)!r}"
  log(f"{name}: done in {time.perf_counter() - start:.0f} s: {counts(prepared)} examples in "
      f"{prepared.data_dir}\nread it with tfds.load({name!r}{root}, download=False)")
  return prepared

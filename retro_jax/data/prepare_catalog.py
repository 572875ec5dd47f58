"""`data prepare NAME` for any TFDS dataset: TFDS's own `download_and_prepare`, checked first.

The offline recipes (retro_jax/data/prepare.py: fashion_mnist from Debian's files) cover the
datasets the tests need; every other name of TFDS's catalog (or a builder class the user's code
registered) is built here by TFDS itself, with:
  - `manual_dir`: the files a dataset needs downloaded by hand (imagenet2012's tars);
  - `try_gcs`: TFDS's copy of the prepared dataset on its public GCS bucket (gs://tfds-data),
    where TFDS has one, instead of the original download;
  - `data_dir`: local or gs:// (TFDS writes through TensorFlow's file system).
Everything that can be known without the network is checked before TFDS starts: the name (a
misspelt one is a usage error with close matches), a manual-download dataset without
`manual_dir`, a missing `manual_dir`, and whether the hosts TFDS would download from (or GCS)
answer a quick connection test. TFDS's download retries are switched off
(`tf_runtime.disable_tfds_download_retries`), so nothing waits minutes on an unreachable host.
"""

from __future__ import annotations

import difflib
import os
import time

from retro_jax import output_paths
from retro_jax import storage
from retro_jax.data import prepare
from retro_jax.data import tf_runtime

# Where TFDS keeps its prepared copies (tensorflow_datasets/core/utils/gcs_utils.py).
GCS_HOST = ("storage.googleapis.com", 443)


def _builder(name: str, data_dir: str | None):
  """TFDS's builder of `name`; an unknown name is a usage error naming close matches."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    catalog = tfds.list_builders(with_community_datasets=False)
    matches = difflib.get_close_matches(name.split(":")[0], catalog, n=5, cutoff=0.6)
    hint = f"; did you mean {' or '.join(matches)}?" if matches else ""
    raise prepare.UnknownDatasetError(
        f"unknown TFDS dataset {name!r}: not in TFDS's catalog{hint} (offline recipes: "
        f"{', '.join(prepare.DATASETS)}; TFDS's list: "
        "https://www.tensorflow.org/datasets/catalog/overview)") from None


def prepare_catalog(name: str, *, data_dir: str | os.PathLike | None = None,
                    manual_dir: str | os.PathLike | None = None, try_gcs: bool = False,
                    force: bool = False, log: prepare.Log = print) -> prepare.Prepared:
  """Builds TFDS's `name` (NAME or NAME:VERSION) into `data_dir` with TFDS's own builder.

  Raises:
    prepare.UnknownDatasetError: not a TFDS dataset (exit 2).
    prepare.PrepareError: the files or the network it needs are missing; nothing was built.
  """
  # Before TFDS imports TensorFlow: no GPU/TPU for it.
  tf_runtime.import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = None if data_dir is None else str(storage.path(data_dir))
  builder = _builder(name, root)
  if not force and builder.is_prepared():
    prepared = prepare.summary(builder, built=False, source=None)
    log(f"{builder.name} {prepared.version} is already prepared in {prepared.data_dir}; "
        "nothing to do (--force rebuilds it).")
    return prepared

  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual_dir is not None:
    manual_dir = storage.path(manual_dir)
    if not manual_dir.is_dir():
      raise prepare.PrepareError(f"--manual-dir {manual_dir}: no such directory")
  elif instructions:
    raise prepare.PrepareError(
        f"TFDS cannot download {builder.name}: put the files it needs in a folder and pass it "
        f"as --manual-dir. TFDS says: {' '.join(instructions.split())}")
  # What TFDS will reach: GCS for try_gcs, else the dataset's registered URLs (none known:
  # TFDS fails at its first connection error, retries being off).
  hosts = [GCS_HOST] if try_gcs else prepare.download_hosts(builder.url_infos)
  if hosts and (manual_dir is None or try_gcs):
    why = prepare.unreachable(hosts)
    if why is not None:
      source = "TFDS's copy on GCS (--try-gcs)" if try_gcs else "its download"
      raise prepare.PrepareError(
          f"cannot prepare {builder.name}: {source} is impossible: {why}. Prepare it where "
          "the network is reachable (--data-dir gs://... or a folder you copy here)"
          + ("" if instructions else ", or give the downloaded files with --manual-dir"))
  output_paths.check_directory(builder.data_dir_root, "--data-dir" if data_dir is not None
                               else "the TFDS data directory ($TFDS_DATA_DIR; --data-dir)")

  tf_runtime.disable_tfds_download_retries()
  log(f"{builder.name}: building version {builder.version} with TFDS's download_and_prepare "
      f"into {builder.data_dir} ...")
  start = time.perf_counter()
  config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir),
      download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if force
                     else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS),
      try_download_gcs=try_gcs)
  try:
    builder.download_and_prepare(download_config=config)
  except OSError as error:  # requests' ConnectionError is one; so is a missing manual file.
    raise prepare.PrepareError(f"TFDS could not prepare {builder.name}: "
                               f"{str(error).splitlines()[0] if str(error) else error!r}") from None
  prepared = prepare.summary(builder, built=True, source=(
      "gcs" if try_gcs else str(manual_dir) if manual_dir is not None else "download"))
  log(f"{builder.name}: done in {time.perf_counter() - start:.0f} s: "
      f"{prepare.counts(prepared)} examples in {prepared.data_dir}")
  return prepared

"""Where training images come from: a prepared TFDS dataset or a folder of class folders.

A source fixes the *order* of its examples once and for all, so that an example has a global
id, `index`: its position in that order. Everything random downstream (the epoch's shuffle, the
host crops, the device's photometric draws) is a function of (run seed, epoch, index), which is
what makes a run independent of the number of processes and exactly resumable. Every example
read from a source is a dict of
  * `index`: int64, the example's position in the source's fixed order;
  * `label`: int64, the class id, -1 when the dataset has no labels;
  * `image`: the encoded bytes (JPEG, PNG, ...), so that the host ops decode them (and can
    decode only the crop); uint8 [H, W, C] for datasets that store decoded arrays.

The fixed orders:
  * image folder (torchvision's `ImageFolder` layout, root/<class>/**/<image>): classes are
    the sorted sub-folder names, labels their positions, and the examples come class by class,
    each class's files in `sorted(os.walk(...))` order: exactly torchvision's `samples` list,
    so ids and labels equal torchvision's indices and targets.
  * TFDS: the split's records file by file, in TFDS's file order (what
    `tfds.load(..., shuffle_files=False, read_config=ReadConfig(interleave_cycle_length=1))`
    gives). For a slice such as `train[10%:]` the ids are positions within the slice.

Opening a source never downloads anything and fails with a `DataSourceError` that names what
was looked for and what exists instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from retro_jax.data import prepare
from retro_jax.data.tf_runtime import import_tensorflow
from retro_jax.user_errors import UserError

tf = import_tensorflow()

# Formats the host ops decode (TF decodes no PPM/PGM/TIFF, which torchvision also lists).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# TFRecord read buffer per open file, as TFDS reads.
_READ_BUFFER_BYTES = 8 << 20
# Examples shown when a message lists what a folder holds instead.
_SHOWN = 5


class DataSourceError(UserError, ValueError):
  """The data cannot be read as configured; the message says what was expected and found."""


def _listing(names: Sequence[str], total: int | None = None) -> str:
  total = len(names) if total is None else total
  shown = ", ".join(names[:_SHOWN])
  return shown + (f", ... ({total} in all)" if total > _SHOWN else "")


# ------------------------------------------------------------------------------------------
# Image folders.


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSource:
  """An image folder in torchvision's `ImageFolder` layout.

  Attributes:
    root: the folder holding one sub-folder per class.
    classes: the class names; a label is a position in this tuple.
    paths: every image file, in id order.
    labels: int64 [num_examples], the label of each id.
  """

  root: pathlib.Path
  classes: tuple[str, ...]
  paths: tuple[str, ...]
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return len(self.paths)

  def __str__(self) -> str:
    return f"image folder {self.root}"

  def read(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
    """The example with id `index` (an int64 scalar), inside a tf.data map."""
    paths, labels = self._tensors()
    return {"index": index, "label": tf.gather(labels, index),
            "image": tf.io.read_file(tf.gather(paths, index))}

  def examples(self, start: int = 0, stop: int | None = None) -> tf.data.Dataset:
    """Examples `start` to `stop` (exclusive), in id order, undecoded."""
    stop = self.num_examples if stop is None else stop
    return tf.data.Dataset.range(start, stop).map(self.read)

  def _tensors(self) -> tuple[tf.Tensor, tf.Tensor]:
    # Built once (a million paths take about a second), eagerly even when first asked for
    # while a tf.data function is traced, so that every pipeline can capture them.
    if "_tensor_cache" not in self.__dict__:
      with tf.init_scope():
        tensors = tf.constant(self.paths), tf.constant(self.labels, tf.int64)
      object.__setattr__(self, "_tensor_cache", tensors)
    return self.__dict__["_tensor_cache"]


def _images_of_class(class_dir: str) -> list[str]:
  """torchvision's `make_dataset` walk: sorted directories, sorted file names, any depth."""
  found = []
  for directory, _, names in sorted(os.walk(class_dir, followlinks=True)):
    for name in sorted(names):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        found.append(os.path.join(directory, name))
  return found


def _missing_folder_message(root: pathlib.Path) -> str:
  parent = root.parent
  while not parent.is_dir() and parent != parent.parent:
    parent = parent.parent
  try:
    entries = sorted(entry.name for entry in os.scandir(parent))
  except OSError:
    entries = []
  holds = f"holds: {_listing(entries)}" if entries else "is empty"
  where = (f"{parent}" if parent == root.parent else
           f"neither does {root.parent}; the nearest existing folder, {parent},")
  return f"image folder {root} does not exist ({where} {holds})"


def open_folder(root: str | os.PathLike) -> FolderSource:
  """Lists an image folder the way torchvision's `ImageFolder` does.

  Hidden sub-folders count as classes, as in torchvision (a stray `.ipynb_checkpoints` then
  shows up as a class without images, which is refused).

  Raises:
    DataSourceError: the folder does not exist, has no class sub-folders, or a class folder
      holds no image with one of `IMAGE_EXTENSIONS` (torchvision refuses these too).
  """
  root = pathlib.Path(root).expanduser().absolute()
  if not root.exists():
    raise DataSourceError(_missing_folder_message(root))
  if not root.is_dir():
    raise DataSourceError(f"image folder {root} is a file, not a folder of class folders")
  entries = sorted(os.scandir(root), key=lambda entry: entry.name)
  classes = tuple(entry.name for entry in entries if entry.is_dir())
  layout = ("expected one sub-folder per class holding images "
            f"({' '.join(IMAGE_EXTENSIONS)}); a single sub-folder is enough for unlabeled "
            "images")
  if not entries:
    raise DataSourceError(f"image folder {root} is empty: {layout}")
  if not classes:
    files = [entry.name for entry in entries]
    raise DataSourceError(f"image folder {root} has no class sub-folders, only the files "
                          f"{_listing(files)}: {layout}")
  paths, labels, empty = [], [], []
  for label, name in enumerate(classes):
    found = _images_of_class(os.path.join(root, name))
    if not found:
      empty.append(name)
    paths += found
    labels += [label] * len(found)
  if empty:
    what = ("none of its class folders holds" if len(empty) == len(classes) else
            f"{len(empty)} of its {len(classes)} class folders hold")
    raise DataSourceError(
        f"image folder {root}: {what} an image ({' '.join(IMAGE_EXTENSIONS)}, any case); "
        f"empty classes: {_listing(empty)}. Remove those folders or add images.")
  return FolderSource(root=root, classes=classes, paths=tuple(paths),
                      labels=np.asarray(labels, np.int64))


# ------------------------------------------------------------------------------------------
# TFDS.


@dataclasses.dataclass(frozen=True)
class Span:
  """`take` consecutive records of one TFRecord file, after skipping `skip`; ids from `first_id`."""

  path: str
  skip: int
  take: int
  first_id: int


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """One split (or slice) of a prepared TFDS dataset, read from its TFRecord files.

  The files are read directly (rather than through `builder.as_dataset`) so that every record
  carries its id and the pipeline controls file order, sharding and skipping per epoch.

  Attributes:
    name: the TFDS dataset name.
    version: its prepared version.
    split: the split string, e.g. "train" or "train[:90%]".
    data_dir: the TFDS data directory it was found in.
    spans: the split's records in id order.
    features: the dataset's `FeaturesDict`, which parses a record.
    image_key: the image feature.
    label_key: the label feature, or None when there is none (labels are then -1).
  """

  name: str
  version: str
  split: str
  data_dir: str
  spans: tuple[Span, ...]
  features: Any
  image_key: str
  label_key: str | None

  @property
  def num_examples(self) -> int:
    return sum(span.take for span in self.spans)

  def __str__(self) -> str:
    return f"tfds:{self.name}:{self.version} split {self.split!r} in {self.data_dir}"

  def spans_between(self, start: int, stop: int) -> list[Span]:
    """The spans holding ids `start` to `stop` (exclusive), cut to that range."""
    cut = []
    for span in self.spans:
      lo, hi = max(start, span.first_id), min(stop, span.first_id + span.take)
      if lo < hi:
        cut.append(Span(span.path, span.skip + lo - span.first_id, hi - lo, lo))
    return cut

  def read_spans(self, spans: Sequence[Span], order: tf.Tensor | None = None,
                 cycle_length: int = 1) -> tf.data.Dataset:
    """(index, serialized record) pairs of `spans`, read in `order` (span positions).

    With `cycle_length` > 1, that many files are read at once, one record from each in
    turn, deterministically.
    """
    paths = tf.constant([span.path for span in spans])
    skips, takes, first_ids = (tf.constant([getattr(span, field) for span in spans], tf.int64)
                               for field in ("skip", "take", "first_id"))

    def read(i):
      records = tf.data.TFRecordDataset(paths[i], buffer_size=_READ_BUFFER_BYTES)
      records = records.skip(skips[i]).take(takes[i])
      ids = tf.data.Dataset.range(first_ids[i], first_ids[i] + takes[i])
      return tf.data.Dataset.zip(ids, records)

    order = tf.range(len(spans), dtype=tf.int64) if order is None else order
    cycle_length = max(1, min(cycle_length, len(spans)))
    parallel = {} if cycle_length == 1 else {"num_parallel_calls": tf.data.AUTOTUNE,
                                             "deterministic": True}
    return tf.data.Dataset.from_tensor_slices(order).interleave(
        read, cycle_length=cycle_length, block_length=1, **parallel)

  def parse(self, index: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
    """A serialized record as an example dict; images stay encoded (`SkipDecoding`)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    decoders = None
    if isinstance(self.features[self.image_key], tfds.features.Image):
      decoders = {self.image_key: tfds.decode.SkipDecoding()}
    example = self.features.deserialize_example(record, decoders=decoders)
    label = (tf.constant(-1, tf.int64) if self.label_key is None
             else tf.cast(example[self.label_key], tf.int64))
    return {"index": index, "label": label, "image": example[self.image_key]}

  def examples(self, start: int = 0, stop: int | None = None) -> tf.data.Dataset:
    """Examples `start` to `stop` (exclusive), in id order, images undecoded."""
    stop = self.num_examples if stop is None else stop
    return self.read_spans(self.spans_between(start, stop)).map(self.parse)


def _close_matches(name: str, candidates: Sequence[str]) -> str:
  matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
  return f"; did you mean {' or '.join(matches)}?" if matches else ""


def _prepared_datasets(root: str) -> list[str]:
  try:
    return sorted(entry.name for entry in os.scandir(root)
                  if entry.is_dir() and entry.name != "downloads")
  except OSError:
    return []


def _how_to_prepare(builder, root: str) -> str:
  name = builder.name
  if name in prepare.DATASETS:
    return (f"prepare it offline with: python -m retro_jax data prepare {name} "
            f"--data-dir {root}")
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if manual:
    return (f"TFDS cannot download {name}; it needs files downloaded by hand:\n"
            f"  {' '.join(manual.split())}\n"
            "Put them in a folder MANUAL_DIR and build it once with TFDS:\n"
            f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir='{root}').download_and_prepare(download_config="
            "tfds.download.DownloadConfig(manual_dir='MANUAL_DIR'))\"")
  return (f"build it where the internet is reachable with tfds.builder('{name}', "
          f"data_dir=DIR).download_and_prepare() and copy DIR/{name} into {root}")


def _builder(name: str, version: str | None, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  spec = name if version is None else f"{name}:{version}"
  try:
    return tfds.builder(spec, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    root = data_dir or tfds.core.constants.DATA_DIR
    catalog = tfds.list_builders(with_community_datasets=False)  # The rest lives on GCS.
    here = _prepared_datasets(root)
    if name in catalog or name in here:  # Known, but not at this version.
      versions = _prepared_datasets(os.path.join(root, name))
      raise DataSourceError(
          f"tfds:{name} has no version {version} in {root} (versions there: "
          f"{_listing(versions) or 'none'})") from None
    raise DataSourceError(
        f"unknown TFDS dataset {name!r}: neither in TFDS's catalog nor prepared in {root} "
        f"(which holds: {_listing(here) or 'nothing'})"
        f"{_close_matches(name, list(dict.fromkeys(catalog + here)))}"
        ) from None
  except AssertionError as error:  # A catalog dataset asked for at a version it lacks.
    root = data_dir or tfds.core.constants.DATA_DIR
    versions = _prepared_datasets(os.path.join(root, name))
    reason = str(error)
    reason = reason[max(reason.find(f"Dataset {name} "), 0):]  # Without the builder's kwargs.
    raise DataSourceError(f"tfds:{spec}: {reason} (versions prepared in {root}: "
                          f"{_listing(versions) or 'none'})") from None


def _data_root(builder) -> str:
  """The TFDS data directory holding `builder`'s <name>/[<config>/]<version> folder.

  (`builder.data_dir_root` is the version folder itself for datasets read from files.)
  """
  for parent in pathlib.Path(builder.data_dir).parents:
    if parent.name == builder.name:
      return os.fspath(parent.parent)
  return os.fspath(builder.data_dir_root)


def _pick_features(name: str, features) -> tuple[str, str | None]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  keys = list(features.keys())
  images = [k for k in keys if isinstance(features[k], tfds.features.Image)]
  image_key = "image" if "image" in keys else (images[0] if len(images) == 1 else None)
  if image_key is None:
    raise DataSourceError(f"tfds:{name} has no single image feature to train on; its "
                          f"features are: {', '.join(keys)}")
  label_key = "label" if "label" in keys else None
  return image_key, label_key


def open_tfds(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
              version: str | None = None) -> TfdsSource:
  """Opens a split of a TFDS dataset that is already prepared in `data_dir`.

  Args:
    name: the TFDS name, e.g. "fashion_mnist", "imagenet2012".
    split: a TFDS split string: "train", "train[:90%]", "train[1000:]", "train+test".
    data_dir: the TFDS data directory; None means TFDS's default ($TFDS_DATA_DIR, else
      ~/tensorflow_datasets).
    version: e.g. "3.0.1"; None means the builder's default version.

  Raises:
    DataSourceError: unknown name or version, dataset not prepared there (the message says
      how to prepare it; nothing is downloaded), unknown or malformed split, or a file format
      other than TFRecord.
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = _builder(name, version, data_dir)
  root = _data_root(builder)
  if not builder.is_prepared():
    versions = _prepared_datasets(os.path.join(root, name))
    found = f"versions prepared there: {', '.join(versions)}" if versions else (
        f"{root} holds: {_listing(_prepared_datasets(root)) or 'nothing'}")
    raise DataSourceError(
        f"tfds:{name}:{builder.version} is not prepared in {root} (looked for "
        f"{builder.data_dir}; {found}); {_how_to_prepare(builder, root)}")
  info = builder.info
  try:
    split_info = info.splits[split]
  except (KeyError, ValueError) as error:
    available = ", ".join(f"{s} ({i.num_examples:,} examples)" for s, i in info.splits.items())
    raise DataSourceError(f"split {split!r} of tfds:{name}:{builder.version} cannot be read "
                          f"({error}); available splits: {available}") from None
  if str(info.file_format.value) != "tfrecord":
    raise DataSourceError(f"tfds:{name} is stored as {info.file_format.value}; only TFRecord "
                          "datasets can be read")
  spans, first_id = [], 0
  for instruction in split_info.file_instructions:
    spans.append(Span(os.fspath(instruction.filename), instruction.skip, instruction.take,
                      first_id))
    first_id += instruction.take
  image_key, label_key = _pick_features(name, info.features)
  return TfdsSource(name=name, version=str(builder.version), split=split, data_dir=root,
                    spans=tuple(spans), features=info.features, image_key=image_key,
                    label_key=label_key)


# ------------------------------------------------------------------------------------------
# Selection by config.

Source = FolderSource | TfdsSource


def open_source(dataset: str, split: str | None = None,
                data_dir: str | os.PathLike | None = None) -> Source:
  """The source a config names.

  Args:
    dataset: "tfds:NAME" or "tfds:NAME:VERSION" (a TFDS dataset prepared in `data_dir`), or
      "folder:PATH" (an image folder).
    split: TFDS: the split string (default "train"). Folder: None reads PATH itself; a name
      reads PATH/<split> (the layout root/train/<class>/..., root/val/<class>/...).
    data_dir: TFDS data directory (TFDS sources only).

  Raises:
    DataSourceError: see `open_tfds` and `open_folder`.
  """
  kind, _, rest = dataset.partition(":")
  if kind == "tfds" and rest:
    name, _, version = rest.partition(":")
    return open_tfds(name, "train" if split is None else split, data_dir, version or None)
  if kind == "folder" and rest:
    if data_dir is not None:
      raise DataSourceError(f"data_dir={os.fspath(data_dir)!r} is for TFDS datasets; an image "
                            "folder is named by its path: folder:PATH")
    root = pathlib.Path(rest)
    if split is None:
      return open_folder(root)
    if not (root / split).is_dir() and root.is_dir():
      subfolders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
      raise DataSourceError(
          f"image folder {root} has no split folder {split!r} (its sub-folders: "
          f"{_listing(subfolders) or 'none'}); with split=None, {root} itself is read with "
          "its sub-folders as classes")
    return open_folder(root / split)
  raise DataSourceError(
      f"dataset must be 'tfds:NAME[:VERSION]' or 'folder:PATH', got {dataset!r}")

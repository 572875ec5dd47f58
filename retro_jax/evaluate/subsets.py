"""Labelled subsets for semi-supervised evaluation: class-balanced fractions, SimCLR split files.

Semi-supervised evaluation (retro.md section 4.2) is the linear probe (or fine-tuning) trained
on a small labelled part of the training split and tested on the whole test split.

`balanced_subset(labels, fraction, seed)` picks, in each class c of n_c examples,
round(fraction * n_c) examples (at least 1): a stratified sample, which for a dataset with
equal classes (Fashion-MNIST, CIFAR: 6,000 / 5,000 each) is exactly class-balanced and for
ImageNet (732 to 1,300 per class) keeps its class proportions, as SimCLR's 1 % and 10 % files
do (12,811 and 128,116 images). `per_class=k` takes exactly k of every class instead. Each
class's examples are ranked once by a permutation drawn from (seed, class), independent of
the fraction, and the first ones are taken: the same seed gives the same subset, and for one
seed the subsets are nested (the 1 % subset lies inside the 10 % one), so a fraction sweep
only adds labels.

`read_split_file(path)` reads SimCLR's `1percent.txt` / `10percent.txt` (one ImageNet file
name per line, e.g. `n01440764_10026.JPEG`), and `indices_of_files(names, file_names)` maps
them to example ids with the source's file names (`source_file_names`: an image folder's file
names, or the `file_name` feature of a TFDS dataset such as `imagenet2012`).

`subset_source(source, ids, workdir)` turns a subset into a source the training pipeline reads
(fine-tuning on it): an image folder keeps only those files; a TFDS split's chosen records are
copied once into one TFRecord file in `workdir` (reading the split once; 1 % of ImageNet is
~1.4 GB), since reading scattered records out of TFDS's files would re-read them.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from retro_jax import storage
from retro_jax.data import sources
from retro_jax.user_errors import UserError

FRACTIONS = (0.01, 0.1)  # SimCLR's 1 % and 10 % ImageNet label subsets


class SubsetError(UserError, ValueError):
  """A subset that cannot be drawn or read (bad fraction, unknown file names, no file names)."""


def balanced_subset(labels: Sequence[int] | np.ndarray, fraction: float | None = None, *,
                    per_class: int | None = None, seed: int = 0) -> np.ndarray:
  """Sorted int64 ids of a class-stratified subset (see the module docstring).

  Args:
    labels: the class of each example (int, >= 0).
    fraction: in (0, 1]: round(fraction * n_c) examples of each class c, at least 1.
    per_class: instead of `fraction`: exactly this many of each class.
    seed: the subset's seed.

  Raises:
    SubsetError: both or neither of fraction / per_class, a value out of range, negative
      labels, or a class with fewer than `per_class` examples.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise SubsetError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
  if labels.size and labels.min() < 0:
    raise SubsetError("labels must be >= 0 (an unlabelled dataset has no balanced subset)")
  if (fraction is None) == (per_class is None):
    raise SubsetError("give exactly one of fraction and per_class")
  if fraction is not None and not 0.0 < fraction <= 1.0:
    raise SubsetError(f"fraction must lie in (0, 1], got {fraction}")
  if per_class is not None and (isinstance(per_class, bool) or per_class < 1):
    raise SubsetError(f"per_class must be a positive int, got {per_class!r}")
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if per_class is not None:
      if per_class > len(members):
        raise SubsetError(f"class {c} has {len(members)} examples, fewer than "
                          f"per_class={per_class}")
      count = per_class
    else:
      count = max(1, int(round(fraction * len(members))))
    ranking = np.random.default_rng([seed, int(c)]).permutation(len(members))
    chosen.append(members[ranking[:count]])
  return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def read_split_file(path: str | os.PathLike) -> list[str]:
  """The file names of a SimCLR split file (one per line; blank lines ignored)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise SubsetError(f"no split file at {path} (SimCLR's imagenet_subsets/1percent.txt or "
                      "10percent.txt)")
  names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not names:
    raise SubsetError(f"split file {path} lists no file names")
  if len(set(names)) != len(names):
    raise SubsetError(f"split file {path} lists some file names twice")
  return names


def indices_of_files(names: Sequence[str], file_names: Sequence[str]) -> np.ndarray:
  """Sorted ids of the examples whose file name (base name, any folder) is in `names`.

  Raises:
    SubsetError: a name matches no example, or several examples share a listed name.
  """
  position: dict[str, int] = {}
  wanted = set(names)
  for i, name in enumerate(file_names):
    base = os.path.basename(name)
    if base in wanted:
      if base in position:
        raise SubsetError(f"file name {base} belongs to examples {position[base]} and {i}")
      position[base] = i
  missing = [name for name in names if name not in position]
  if missing:
    raise SubsetError(f"{len(missing)} of the {len(names)} listed files are not in the "
                      f"split, e.g. {', '.join(missing[:3])}")
  return np.sort(np.asarray([position[name] for name in names], np.int64))


def _records(source: sources.TfdsSource):
  return source.read_spans(source.spans)


def source_file_names(source: sources.Source) -> list[str]:
  """Every example's file name, in id order.

  Raises:
    SubsetError: a TFDS dataset without a `file_name` feature.
  """
  if isinstance(source, sources.FolderSource):
    return [os.path.basename(path) for path in source.paths]
  if "file_name" not in source.features.keys():
    raise SubsetError(f"{source} has no 'file_name' feature (it has: "
                      f"{', '.join(source.features.keys())}), so a split file of image "
                      "names cannot be matched to its examples; use a label fraction")
  spec = {"file_name": sources.tf.io.FixedLenFeature([], sources.tf.string)}
  names = _records(source).map(
      lambda _, record: sources.tf.io.parse_single_example(record, spec)["file_name"])
  return [name.decode() for name in names.as_numpy_iterator()]


def source_labels(source: sources.Source) -> np.ndarray:
  """int64 [N]: every example's label, in id order (TFDS: one pass, images not decoded)."""
  if isinstance(source, sources.FolderSource):
    return np.asarray(source.labels, np.int64)
  if source.label_key is None:
    raise SubsetError(f"{source} has no labels")
  key = source.label_key
  spec = {key: sources.tf.io.FixedLenFeature([], sources.tf.int64)}
  labels = _records(source).map(lambda _, record: sources.tf.io.parse_single_example(
      record, spec)[key]).batch(65536)
  return np.concatenate(list(labels.as_numpy_iterator())).astype(np.int64)


def subset_source(source: sources.Source, ids: Sequence[int] | np.ndarray,
                  workdir: str | os.PathLike) -> sources.Source:
  """A source holding only examples `ids` (ids become 0..k-1, in the same order).

  TFDS records are copied once into WORKDIR/subset-<hash>.tfrecord (kept and reused).
  """
  ids = np.asarray(ids, np.int64)
  if not ids.size:
    raise SubsetError("the subset is empty")
  if np.any(np.diff(ids) <= 0) or ids[0] < 0 or ids[-1] >= source.num_examples:
    raise SubsetError(f"subset ids must be increasing and lie in [0, {source.num_examples})")
  if isinstance(source, sources.FolderSource):
    return dataclasses.replace(source, paths=tuple(source.paths[i] for i in ids),
                               labels=np.asarray(source.labels)[ids])
  import hashlib  # pylint: disable=g-import-not-at-top
  tf = sources.tf
  digest = hashlib.sha256(repr((str(source), ids.tobytes())).encode()).hexdigest()[:16]
  # TensorFlow writes and reads it, gs:// included (storage.path keeps the URI).
  path = storage.path(workdir) / f"subset-{digest}.tfrecord"
  if not path.is_file():
    path.parent.mkdir(parents=True, exist_ok=True)
    chosen = np.zeros(source.num_examples, bool)
    chosen[ids] = True
    keep = tf.constant(chosen)
    records = _records(source).filter(lambda i, _: tf.gather(keep, i)).map(
        lambda _, record: record)
    temporary = path.with_suffix(".tmp")
    with tf.io.TFRecordWriter(str(temporary)) as writer:
      for record in records.as_numpy_iterator():
        writer.write(record)
    temporary.replace(path)
  return dataclasses.replace(
      source, split=f"{source.split} ({len(ids)} examples, {path.name})",
      spans=(sources.Span(str(path), 0, len(ids), 0),))

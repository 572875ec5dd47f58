"""Class-balanced label subsets and SimCLR split files."""

from __future__ import annotations

import numpy as np
import pytest

from retro_jax.data import sources
from retro_jax.evaluate import subsets


def test_balanced_fractions_exact_counts_deterministic_and_nested():
  labels = np.repeat(np.arange(10), 600)
  np.random.default_rng(0).shuffle(labels)
  one = subsets.balanced_subset(labels, 0.01, seed=0)
  ten = subsets.balanced_subset(labels, 0.1, seed=0)
  assert np.array_equal(np.bincount(labels[one]), [6] * 10)
  assert np.array_equal(np.bincount(labels[ten]), [60] * 10)
  assert np.array_equal(one, subsets.balanced_subset(labels, 0.01, seed=0))
  assert not np.array_equal(one, subsets.balanced_subset(labels, 0.01, seed=1))
  assert set(one) <= set(ten)  # nested for one seed
  assert np.all(np.diff(one) > 0)


def test_unequal_classes_are_stratified_and_per_class_exact():
  labels = np.concatenate([np.zeros(1300, int), np.ones(732, int), np.full(3, 2)])
  ids = subsets.balanced_subset(labels, 0.01)
  assert np.array_equal(np.bincount(labels[ids]), [13, 7, 1])  # at least one per class
  ids = subsets.balanced_subset(labels, per_class=3, seed=7)
  assert np.array_equal(np.bincount(labels[ids]), [3, 3, 3])
  with pytest.raises(subsets.SubsetError, match="fewer than"):
    subsets.balanced_subset(labels, per_class=4)
  with pytest.raises(subsets.SubsetError, match="exactly one"):
    subsets.balanced_subset(labels)
  with pytest.raises(subsets.SubsetError, match="fraction"):
    subsets.balanced_subset(labels, 1.5)


def test_split_files(tmp_path):
  path = tmp_path / "1percent.txt"
  path.write_text("n01_3.JPEG\nn02_1.JPEG\n\n")
  names = subsets.read_split_file(path)
  files = ["train/n01/n01_1.JPEG", "train/n01/n01_3.JPEG", "train/n02/n02_1.JPEG"]
  assert list(subsets.indices_of_files(names, files)) == [1, 2]
  with pytest.raises(subsets.SubsetError, match="not in the split"):
    subsets.indices_of_files(["n03_9.JPEG"], files)
  with pytest.raises(subsets.SubsetError, match="no split file"):
    subsets.read_split_file(tmp_path / "missing.txt")


def test_folder_and_tfds_subsets(tmp_path, fashion_mnist_tfds):
  for name in ("a", "b"):
    (tmp_path / "images" / name).mkdir(parents=True)
    for i in range(3):
      (tmp_path / "images" / name / f"{name}{i}.png").write_bytes(b"")
  folder = sources.open_folder(tmp_path / "images")
  assert subsets.source_file_names(folder) == ["a0.png", "a1.png", "a2.png", "b0.png",
                                               "b1.png", "b2.png"]
  small = subsets.subset_source(folder, [1, 4], tmp_path)
  assert small.paths == (folder.paths[1], folder.paths[4]) and list(small.labels) == [0, 1]

  source = sources.open_source("tfds:fashion_mnist", "train[:500]", fashion_mnist_tfds)
  labels = subsets.source_labels(source)
  assert labels.shape == (500,)
  ids = subsets.balanced_subset(labels, per_class=5)
  subset = subsets.subset_source(source, ids, tmp_path / "work")
  assert subset.num_examples == 50
  assert np.array_equal(subsets.source_labels(subset), labels[ids])
  with pytest.raises(subsets.SubsetError, match="no 'file_name' feature"):
    subsets.source_file_names(source)

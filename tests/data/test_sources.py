"""Dataset sources: ids, labels and bytes against torchvision's ImageFolder and TFDS's own reader.

References: `torchvision.datasets.ImageFolder` / `DatasetFolder` (class ids, sample order) on
the same folder; TFDS's `as_dataset` in file order (`interleave_cycle_length=1`) for the fixed
order of a split; the files themselves for the bytes. Every error a user can meet is checked
for what its message names. TFDS datasets are built in the test; the real Fashion-MNIST tests
build it from Debian's files first (10-20 s on 2 cores) and are marked slow.
"""

from __future__ import annotations

import io
import os
import pathlib
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torchvision
from PIL import Image

import sample_data
from retro_jax.data import host_ops
from retro_jax.data import pipeline
from retro_jax.data import sources
from retro_jax.data.sources import DataSourceError


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir holding `tiny_images` (train 48, test 20 examples, 3 files each)."""
  return sample_data.build_tiny_tfds(tmp_path_factory.mktemp("tfds"))


def tfds_file_order(data_dir: pathlib.Path, split: str) -> list[dict]:
  """The split as TFDS reads it, files one after the other: the sources' fixed order."""
  builder = tfds.builder("tiny_images", data_dir=str(data_dir))
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               decoders={"image": tfds.decode.SkipDecoding()},
                               read_config=tfds.ReadConfig(interleave_cycle_length=1))
  return list(tfds.as_numpy(dataset))


# ------------------------------------------------------------------------------------------
# Image folders.


def test_folder_ids_and_labels_are_torchvision_image_folders(tmp_path):
  root = sample_data.make_image_folder(tmp_path / "images",
                                       {"dog": 4, "Cat": 3, "bird": 5, "ant_eater": 2})
  # Deeper folders count, other files do not, and the extension's case does not matter.
  (root / "dog" / "more").mkdir()
  (root / "dog" / "more" / "deep.PNG").write_bytes(
      sample_data.encoded_image(np.random.default_rng(1), ".png"))
  (root / "dog" / "notes.txt").write_text("not an image")
  (root / "README.md").write_text("a file beside the class folders is ignored")

  source = sources.open_source(f"folder:{root}")
  reference = torchvision.datasets.ImageFolder(str(root))
  assert list(source.classes) == reference.classes == ["Cat", "ant_eater", "bird", "dog"]
  assert list(zip(source.paths, source.labels.tolist())) == reference.samples
  assert source.num_examples == len(reference) == 15
  assert str(root / "dog" / "more" / "deep.PNG") in source.paths


def test_folder_with_every_extension_matches_dataset_folder(tmp_path):
  extensions = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".GIF", ".Jpg")
  root = sample_data.make_image_folder(tmp_path, {"b": 8, "a": 9}, extensions=extensions)
  source = sources.open_folder(root)
  reference = torchvision.datasets.DatasetFolder(
      str(root), loader=Image.open, extensions=sources.IMAGE_EXTENSIONS)
  assert list(zip(source.paths, source.labels.tolist())) == reference.samples
  assert source.num_examples == 17


def test_folder_examples_are_the_files_bytes_with_ids_and_labels(tmp_path):
  root = sample_data.make_image_folder(tmp_path, {"x": 3, "y": 4})
  source = sources.open_folder(root)
  examples = list(source.examples(2, 6).as_numpy_iterator())
  assert [e["index"] for e in examples] == [2, 3, 4, 5]
  assert [e["label"] for e in examples] == [0, 1, 1, 1]
  for example in examples:
    assert example["image"] == pathlib.Path(source.paths[example["index"]]).read_bytes()


def test_split_names_a_sub_folder(tmp_path):
  sample_data.make_image_folder(tmp_path / "train", {"a": 2, "b": 1})
  sample_data.make_image_folder(tmp_path / "val", {"a": 1, "b": 1})
  assert sources.open_source(f"folder:{tmp_path}", split="val").num_examples == 2
  with pytest.raises(DataSourceError) as error:
    sources.open_source(f"folder:{tmp_path}", split="validation")
  assert (f"image folder {tmp_path} has no split folder 'validation' (its sub-folders: "
          "train, val)") in str(error.value)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only files", "no images",
                                  "one class empty"])
def test_folder_errors_say_what_was_expected_and_found(tmp_path, case):
  root = tmp_path / "images"
  rng = np.random.default_rng(0)
  if case == "file":
    root.write_bytes(b"")
  elif case == "empty":
    root.mkdir()
  elif case == "only files":
    root.mkdir()
    for i in range(7):
      (root / f"{i}.png").write_bytes(sample_data.encoded_image(rng))
  elif case == "no images":
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "dog" / "labels.csv").write_text("")
  elif case == "one class empty":
    sample_data.make_image_folder(root, {"cat": 2, "dog": 2})
    (root / ".ipynb_checkpoints").mkdir()
  else:
    (tmp_path / "other").mkdir()
    with pytest.raises(DataSourceError, match=f"image folder {root}/train does not exist "
                       f"\\(neither does {root}; the nearest existing folder, {tmp_path}, "
                       "holds: other\\)"):
      sources.open_source(f"folder:{root}/train")

  with pytest.raises(DataSourceError) as error:
    sources.open_source(f"folder:{root}")
  message = str(error.value)
  expected = {
      "missing": f"image folder {root} does not exist ({tmp_path} holds: other)",
      "file": f"image folder {root} is a file, not a folder of class folders",
      "empty": f"image folder {root} is empty: expected one sub-folder per class",
      "only files": f"image folder {root} has no class sub-folders, only the files 0.png, "
                    "1.png, 2.png, 3.png, 4.png, ... (7 in all)",
      "no images": f"image folder {root}: none of its class folders holds an image (.jpg "
                   ".jpeg .png .bmp .gif .webp, any case); empty classes: cat, dog",
      "one class empty": f"image folder {root}: 1 of its 3 class folders hold an image",
  }[case]
  assert expected in message, message
  if case == "one class empty":
    assert "empty classes: .ipynb_checkpoints" in message


def test_unknown_dataset_kind_lists_the_accepted_forms(tmp_path):
  for dataset in ("imagenet2012", "hf:cifar10", "folder:"):
    with pytest.raises(DataSourceError, match="dataset must be 'tfds:NAME\\[:VERSION\\]' or "
                       "'folder:PATH'"):
      sources.open_source(dataset)
  with pytest.raises(DataSourceError, match="data_dir='.*' is for TFDS datasets"):
    sources.open_source(f"folder:{tmp_path}", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# TFDS.


@pytest.mark.parametrize("split", ["train", "test", "train[10:30]", "train[75%:]",
                                   "test+train[:5]"])
def test_tfds_ids_are_positions_in_the_splits_file_order(tiny_tfds, split):
  source = sources.open_source("tfds:tiny_images", split=split, data_dir=tiny_tfds)
  reference = tfds_file_order(tiny_tfds, split)
  examples = list(source.examples().as_numpy_iterator())
  assert source.num_examples == len(reference) == len(examples)
  assert [e["index"] for e in examples] == list(range(len(reference)))
  assert [e["label"] for e in examples] == [r["label"] for r in reference]
  # The images stay encoded: the PNG bytes as stored.
  assert [e["image"] for e in examples] == [r["image"] for r in reference]
  assert all(e["image"].startswith(b"\x89PNG") for e in examples)


def test_tfds_slices_of_a_split_read_ranges_of_its_ids(tiny_tfds):
  whole = sources.open_tfds("tiny_images", "train", tiny_tfds)
  assert len(whole.spans) == 3
  numbers = [r["number"] for r in tfds_file_order(tiny_tfds, "train")]
  part = whole.examples(10, 30)
  assert [e["index"] for e in part.as_numpy_iterator()] == list(range(10, 30))
  sliced = tfds_file_order(tiny_tfds, "train[10:30]")
  assert [r["number"] for r in sliced] == numbers[10:30]
  assert str(whole) == (f"tfds:tiny_images:1.0.0 split 'train' in {tiny_tfds}")


def test_tfds_version_can_be_named(tiny_tfds):
  assert sources.open_source("tfds:tiny_images:1.0.0", data_dir=tiny_tfds).version == "1.0.0"
  with pytest.raises(DataSourceError) as error:
    sources.open_source("tfds:tiny_images:2.0.0", data_dir=tiny_tfds)
  assert f"tfds:tiny_images has no version 2.0.0 in {tiny_tfds} (versions there: 1.0.0)" in (
      str(error.value))
  with pytest.raises(DataSourceError) as error:
    sources.open_source("tfds:fashion_mnist:9.9.9", data_dir=tiny_tfds)
  assert str(error.value) == ("tfds:fashion_mnist:9.9.9: Dataset fashion_mnist cannot be "
                              "loaded at version 9.9.9, only: 3.0.1. (versions prepared in "
                              f"{tiny_tfds}: none)")


def test_unknown_tfds_name_suggests_close_ones(tiny_tfds):
  with pytest.raises(DataSourceError) as error:
    sources.open_source("tfds:fashion_mnst", data_dir=tiny_tfds)
  assert (f"unknown TFDS dataset 'fashion_mnst': neither in TFDS's catalog nor prepared in "
          f"{tiny_tfds} (which holds: tiny_images); did you mean fashion_mnist") in (
              str(error.value))
  with pytest.raises(DataSourceError, match="did you mean tiny_images"):
    sources.open_source("tfds:tiny_image", data_dir=tiny_tfds)


@pytest.mark.parametrize("name", ["fashion_mnist", "imagenet2012", "mnist"])
def test_unprepared_dataset_says_how_to_prepare_it_without_downloading(name, tfds_data_dir,
                                                                        monkeypatch):
  lookups = []

  def no_network(host, *args, **kwargs):
    lookups.append(host)
    raise OSError(f"test: no look-up of {host}")

  monkeypatch.setattr("socket.getaddrinfo", no_network)
  start = time.perf_counter()
  with pytest.raises(DataSourceError) as error:
    sources.open_source(f"tfds:{name}", data_dir=tfds_data_dir)
  assert time.perf_counter() - start < 10
  assert lookups == []
  message = str(error.value)
  version = tfds.builder(name, data_dir=str(tfds_data_dir)).version
  assert (f"tfds:{name}:{version} is not prepared in {tfds_data_dir} (looked for "
          f"{tfds_data_dir / name / str(version)}; {tfds_data_dir} holds: nothing)") in message
  how = {
      "fashion_mnist": "prepare it offline with: python -m retro_jax data prepare "
                       f"fashion_mnist --data-dir {tfds_data_dir}",
      "imagenet2012": "TFDS cannot download imagenet2012; it needs files downloaded by hand:"
                      "\n  manual_dir should contain two files: ILSVRC2012_img_train.tar and",
      "mnist": "build it where the internet is reachable with tfds.builder('mnist', "
               f"data_dir=DIR).download_and_prepare() and copy DIR/mnist into {tfds_data_dir}",
  }[name]
  assert how in message, message
  if name == "imagenet2012":
    assert "DownloadConfig(manual_dir='MANUAL_DIR')" in message
  assert not any(tfds_data_dir.iterdir())


def test_unknown_split_lists_the_available_ones(tiny_tfds):
  for split, why in [("validation", "Unknown split 'validation'"),
                     ("train[:200%]", "Error parsing split 'train[:200%]'")]:
    with pytest.raises(DataSourceError) as error:
      sources.open_source("tfds:tiny_images", split=split, data_dir=tiny_tfds)
    message = str(error.value)
    assert f"split {split!r} of tfds:tiny_images:1.0.0 cannot be read ({why}" in message
    assert message.endswith("available splits: train (48 examples), test (20 examples)") or (
        message.endswith("available splits: test (20 examples), train (48 examples)"))


# ------------------------------------------------------------------------------------------
# The real Fashion-MNIST, prepared offline.


@pytest.mark.slow
def test_prepared_fashion_mnist_reads_with_ids_and_png_bytes(fashion_mnist_tfds):
  train = sources.open_source("tfds:fashion_mnist", split="train", data_dir=fashion_mnist_tfds)
  test = sources.open_source("tfds:fashion_mnist", split="test", data_dir=fashion_mnist_tfds)
  assert (train.num_examples, test.num_examples) == (60_000, 10_000)
  assert (train.image_key, train.label_key) == ("image", "label")
  builder = tfds.builder("fashion_mnist", data_dir=str(fashion_mnist_tfds))
  reference = tfds.as_numpy(builder.as_dataset(
      split="test", shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1)))
  for example, expected in zip(test.examples(0, 100).as_numpy_iterator(), reference):
    assert example["label"] == expected["label"]
    pixels = np.asarray(Image.open(io.BytesIO(example["image"])))
    np.testing.assert_array_equal(pixels, expected["image"][..., 0])
  last = list(test.examples(9_998).as_numpy_iterator())
  assert [e["index"] for e in last] == [9_998, 9_999]
  assert os.fspath(fashion_mnist_tfds) in str(train)


@pytest.mark.slow
def test_fashion_mnist_feeds_the_pipeline_for_any_process_count(fashion_mnist_tfds):
  test = sources.open_source("tfds:fashion_mnist", split="test", data_dir=fashion_mnist_tfds)
  labels = {int(e["index"]): e["label"] for e in test.examples().as_numpy_iterator()}
  spec = [host_ops.CropSpec(32, (0.2, 1.0))] * 2

  def batches(process_index, process_count):
    it = pipeline.host_batches(
        test, lambda image, seed: host_ops.multi_crop(image, seed, spec),
        global_batch_size=64, seed=0, process_index=process_index,
        process_count=process_count, process_invariant=True, start_step=155)
    return [next(it) for _ in range(3)]  # 156 steps per epoch: crosses into epoch 1.

  whole = batches(0, 1)
  halves = list(zip(batches(0, 2), batches(1, 2)))
  for batch, (first, second) in zip(whole, halves):
    np.testing.assert_array_equal(batch["index"], np.concatenate([first["index"],
                                                                  second["index"]]))
    np.testing.assert_array_equal(batch["views"][1], np.concatenate([first["views"][1],
                                                                     second["views"][1]]))
    assert list(batch["label"]) == [labels[int(i)] for i in batch["index"]]
    assert batch["views"][0].shape == (64, 32, 32, 3)

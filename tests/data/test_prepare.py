"""`python -m retro_jax.data prepare fashion_mnist`: TFDS's own builder fed with Debian's files.

References: TFDS's registry of the upstream downloads (size, SHA-256), the catalog builder's
`DatasetInfo`, and the IDX files themselves, decoded here from the format's definition (magic
number, big-endian dimensions, then the bytes). The build takes about a minute, so it runs
once per module, through the CLI in a subprocess.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from retro_jax.data import cli
from retro_jax.data import fashion_mnist
from retro_jax.data import prepare

IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
HOW_TO_GET = ("apt-get install dataset-fashion-mnist", "--source-dir")


def read_idx(path: pathlib.Path) -> np.ndarray:
  """An IDX file of unsigned bytes: 0x0000, type 0x08, rank, big-endian uint32 sizes, data."""
  data = gzip.decompress(path.read_bytes())
  assert data[:3] == b"\x00\x00\x08", f"{path} is not an IDX file of unsigned bytes"
  rank = data[3]
  shape = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(shape)


def sorted_rows(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """(image, label) pairs as byte rows in lexicographic order: the dataset as a multiset."""
  rows = np.concatenate([images.reshape(len(images), -1),
                         labels.astype(np.uint8).reshape(-1, 1)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        timeout=600, check=False, env=env)


@pytest.fixture
def count_lookups(monkeypatch) -> list[str]:
  """Records every host name resolved (the harness still refuses all but loopback)."""
  hosts = []
  blocked = socket.getaddrinfo

  def counting(host, *args, **kwargs):
    hosts.append(host)
    return blocked(host, *args, **kwargs)

  monkeypatch.setattr(socket, "getaddrinfo", counting)
  return hosts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, fashion_mnist_dir) -> tuple[pathlib.Path, str]:
  """Fashion-MNIST built by `python -m retro_jax.data prepare` into TFDS's default data dir.

  The default is $TFDS_DATA_DIR, set for the subprocess only: no --data-dir on the command.
  Returns the data dir and what the command printed.
  """
  data_dir = tmp_path_factory.mktemp("tensorflow_datasets")
  result = run_cli("retro_jax.data", "prepare", "fashion_mnist", "--source-dir",
                   str(fashion_mnist_dir), env={**os.environ, "TFDS_DATA_DIR": str(data_dir)})
  assert result.returncode == 0, result.stderr[-3000:]
  return data_dir, result.stdout


def test_debian_files_with_restored_headers_are_the_upstream_downloads(fashion_mnist_dir):
  registered = tfds.builder("fashion_mnist").url_infos
  assert sorted(info.filename for info in registered.values()) == sorted(
      fashion_mnist.UPSTREAM_GZIP_MTIME)
  for info in registered.values():
    debian = (fashion_mnist_dir / info.filename).read_bytes()
    # The premise: Debian's bytes are not the registered ones, their content is.
    assert hashlib.sha256(debian).hexdigest() != info.checksum
    restored = fashion_mnist.restore_upstream_header(info.filename, debian)
    assert len(restored) == info.size
    assert hashlib.sha256(restored).hexdigest() == info.checksum
    assert gzip.decompress(restored) == gzip.decompress(debian)
    # Only Debian's header-stripped layout is rewritten: the upstream file is left alone.
    assert fashion_mnist.restore_upstream_header(info.filename, restored) is None


def test_unknown_dataset_is_a_usage_error_naming_the_known_ones(capsys):
  assert cli.main(["prepare", "imagenet20012"]) == 2
  error = capsys.readouterr().err
  assert "'imagenet20012'" in error
  assert ", ".join(prepare.DATASETS) in error
  assert cli.main(["list"]) == 0
  assert "fashion_mnist" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["missing default folder", "--download"])
def test_no_files_and_no_network_fails_at_once(how, tmp_path, tfds_data_dir, monkeypatch,
                                               count_lookups, capsys):
  monkeypatch.setattr(fashion_mnist, "RECIPE", dataclasses.replace(
      fashion_mnist.RECIPE, default_source_dir=tmp_path / "no-such-folder"))
  args = ["prepare", "fashion_mnist", "--data-dir", str(tfds_data_dir)]
  start = time.perf_counter()
  status = cli.main(args + (["--download"] if how == "--download" else []))
  elapsed = time.perf_counter() - start
  error = capsys.readouterr().err
  assert status == 1
  assert elapsed < 10, f"took {elapsed:.1f} s"
  assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com:80 is unreachable" in error
  assert all(hint in error for hint in HOW_TO_GET), error
  assert "Traceback" not in error
  # One look-up of the download host, then nothing: no TFDS download attempt, no retries.
  assert count_lookups == ["fashion-mnist.s3-website.eu-central-1.amazonaws.com"]
  assert not any(tfds_data_dir.iterdir())


def test_explicit_source_dir_without_files_never_touches_the_network(tmp_path, tfds_data_dir,
                                                                     count_lookups, capsys):
  status = cli.main(["prepare", "fashion_mnist", "--data-dir", str(tfds_data_dir),
                     "--source-dir", str(tmp_path)])
  error = capsys.readouterr().err
  assert status == 1
  assert f"Fashion-MNIST files not found in {tmp_path}: t10k-images-idx3-ubyte.gz" in error
  assert all(hint in error for hint in HOW_TO_GET), error
  assert count_lookups == []
  assert not any(tfds_data_dir.iterdir())


def test_corrupt_source_file_is_refused_before_anything_is_built(tmp_path, tfds_data_dir,
                                                                 fashion_mnist_dir, capsys):
  source = tmp_path / "source"
  shutil.copytree(fashion_mnist_dir, source)
  labels = source / "train-labels-idx1-ubyte.gz"
  data = bytearray(labels.read_bytes())
  data[1000] ^= 0xFF
  labels.write_bytes(bytes(data))
  status = cli.main(["prepare", "fashion_mnist", "--data-dir", str(tfds_data_dir),
                     "--source-dir", str(source)])
  error = capsys.readouterr().err
  assert status == 1
  assert f"{labels} is not the Fashion-MNIST file TFDS registers" in error
  assert hashlib.sha256(bytes(data)).hexdigest() in error
  assert not any(tfds_data_dir.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_prepared_examples_equal_the_idx_files(prepared, fashion_mnist_dir, split):
  data_dir, _ = prepared
  dataset = tfds.as_numpy(tfds.load("fashion_mnist", split=split, data_dir=str(data_dir),
                                    download=False, batch_size=-1))
  images, labels = (read_idx(fashion_mnist_dir / name) for name in IDX_FILES[split])
  assert dataset["image"].shape == (len(images), 28, 28, 1) == (
      {"train": 60_000, "test": 10_000}[split], 28, 28, 1)
  assert dataset["image"].dtype == np.uint8
  # TFDS stores examples in an order shuffled by key; the multisets must be equal.
  np.testing.assert_array_equal(sorted_rows(dataset["image"][..., 0], dataset["label"]),
                                sorted_rows(images, labels))


@pytest.mark.slow
def test_prepared_dataset_is_the_catalog_builders(prepared, tfds_data_dir):
  data_dir, _ = prepared
  catalog = tfds.builder("fashion_mnist", data_dir=str(tfds_data_dir))  # Definition only.
  built = tfds.builder_from_directory(str(data_dir / "fashion_mnist" / str(catalog.version)))
  assert built.version == catalog.version
  assert built.info.features.to_json() == catalog.info.features.to_json()
  assert built.info.supervised_keys == catalog.info.supervised_keys
  assert built.info.module_name == catalog.info.module_name
  assert {s: i.num_examples for s, i in built.info.splits.items()} == {"train": 60_000,
                                                                       "test": 10_000}
  # What TFDS recorded as downloaded is the registered upstream files, byte for byte.
  assert built.info.download_size == sum(i.size for i in catalog.url_infos.values())


@pytest.mark.slow
def test_cli_reports_progress_and_where_the_data_went(prepared):
  data_dir, stdout = prepared
  assert stdout.count("Debian's copy, upstream gzip header restored; SHA-256 equals TFDS's "
                      "registered") == 4
  assert f"train 60,000, test 10,000 examples in {data_dir}/fashion_mnist/3.0.1" in stdout
  assert "tfds.load('fashion_mnist', download=False)" in stdout


@pytest.mark.slow
def test_second_prepare_through_the_front_door_is_a_quick_no_op(prepared):
  data_dir, _ = prepared
  records = sorted((data_dir / "fashion_mnist").glob("*/*.tfrecord*"))
  before = [path.stat().st_mtime_ns for path in records]
  start = time.perf_counter()
  result = run_cli("retro_jax", "data", "prepare", "fashion_mnist", "--data-dir", str(data_dir))
  elapsed = time.perf_counter() - start
  assert result.returncode == 0, result.stderr
  assert "fashion_mnist 3.0.1 is already prepared" in result.stdout
  assert "train 60,000, test 10,000" in result.stdout
  assert elapsed < 20, f"took {elapsed:.1f} s"
  assert [path.stat().st_mtime_ns for path in records] == before
  assert len(records) == 2

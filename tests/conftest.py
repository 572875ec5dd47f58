"""Test harness shared by every test module.

What it guarantees, in this order (the order matters: importing TensorFlow imports JAX, so the
XLA flags must be in the environment before either is imported anywhere):
  1. JAX runs on 8 simulated CPU devices (override the platform with RETRO_JAX_TEST_PLATFORM).
  2. TensorFlow sees no GPU/TPU: it is only the host-side input pipeline.
  3. No network: connections to anything but loopback fail at once, and TFDS makes one
     download attempt instead of retrying for ~200 s.
  4. One persistent XLA compilation cache for the whole test run (and every subprocess and
     pytest-xdist worker it starts): a step that several tests, modules or CLI runs compile
     alike is compiled once. A fresh folder per run, removed at the end, unless
     JAX_COMPILATION_CACHE_DIR names one.
  5. Fixtures: `workdir` (a fresh training directory), `tfds_data_dir` (an empty TFDS data
     directory), `fashion_mnist_dir` (the real Fashion-MNIST IDX files from Debian's
     `dataset-fashion-mnist`).
Tests slower than ~30 s on a 2-core CPU carry `@pytest.mark.slow`; `pytest -m "not slow"` is the
quick subset for development, CI runs everything.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
import shutil
import socket
import tempfile

NUM_SIMULATED_DEVICES = 8


def _force_simulated_cpu_devices() -> None:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={NUM_SIMULATED_DEVICES}")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  os.environ["JAX_PLATFORMS"] = os.environ.get("RETRO_JAX_TEST_PLATFORM", "cpu")
  # Subprocesses started by tests (CLI runs) inherit the same settings.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Every compile is written to the cache, the eager ops' too: each parameter shape's random
# initialiser compiles for 0.3-1.4 s on this CPU, and building EfficientNet-B0 took 12.9 s with
# a cold cache against 2.7 s with this one warm (separate processes, 2026-12-07).
_CACHE_MIN_COMPILE_SECONDS = "0"
_own_cache_dir: str | None = None


def _share_compilation_cache() -> None:
  """Points JAX (here, in xdist workers and in subprocesses) at one cache for the run.

  The environment is read by JAX when it is first imported; xdist workers and CLI subprocesses
  inherit it, so they all share the folder this process creates.
  """
  global _own_cache_dir
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _own_cache_dir = tempfile.mkdtemp(prefix="retro_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _own_cache_dir
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", _CACHE_MIN_COMPILE_SECONDS)


_force_simulated_cpu_devices()
_share_compilation_cache()

# Only now may JAX or TensorFlow be imported.
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from retro_jax.data import tf_runtime  # noqa: E402


class NetworkAccessInTest(OSError):
  """Raised when a test tries to reach a host other than this machine."""


_real_getaddrinfo = socket.getaddrinfo
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def _is_loopback(host) -> bool:
  if host is None:
    return True
  if isinstance(host, bytes):
    host = host.decode()
  if host in _LOOPBACK_NAMES:
    return True
  try:
    return ipaddress.ip_address(host.split("%")[0]).is_loopback
  except ValueError:
    return False


def _loopback_only_getaddrinfo(host, *args, **kwargs):
  if not _is_loopback(host):
    raise NetworkAccessInTest(
        f"test tried to resolve {host!r}: tests run offline (loopback only); "
        "build the data or weights locally instead")
  return _real_getaddrinfo(host, *args, **kwargs)


def _import_triton_before_tensorflow() -> None:
  # torch's CUDA wheels bring triton, which torch._dynamo (hence torchvision.ops) imports;
  # loading triton *after* TensorFlow segfaults the process (seen with TF 2.21, triton of
  # torch 2.14.1). Loaded first, both work. CPU wheels of torch have no triton.
  try:
    import triton  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass


def pytest_configure(config):
  del config
  socket.getaddrinfo = _loopback_only_getaddrinfo
  _import_triton_before_tensorflow()
  tf_runtime.import_tensorflow()
  tf_runtime.disable_tfds_download_retries()


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable order otherwise).

  With parallel workers (scripts/test.sh runs pytest-xdist, handing out one test at a time)
  the long tests are spread over the workers from the start and the short ones fill in
  around them, instead of one long test ending the run alone.
  """
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  del config
  socket.getaddrinfo = _real_getaddrinfo
  if _own_cache_dir is not None:
    shutil.rmtree(_own_cache_dir, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: pathlib.Path) -> pathlib.Path:
  """A fresh, empty working directory for one training or evaluation run."""
  path = tmp_path / "workdir"
  path.mkdir()
  return path


@pytest.fixture
def tfds_data_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  """An empty TFDS data directory private to the test."""
  path = tmp_path / "tensorflow_datasets"
  path.mkdir()
  return path


FASHION_MNIST_DIR = pathlib.Path(
    os.environ.get("RETRO_JAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> pathlib.Path:
  """The real Fashion-MNIST IDX files (Debian package `dataset-fashion-mnist`).

  Missing files are an error, not a skip: CI installs the package, and a test that silently
  skipped would hide that the data path is broken.
  """
  missing = [name for name in FASHION_MNIST_FILES if not (FASHION_MNIST_DIR / name).is_file()]
  if missing:
    pytest.fail(
        f"Fashion-MNIST IDX files missing from {FASHION_MNIST_DIR}: {', '.join(missing)}. "
        "Install them with `apt-get install dataset-fashion-mnist` (scripts/test.sh does this "
        "when run as root) or point RETRO_JAX_FASHION_MNIST_DIR at a folder holding them.",
        pytrace=False)
  return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def fashion_mnist_tfds(tmp_path_factory, fashion_mnist_dir) -> pathlib.Path:
  """A TFDS data dir holding Fashion-MNIST prepared offline (once per test session, ~10 s)."""
  from retro_jax.data import prepare  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp("fashion_mnist_tfds")
  prepare.prepare("fashion_mnist", data_dir=data_dir, source_dir=fashion_mnist_dir,
                  log=lambda message: None)
  return data_dir


@pytest.fixture(scope="session")
def photos() -> np.ndarray:
  """Six 40x48 uint8 RGB crops of scikit-learn's sample photos (sky, foliage, petals, edges,
  saturated and grey pixels), for the data tests."""
  import sklearn.datasets  # pylint: disable=import-outside-toplevel  (only the data tests need it)
  china, flower = sklearn.datasets.load_sample_images().images
  corners = [(china, 0, 0), (china, 200, 150), (china, 300, 500), (flower, 0, 0),
             (flower, 150, 250), (flower, 350, 400)]
  return np.stack([img[y:y + 40, x:x + 48] for img, y, x in corners])

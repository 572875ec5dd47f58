"""What `pip install retro_jax` promises: its dependency bounds, no torch at run time, and a
wheel that carries the configs (`--config effb0:smoke` from any directory)."""

from __future__ import annotations

import os
import pathlib
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest

from packaging.requirements import Requirement
from packaging.version import Version

import retro_jax


def requirements() -> list[Requirement]:
  return [Requirement(line) for line in metadata.requires("retro_jax")]


def runtime_requirements() -> dict[str, Requirement]:
  return {r.name.lower(): r for r in requirements()
          if r.marker is None or "extra" not in str(r.marker)}


def test_runtime_dependencies_are_declared():
  names = set(runtime_requirements())
  for name in ("jax", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets",
               "ml-collections", "absl-py", "numpy", "pillow", "tensorboard", "matplotlib",
               "importlib-resources"):
    assert name in names or name.replace("-", "_") in names, name
  assert {"tensorflow-cpu", "tensorflow"} & names


def test_lower_bounds_exclude_removed_jax_and_flax_apis():
  runtime = runtime_requirements()
  # jax 0.10 removed device_put_sharded/replicated; flax 0.12 requires nnx.Optimizer(wrt=).
  assert not runtime["jax"].specifier.contains(Version("0.9.2"))
  assert runtime["jax"].specifier.contains(Version("0.10.0"))
  assert not runtime["flax"].specifier.contains(Version("0.11.2"))
  assert runtime["flax"].specifier.contains(Version("0.12.0"))


def test_torch_is_only_a_test_dependency():
  for requirement in requirements():
    if requirement.name in ("torch", "torchvision"):
      assert requirement.marker is not None and "test" in str(requirement.marker)
      # Pinned: an open range lets pip pull a multi-GB CUDA build of a newer torch.
      assert str(requirement.specifier).startswith("==")
  assert "torch" not in runtime_requirements()


def test_every_module_imports_without_torch():
  modules = [m.name for m in pkgutil.walk_packages(retro_jax.__path__, "retro_jax.")]
  assert "retro_jax.cli" in modules
  script = f"""
import importlib, importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('torch', 'torchvision', 'timm'):
      raise ImportError('torch is not available at run time: ' + name)
sys.meta_path.insert(0, NoTorch())
for name in {modules!r}:
  importlib.import_module(name)
assert not any(m.split('.')[0] == 'torch' for m in sys.modules)
print('imported', len({modules!r}))
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"imported {len(modules)}" in result.stdout


REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
  """The wheel built from this tree (pip, no isolation: offline) and installed into a --target
  folder; its dependencies are the test environment's. (wheel, target folder)."""
  root = tmp_path_factory.mktemp("wheel")
  source = root / "source"  # A copy: the build's build/ and .egg-info stay out of the tree.
  skip = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("retro_jax", "configs"):
    shutil.copytree(REPO / name, source / name, ignore=skip)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist",
                  source], check=True, timeout=120, capture_output=True)
  (wheel,) = (root / "dist").glob("retro_jax-*.whl")
  target = root / "site"
  subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True,
                 timeout=120, capture_output=True)
  return wheel, target


def _run_installed(target, *args, cwd):
  """`python ARGS` in `cwd` with the installed wheel first on the path (before the checkout's
  editable install)."""
  env = {**os.environ, "PYTHONPATH": str(target)}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_the_wheel_has_every_package_and_config(installed_wheel):
  wheel, _ = installed_wheel
  names = set(zipfile.ZipFile(wheel).namelist())
  # pyproject.toml lists the packages: a new subpackage missing from the list is caught here.
  for init in (REPO / "retro_jax").rglob("__init__.py"):
    assert init.relative_to(REPO).as_posix() in names, init
  for config in (REPO / "configs").iterdir():
    assert f"retro_jax/configs/{config.name}" in names, config.name
  assert not any(name.startswith("configs/") for name in names)  # no top-level package


def test_installed_config_loads_by_name_outside_the_repository(installed_wheel, tmp_path):
  _, target = installed_wheel
  (tmp_path / "a_file").write_text("in the way\n")
  # The config is read (its :smoke variant), then the workdir check refuses the file: no JAX
  # work, and the message proves which package answered.
  result = _run_installed(target, "-m", "retro_jax.main", "--config", "effb0:smoke",
                          "--workdir", "a_file", cwd=tmp_path)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "--workdir a_file is a file, not a directory" in result.stderr
  script = ("import retro_jax, retro_jax.config_names as c; print(retro_jax.__file__); "
            "print(c.config_directory()); print(c.resolve('effb0:smoke'))")
  where = _run_installed(target, "-c", script, cwd=tmp_path).stdout.splitlines()
  assert where == [str(target / "retro_jax" / "__init__.py"), str(target / "retro_jax/configs"),
                   str(target / "retro_jax/configs/effb0.py") + ":smoke"]


def test_installed_unknown_config_name_lists_the_names(installed_wheel, tmp_path):
  _, target = installed_wheel
  result = _run_installed(target, "-m", "retro_jax.main", "--config", "effb1",
                          "--workdir", "run", cwd=tmp_path)
  assert result.returncode == 2
  first = result.stderr.splitlines()[0]
  assert first.startswith("python -m retro_jax.main: error: --config effb1: no config named "
                          f"'effb1' in {target / 'retro_jax/configs'}; choose one of: ")
  assert "effb0, finetune, " in first and "quickstart" in first
  assert not (tmp_path / "run").exists()

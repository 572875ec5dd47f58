"""What `pip install retro_jax` promises: its dependency bounds, and no torch at run time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from importlib import metadata

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

"""Prints what this installation runs on: library versions, JAX devices, settings.

Prints the versions of the libraries that decide numerics and behaviour, the JAX backend and
devices, and the environment variables that change them: the first thing to attach to a bug
report or to a benchmark table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata

from retro_jax import user_errors

# Distribution names, in the order they matter to a run.
_PACKAGES = ("retro_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
             "tensorflow-cpu", "tensorflow", "tensorflow-datasets", "ml-collections",
             "absl-py", "torch", "torchvision")
_ENVIRONMENT = ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES", "TPU_VISIBLE_CHIPS",
                "TFDS_DATA_DIR")


def package_versions() -> dict[str, str | None]:
  """Installed version of each relevant distribution, None where it is not installed."""
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def device_summary() -> dict[str, object]:
  """JAX's view of the hardware (imports JAX, which starts the backend)."""
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.devices()
  return {
      "backend": jax.default_backend(),
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "local_device_count": jax.local_device_count(),
      "device_count": jax.device_count(),
      "device_kinds": sorted({d.device_kind for d in devices}),
  }


def backbone_table() -> list[dict[str, object]]:
  """Every registered backbone with its feature width and parameter count (shapes only)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from retro_jax.models import registry  # pylint: disable=g-import-not-at-top

  rows = []
  for name in registry.backbone_names():
    model = nnx.eval_shape(lambda name=name: registry.create_backbone(name, rngs=nnx.Rngs(0)))
    params = sum(v.get_value().size for _, v in nnx.iter_graph(model)
                 if isinstance(v, nnx.Param))
    rows.append({"name": name, "feature_width": int(model.feature_width),
                 "parameters": int(params)})
  return rows


def collect() -> dict[str, object]:
  return {
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "packages": package_versions(),
      "jax": device_summary(),
      "environment": {k: os.environ[k] for k in _ENVIRONMENT if k in os.environ},
  }


def _format(report: dict[str, object]) -> str:
  lines = [f"python      {report['python']}", f"platform    {report['platform']}",
           f"cpu cores   {report['cpu_count']}", "packages"]
  for name, version in report["packages"].items():
    lines.append(f"  {name:<21} {version or '(not installed)'}")
  lines.append("jax")
  for key, value in report["jax"].items():
    lines.append(f"  {key:<21} {', '.join(value) if isinstance(value, list) else value}")
  if "backbones" in report:
    lines.append("backbones (feature width, parameters)")
    for row in report["backbones"]:
      lines.append(f"  {row['name']:<21} {row['feature_width']:>5}  {row['parameters']:>11,}")
  lines.append("environment")
  for key, value in report["environment"].items() or [("(none of "
                                                       + ", ".join(_ENVIRONMENT) + ")", "")]:
    lines.append(f"  {key} {value}".rstrip())
  return "\n".join(lines)


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.info") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", action="store_true", help="print one JSON object instead")
  parser.add_argument("--models", action="store_true",
                      help="also list the registered backbones (feature width, parameters)")
  user_errors.add_debug_flag(parser)
  args = parser.parse_args(argv)
  report = collect()
  if args.models:
    report["backbones"] = backbone_table()
  print(json.dumps(report, indent=2) if args.json else _format(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())

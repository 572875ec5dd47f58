"""`--config NAME[:VARIANT]`: the recipes of configs/ by name, in a checkout or after `pip install`.

The top-level configs/ directory is the one copy of the recipes. The wheel ships it as the
package data retro_jax/configs (pyproject.toml maps it), so after `pip install retro_jax`
`--config effb0:smoke` works from any directory; in a checkout the same name finds
configs/effb0.py next to the package. A `--config` value that is an existing file is used as
it is (`--config configs/effb0.py` keeps working); a bare name (no directory, no .py) is looked
up; an unknown name is a usage error listing the names there are. No JAX here: main's usage
errors stay instant.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import retro_jax
from retro_jax.user_errors import UsageError


def config_directory() -> pathlib.Path | None:
  """Where the named configs are: retro_jax/configs (installed), else the checkout's configs/."""
  package = pathlib.Path(retro_jax.__file__).resolve().parent
  if (package / "configs").is_dir():
    return package / "configs"
  # A checkout (or an editable install): configs/ beside the package, under pyproject.toml.
  # The pyproject.toml guard keeps a site-packages/configs of another package out.
  root = package.parent
  if (root / "configs").is_dir() and (root / "pyproject.toml").is_file():
    return root / "configs"
  return None


def available() -> list[str]:
  """The config names `--config` accepts (the .py files of `config_directory()`)."""
  directory = config_directory()
  if directory is None:
    return []
  return sorted(p.stem for p in directory.glob("*.py") if not p.name.startswith("_"))


def _is_name(value: str) -> bool:
  return value != "" and "/" not in value and "\\" not in value and not value.endswith(".py")


def resolve(value: str) -> str:
  """`value` (PATH[:VARIANT] or NAME[:VARIANT]) as a config file path with its variant.

  Raises:
    UsageError: `value` is a name (not an existing file) that no config has.
  """
  path, colon, variant = value.partition(":")
  if pathlib.Path(path).exists() or not _is_name(path):
    return value  # A path: config_flag_errors explains a missing file or a directory.
  names = available()
  if path not in names:
    where = f" in {config_directory()}" if names else " (no configs directory was found)"
    raise UsageError(f"--config {value}: no config named {path!r}{where}; "
                     f"choose one of: {', '.join(names) or 'none'}, or give a config file path")
  return str(config_directory() / f"{path}.py") + colon + variant


def resolve_argv(argv: Sequence[str]) -> list[str]:
  """`argv` with its `--config NAME[:VARIANT]` (either spelling) replaced by the file's path."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = resolve(argv[i + 1])
      break
    if arg.startswith("--config="):
      argv[i] = "--config=" + resolve(arg.split("=", 1)[1])
      break
  return argv

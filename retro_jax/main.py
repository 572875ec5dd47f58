"""`python -m retro_jax.main --config configs/NAME.py[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]`

Trains (or resumes) the run a config file describes. The config is an ml_collections file
whose `get_config(variant)` returns a locked ConfigDict, so a misspelt `--config.key` is an
error; values derived from it (steps, schedules, scaled learning rate) are computed by the
trainer from the final, overridden config. The resolved config is printed and written to
WORKDIR/config.json. Restarting the same command continues from the last checkpoint.

Exit status: 0 done, 1 the run cannot start or failed on its input (message on stderr),
2 usage error.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

USAGE = ("usage: {prog} --config configs/NAME.py[:VARIANT] --workdir DIR "
         "[--config.KEY=VALUE ...]")


def _flag_values(argv: list[str]) -> flags.FlagValues:
  """Our flags; `argv` (program name first) is where config_flags finds the overrides."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "the config file (and :variant)",
                                  flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "where checkpoints, logs and the student go",
                      flag_values=values)
  return values


def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.main") -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE.format(prog=prog) + "\n\n" + __doc__.split("\n\n", 1)[1],
          file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  values = _flag_values([prog] + argv)
  try:
    values([prog] + argv)
  except (flags.Error, FileNotFoundError, AttributeError, TypeError, ValueError) as error:
    print(f"{prog}: {error}\n{USAGE.format(prog=prog)}", file=sys.stderr)
    return 2
  if values.config is None or values.workdir is None:
    print(f"{prog}: --config and --workdir are required\n{USAGE.format(prog=prog)}",
          file=sys.stderr)
    return 2
  config, workdir = values.config, pathlib.Path(values.workdir)

  # Imported here so that --help and usage errors stay instant.
  from retro_jax.checkpoint import ModelDirectoryError, TrainCheckpointError  # pylint: disable=g-import-not-at-top
  from retro_jax.data.sources import DataSourceError  # pylint: disable=g-import-not-at-top
  from retro_jax.train import loop  # pylint: disable=g-import-not-at-top

  resolved = config.to_json_best_effort(indent=2, sort_keys=True)
  print(f"config ({values['config'].config_filename}):\n{resolved}", flush=True)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(resolved + "\n")
  try:
    final = loop.train(config, workdir)
  except (loop.ConfigError, DataSourceError, ModelDirectoryError, TrainCheckpointError,
          ValueError) as error:
    print(f"{prog}: {error}", file=sys.stderr)
    return 1
  print("final: " + json.dumps({k: round(v, 5) for k, v in final.items()}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""`python -m retro_jax.main --config NAME[:VARIANT] --workdir DIR [--config.KEY=VALUE ...]`

NAME is one of the recipes in configs/ (shipped inside the package: `--config effb0:smoke`
works after `pip install`, from any directory); a config file path (`configs/effb0.py`, or
your own) works too. WORKDIR may be local or a cloud path (`gs://bucket/runs/x`).

Trains (or resumes) the run a config file describes (`config.task`: 'pretrain', the default,
'finetune', configs/finetune.py, or 'study', a teacher and students compared over seeds:
configs/quickstart.py and configs/study_fashion_mnist.py). The config is an ml_collections file
whose `get_config(variant)` returns a locked ConfigDict, so a misspelt `--config.key` is an
error; values derived from it (steps, schedules, scaled learning rate) are computed by the
trainer from the final, overridden config. The resolved config is printed and, once every
check has passed, written to WORKDIR/config.json. Restarting the same command continues from
the last checkpoint that can be read; a resume whose training-relevant config differs from the
checkpoint's is refused, naming the keys, unless --allow_config_change is given (the changes
are then appended to WORKDIR/config_changes.jsonl with the step they take effect from).

Several hosts: run the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or let JAX detect them on Cloud TPU / SLURM); each process
reads its share of the data, and the batch is split over all devices of all processes. The
workdir must be storage all hosts share (gs://... or a shared filesystem): a run whose
processes see different newest checkpoints refuses to start.

Exit status: 0 done, 1 the run cannot start or failed on its input (message on stderr),
2 usage error. --debug (or RETRO_JAX_DEBUG=1) shows the traceback of an error instead of one
line.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from retro_jax import config_flag_errors
from retro_jax import config_names
from retro_jax import output_paths
from retro_jax import user_errors

USAGE = ("usage: {prog} --config NAME[:VARIANT] | PATH.py[:VARIANT] --workdir DIR "
         "[--config.KEY=VALUE ...] [--allow_config_change] [--debug]")


def _flag_values(argv: list[str]) -> flags.FlagValues:
  """Our flags; `argv` (program name first) is where config_flags finds the overrides."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "the config file (and :variant)",
                                  flag_values=values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "where checkpoints, logs and the student go",
                      flag_values=values)
  flags.DEFINE_boolean("debug", False, user_errors.DEBUG_HELP, flag_values=values)
  flags.DEFINE_boolean("allow_config_change", False,
                       "resume although training-relevant config values changed (recorded in "
                       "WORKDIR/config_changes.jsonl); without it such a resume is refused",
                       flag_values=values)
  flags.DEFINE_alias("allow-config-change", "allow_config_change", flag_values=values)
  # Several hosts: every process runs the same command with its own --process_id. Without
  # them JAX's own cluster detection decides (Cloud TPU, SLURM, Open MPI: distributed.py).
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs)",
                      flag_values=values)
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-host runs)",
                       flag_values=values)
  flags.DEFINE_integer("process_id", None, "this process's index (multi-host runs)",
                       flag_values=values)
  return values


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.main") -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(USAGE.format(prog=prog) + "\n\n" + __doc__.split("\n\n", 1)[1],
          file=sys.stdout if argv else sys.stderr)
    return 0 if argv else 2
  # Before anything touches a JAX backend, the config file's loading included.
  from retro_jax import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(argv)
  except distributed.DistributedError as error:
    print(f"{prog}: error: could not join the multi-process run: {error}", file=sys.stderr)
    return 1
  usage = USAGE.format(prog=prog)
  try:  # --config effb0:smoke -> .../configs/effb0.py:smoke
    argv = config_names.resolve_argv(argv)
  except user_errors.UsageError as error:
    raise user_errors.UsageError(f"{error}\n{usage}") from None
  if (missing := config_flag_errors.check_config_file(argv)) is not None:
    raise user_errors.UsageError(f"{missing}\n{usage}")
  values = _flag_values([prog] + argv)
  try:
    values([prog] + argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    raise user_errors.UsageError(f"{config_flag_errors.explain(error, argv)}\n{usage}") from None
  if values.config is None or values.workdir is None:
    raise user_errors.UsageError(f"--config and --workdir are required\n{usage}")
  config = values.config
  # A workdir that is a file or read-only fails now, not after the model is built; a cloud
  # one (gs://...) stays a URI.
  workdir = output_paths.check_directory(values.workdir, "--workdir")

  # Imported here so that --help and usage errors stay instant.
  from retro_jax.checkpoint import ModelDirectoryError, TrainCheckpointError  # pylint: disable=g-import-not-at-top
  from retro_jax.data.sources import DataSourceError  # pylint: disable=g-import-not-at-top
  from retro_jax.train import loop  # pylint: disable=g-import-not-at-top

  task = config.get("task", "pretrain")
  if task == "finetune":  # configs/finetune.py: fine-tuning or the augmented linear protocol
    from retro_jax.evaluate import finetune  # pylint: disable=g-import-not-at-top
    run = finetune.run
  elif task == "study":  # configs/quickstart.py, configs/study_*.py: teacher, students, table
    from retro_jax import study  # pylint: disable=g-import-not-at-top
    run = study.run
  elif task == "pretrain":
    run = loop.train
  else:
    print(f"{prog}: error: config.task must be 'pretrain', 'finetune' or 'study', got {task!r}",
          file=sys.stderr)
    return 1

  # The run writes WORKDIR/config.json itself, once its checks have passed (run_record).
  from retro_jax.train import run_record  # pylint: disable=g-import-not-at-top
  print(f"config ({values['config'].config_filename}):\n{run_record.config_text(config)}",
        flush=True)
  from retro_jax.train.stop_request import TrainingStopped  # pylint: disable=g-import-not-at-top
  try:
    final = run(config, workdir, allow_config_change=values.allow_config_change)
  except TrainingStopped as stopped:  # SIGTERM (exit 0) or Ctrl-C (130), after a save
    print(f"{prog}: {stopped}", file=sys.stderr, flush=True)
    return stopped.exit_status
  except (loop.ConfigError, DataSourceError, ModelDirectoryError, TrainCheckpointError,
          ValueError) as error:  # ValueError includes study.StudyError
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 1
  print("final: " + json.dumps({k: round(v, 5) for k, v in final.items()}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

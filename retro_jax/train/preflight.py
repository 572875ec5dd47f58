"""The checks of a training config that need no model: run before anything is built or compiled.

`loop.train` calls `check` as soon as it knows the run's length (the data source gives the
steps per epoch), so a NaN learning rate, a negative step count, a zero checkpoint interval or
a misspelt monitor split fails in a second, naming the config key, instead of after the teacher
is loaded and the student is built.
"""

from __future__ import annotations

import math

import ml_collections

from retro_jax.data import sources
from retro_jax.train import optim
from retro_jax.user_errors import UserError


class PreflightError(UserError, ValueError):
  """A config value that cannot work, named by its key."""


def _positive_int(config: ml_collections.ConfigDict, key: str, what: str) -> None:
  value = config.get(key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise PreflightError(f"{key}: must be a positive number of {what}, got {value!r}")


def check(config: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int) -> None:
  """Refuses the run's length, intervals, optimizer and monitor splits if they cannot work.

  Raises:
    PreflightError: the first bad value, with its config key.
  """
  if total_steps < 1:
    length = (f"total_steps={config.get('total_steps')!r}" if config.get("total_steps") else
              f"epochs={config.get('epochs')!r} ({steps_per_epoch} steps per epoch)")
    raise PreflightError(f"{length} gives {total_steps} training steps; set total_steps > 0 "
                         "(or epochs > 0 with total_steps 0)")
  for key, what in (("log_every_steps", "steps"), ("checkpoint_every_steps", "steps"),
                    ("keep_checkpoints", "checkpoints")):
    _positive_int(config, key, what)
  minutes = config.get("checkpoint_every_minutes", 0)
  if (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
      or not math.isfinite(minutes) or minutes < 0):
    raise PreflightError(f"checkpoint_every_minutes: must be a number of minutes >= 0 (0: off), "
                         f"got {minutes!r}")
  try:  # The whole optimizer, schedules included: pure Python, no model needed.
    optim.build_optimizer(config.optimizer, steps_per_epoch=steps_per_epoch,
                          total_steps=total_steps, global_batch_size=config.global_batch_size)
  except ValueError as error:
    raise PreflightError(str(error)) from None
  _check_monitor(config)


def _check_monitor(config: ml_collections.ConfigDict) -> None:
  monitor = config.get("monitor")
  if not monitor or not monitor.get("every_steps"):
    return
  if monitor.every_steps < 0:
    raise PreflightError(f"monitor.every_steps: must be >= 0 (0: off), got "
                         f"{monitor.every_steps!r}")
  data_dir = config.data.get("data_dir") or None
  for key in ("bank_split", "test_split"):
    try:
      sources.open_source(config.data.dataset, monitor.get(key) or None, data_dir)
    except sources.DataSourceError as error:
      raise PreflightError(f"monitor.{key}: {error}") from None

"""Time-based checkpoints, config `checkpoint_every_minutes` (0: off).

Beside the step grid (`checkpoint_every_steps`), a save comes once that many minutes have
passed since the last save of this run (a grid, timed, final or signal save alike), or, before
the first one, since this run's first step finished (its compilation does not count). A
checkpoint is due when either says so. On a preemptible VM with slow steps this bounds the
work a hard kill loses (SIGTERM already saves at once: retro_jax/train/stop_request.py).

The clock is each process's own monotonic clock (`time.monotonic`: wall time that no clock
adjustment moves back), read once per checked step. Several processes must save the same step
together (an Orbax save is collective), so process 0's clock decides and
`multihost_utils.broadcast_one_to_all` hands its decision to every process; that one collective
is paid only every `check_every` steps (the loop uses its log steps, where the host waits for
the step's metrics anyway), so a timed save comes at the first such step after the interval.
One process asks its clock after every step, without any collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


def _process_zero_decides(flag: bool) -> bool:
  """Process 0's `flag` on every process (one small collective)."""
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


class SaveTimer:
  """Says at which steps `minutes` have passed since the last save (`due`, then `saved`).

  Args:
    minutes: the interval; 0 turns the timer off (`due` is always False, no clock is read).
    check_every: the steps whose `due` reads the clock (step % check_every == 0); the others
      answer False at no cost.
    clock: seconds from an arbitrary origin (tests pass a fake one).
    agree: turns this process's answer into the one every process acts on; default: itself
      in a single process, process 0's answer (`_process_zero_decides`) in several.
  """

  def __init__(self, minutes: float, *, check_every: int = 1,
               clock: Callable[[], float] = time.monotonic,
               agree: Callable[[bool], bool] | None = None):
    if minutes < 0 or check_every < 1:
      raise ValueError(f"minutes must be >= 0 and check_every >= 1, got {minutes} and "
                       f"{check_every}")
    self.seconds = 60.0 * minutes
    self.check_every = check_every
    self._clock = clock
    if agree is None:
      agree = _process_zero_decides if jax.process_count() > 1 else bool
    self._agree = agree
    self._since: float | None = None  # the last save, or the first check
    self._read: tuple[int, float] | None = None  # (step, time) of the last clock reading

  @property
  def enabled(self) -> bool:
    return self.seconds > 0

  def due(self, step: int) -> bool:
    """Whether a timed save is due after `step` (the same answer on every process); call it
    once per step, before `saved`."""
    if not self.enabled or step % self.check_every:
      return False
    now = self._clock()
    self._read = (step, now)
    if self._since is None:  # the first check starts the interval
      self._since = now
    return self._agree(now - self._since >= self.seconds)

  def saved(self, step: int) -> None:
    """Restarts the interval: a checkpoint of `step` was started (timed or not)."""
    if not self.enabled:
      return
    self._since = self._read[1] if self._read and self._read[0] == step else self._clock()

"""SIGTERM and SIGINT during training: finish the step, save it, then stop.

A scheduler's SIGTERM (a preempted cloud VM, `kill`, a cluster's time limit) or Ctrl-C must not
lose the steps since the last periodic checkpoint. Inside `StopRequest` the first SIGTERM or
SIGINT only records the request; the training loop asks `requested` after every step, saves
that step, waits for the save to be on disk, and raises `TrainingStopped`. The CLI then exits
with status 0 after SIGTERM (the run stopped cleanly and resumes with the same command) and
130 after SIGINT (the shell's status for Ctrl-C). A second signal, while the save runs, aborts at
once with the signal's default action, as if no handler were installed.

Several processes (jax.distributed): the processes must save the same step together, so no
process-local handler is installed; the loop asks JAX's preemption sync point instead
(`multihost_utils.reached_preemption_sync_point`, reached on every process at the same step
after any of them got SIGTERM). The drills in tests/reliability cover one process only.

Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread)
`StopRequest` installs nothing and never reports a request.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# What a shell reports for a process ended by a signal: 128 + its number (130 for SIGINT).
EXIT_STATUS = {signal.SIGTERM: 0, signal.SIGINT: 128 + signal.SIGINT}


class TrainingStopped(Exception):
  """The run stopped at a signal's request after saving `step` (`checkpoint` is its folder)."""

  def __init__(self, signum: int, step: int, checkpoint: str | None):
    name = signal.Signals(signum).name
    where = (f"checkpoint of step {step}: {checkpoint}" if checkpoint
             else f"no new step to save (step {step})")
    super().__init__(f"stopped by {name} after step {step}; {where}. Run the same command to "
                     "resume.")
    self.signum, self.step, self.checkpoint = signum, step, checkpoint

  @property
  def exit_status(self) -> int:
    return EXIT_STATUS[self.signum]


class StopRequest:
  """A context that turns the first SIGTERM / SIGINT into `requested` (module docstring).

  Args:
    install: False installs nothing (a run of several processes, whose SIGTERM is JAX's
      preemption notice and whose saves must be collective).
  """

  def __init__(self, *, install: bool = True):
    self.signum: int | None = None
    self._install = install
    self._previous: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __enter__(self) -> StopRequest:
    if self._install and threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self.signum is not None:  # the second signal: abort now, as without a handler
      self._restore()
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then "
          "stopping (send it again to abort at once, losing the steps since the last "
          "checkpoint)", file=sys.stderr, flush=True)

"""Time-based checkpoints (`checkpoint_every_minutes`, retro_jax/train/save_timer.py), with a
fake clock: no test sleeps.

The timer alone: when a save is due, what restarts the interval, how often the clock and the
cross-process agreement are asked. Then a training run (tests/reliability/tiny_retro.py) whose
only intermediate checkpoint is a timed one, and a run resumed from it that ends with the
uninterrupted run's exact parameters.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from retro_jax import checkpoint
from retro_jax.train import loop
from retro_jax.train import preflight
from retro_jax.train import save_timer
from retro_jax.train.save_timer import SaveTimer

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "reliability"))
import tiny_retro  # pylint: disable=wrong-import-position


class FakeClock:
  """Seconds that advance by `step` at every reading; counts its readings."""

  def __init__(self, step: float):
    self.step, self.now, self.readings = step, 0.0, 0

  def __call__(self) -> float:
    self.now += self.step
    self.readings += 1
    return self.now


def run_steps(timer: SaveTimer, steps: int, every_steps: int) -> list[int]:
  """The steps a loop saves (grid or timer), as retro_jax/train/loop.py asks."""
  saved = []
  for step in range(1, steps + 1):
    timed = timer.due(step)
    if timed or step % every_steps == 0:
      saved.append(step)
      timer.saved(step)
  return saved


def test_a_save_comes_when_the_minutes_have_passed_since_the_last_one():
  clock = FakeClock(25.0)  # each step takes 25 s
  saved = run_steps(SaveTimer(1.0, clock=clock), 20, every_steps=9)
  # Timed at 4 (75 s after step 1, where the interval starts) and 7 (75 s after 4); the grid
  # at 9 restarts it, so the next timed save is 12, not 10; then 15, 18 (grid), 21 > 20.
  assert saved == [4, 7, 9, 12, 15, 18]
  assert clock.readings == 20  # one reading per step, none for the saves


def test_the_timer_off_reads_no_clock():
  def clock():
    raise AssertionError("the clock was read")

  timer = SaveTimer(0, clock=clock)
  assert not timer.enabled
  assert run_steps(timer, 10, every_steps=5) == [5, 10]


def test_several_processes_agree_once_every_check_every_steps_on_process_0s_answer():
  clock, asked = FakeClock(10.0), []

  def process_zero(flag: bool) -> bool:  # this process's clock is not the one that decides
    asked.append(flag)
    return len(asked) == 3

  timer = SaveTimer(30.0, check_every=5, clock=clock, agree=process_zero)
  assert run_steps(timer, 20, every_steps=1000) == [15]
  assert clock.readings == len(asked) == 4  # steps 5, 10, 15, 20 only
  assert asked == [False, False, False, False]  # 30 minutes never passed here


def test_process_zero_decides_through_jaxs_broadcast():
  # One process here: the call path and the answer's type, not the collective itself.
  assert save_timer._process_zero_decides(True) is True  # pylint: disable=protected-access
  assert save_timer._process_zero_decides(False) is False  # pylint: disable=protected-access


@pytest.mark.parametrize("minutes", [-1.0, float("nan"), float("inf")])
def test_a_bad_interval_is_refused_before_anything_is_built(minutes):
  config = tiny_retro.get_config()
  with config.unlocked():
    config.checkpoint_every_minutes = minutes
  with pytest.raises(preflight.PreflightError, match="checkpoint_every_minutes: must be a "
                     "number of minutes >= 0"):
    preflight.check(config, steps_per_epoch=16, total_steps=4)


# ------------------------------------------------------------------------------------------
# Slow: two trainings of the 1/8-width Retro run, 4 steps and 1 step (~40 s with the step's
# compilation; it comes from the XLA cache when the engine tests ran first).


def _train(workdir: pathlib.Path, data_dir: pathlib.Path, clock: FakeClock):
  config = tiny_retro.get_config()
  with config.unlocked():
    config.data.data_dir = str(data_dir)
    config.checkpoint_every_steps = 1000  # the grid never fires: only the timer and the end
    config.checkpoint_every_minutes = 1.0
    config.monitor.every_steps = 0
  return loop.train(config, workdir, clock=clock)


@pytest.mark.slow
def test_a_run_resumed_from_a_timed_checkpoint_continues_exactly(fashion_mnist_tfds,
                                                                  tmp_path):
  straight = tmp_path / "straight"
  clock = FakeClock(40.0)  # steps 1, 2, 3 at 40, 80, 120 s: step 3 is 80 s after step 1
  _train(straight, fashion_mnist_tfds, clock)
  assert clock.readings == 4
  assert checkpoint.TrainCheckpoints(straight, every_steps=1000).all_steps() == [3, 4]

  # A run stopped after the timed save of step 3, then started again.
  resumed = tmp_path / "resumed"
  (resumed / "checkpoints").mkdir(parents=True)
  shutil.copytree(straight / "checkpoints" / "3", resumed / "checkpoints" / "3")
  _train(resumed, fashion_mnist_tfds, FakeClock(40.0))
  assert checkpoint.TrainCheckpoints(resumed, every_steps=1000).all_steps() == [3, 4]

  want, _ = checkpoint.load_model(straight / "student")
  got, description = checkpoint.load_model(resumed / "student")
  assert description["source"]["step"] == 4
  want, got = (jax.tree_util.tree_leaves_with_path(nnx.state(m, (nnx.Param, nnx.BatchStat)))
               for m in (want, got))
  assert want and len(want) == len(got)
  for (path, a), (_, b) in zip(want, got):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                  err_msg=jax.tree_util.keystr(path))

"""DevicePrefetch (retro_jax/train/prefetch.py): the same batches in order, fetched ahead.

The wrapped iterator is a stand-in with `pipeline.DeviceBatches`'s interface that logs every
fetch, so what the wrapper reads ahead is visible. Exact resume with prefetch switched on is
checked by the resume tests of the training loop (tests/train/test_engine.py,
tests/reliability/test_resume_drills.py), which run through it.
"""

from __future__ import annotations

import pytest

from retro_jax.train.prefetch import DevicePrefetch


class Batches:
  """Batch s is {"step": s}; from step `skip_from` on, each step has one unreadable example,
  and step `fail_step` cannot be made at all."""

  def __init__(self, start: int = 0, skip_from: int | None = None,
               fail_step: int | None = None):
    self.step = start
    self.skipped: list[str] = []
    self.fetched: list[int] = []
    self._skip_from, self._fail_step = skip_from, fail_step

  def __next__(self):
    if self.step == self._fail_step:
      raise ValueError(f"all examples of step {self.step} are unreadable")
    self.fetched.append(self.step)
    if self._skip_from is not None and self.step >= self._skip_from:
      self.skipped.append(f"step {self.step}")
    self.step += 1
    return {"step": self.step - 1}


def test_yields_the_same_batches_in_order_and_stops_at_count():
  inner = Batches(start=5)
  prefetch = DevicePrefetch(inner, count=4, depth=2)
  assert prefetch.step == 5
  got = []
  for expected in range(5, 9):
    got.append(next(prefetch)["step"])
    assert prefetch.step == expected + 1  # the next batch it hands out, not the inner's
    # One batch held ahead while the step of the one just handed out runs, none past 9.
    assert inner.fetched[-1] == min(expected + 1, 8)
  assert got == [5, 6, 7, 8]
  with pytest.raises(StopIteration):
    next(prefetch)
  assert inner.fetched == [5, 6, 7, 8]  # nothing read past the run's last step


def test_depth_bounds_the_batches_held_ahead():
  inner = Batches()
  prefetch = DevicePrefetch(inner, count=10, depth=3)
  next(prefetch)
  assert inner.fetched == [0, 1, 2]
  next(prefetch)
  assert inner.fetched == [0, 1, 2, 3]


def test_skipped_examples_are_those_of_the_batches_handed_out():
  inner = Batches(skip_from=1)
  prefetch = DevicePrefetch(inner, count=5)
  next(prefetch)  # step 0 clean; step 1 (one skip) already fetched
  assert inner.skipped == ["step 1"]
  assert prefetch.skipped == [] and prefetch.skipped_count == 0
  next(prefetch)
  assert prefetch.skipped == ["step 1"] and prefetch.skipped_count == 1


def test_an_error_fetched_ahead_is_raised_in_its_turn():
  prefetch = DevicePrefetch(Batches(fail_step=2), count=5)
  assert [next(prefetch)["step"] for _ in range(2)] == [0, 1]  # step 2 failed while ahead
  with pytest.raises(ValueError, match="step 2"):
    next(prefetch)
  with pytest.raises(StopIteration):  # the pipeline is not read again after an error
    next(prefetch)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="depth"):
    DevicePrefetch(Batches(), count=1, depth=0)

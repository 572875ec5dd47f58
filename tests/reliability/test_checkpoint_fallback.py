"""A newest checkpoint that cannot be read: set aside, and the run resumes from the one before.

Real Orbax checkpoints of a small state, damaged the way a crash or a full disk damages them
(a file truncated, a record overwritten), then read back through `TrainCheckpoints`. The drill
on a real training run is tests/reliability/test_resume_drills.py.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.checkpoint import TrainCheckpointError
from retro_jax.checkpoint import TrainCheckpoints


def make_state(step: int) -> dict[str, jax.Array]:
  """A state whose large array lands in its own data file (as a model's weights do)."""
  rng = np.random.default_rng(step)
  return {"step": jnp.int32(step),
          "params": {"w": jnp.asarray(rng.standard_normal((256, 512), np.float32)),
                     "b": jnp.asarray(rng.standard_normal((7,), np.float32))}}


def save_steps(workdir: pathlib.Path, steps) -> None:
  with TrainCheckpoints(workdir, every_steps=1, keep=10) as checkpoints:
    for step in steps:
      checkpoints.save(step, make_state(step), {"step": step})


def truncate_largest_file(step_dir: pathlib.Path) -> pathlib.Path:
  """Halves the checkpoint's largest file (the weights): what an interrupted copy leaves."""
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = largest.read_bytes()
  largest.write_bytes(data[:len(data) // 2])
  return largest


def overwrite_record(step_dir: pathlib.Path) -> None:
  (step_dir / "record" / "metadata").write_bytes(b"\0" * 40)


def tree_of(directory: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(directory)): p.stat().st_size
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", [truncate_largest_file, overwrite_record])
def test_unreadable_newest_is_set_aside_and_the_previous_restored(workdir, capsys, damage):
  save_steps(workdir, [1, 2, 3])
  damage(workdir / "checkpoints" / "3")
  before = tree_of(workdir / "checkpoints" / "3")
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    state, record = checkpoints.restore_newest(make_state(0))
    assert record == {"step": 2}
    np.testing.assert_array_equal(state["params"]["w"], make_state(2)["params"]["w"])
    assert checkpoints.all_steps() == [1, 2]
  err = capsys.readouterr().err
  assert err.count("\n") == 1  # one line
  assert "checkpoint 3 cannot be restored (its " in err
  assert f"moved to {workdir / 'checkpoints_corrupt' / '3'}; resuming from step 2" in err
  # Kept as it was, where Orbax does not look for checkpoints.
  assert tree_of(workdir / "checkpoints_corrupt" / "3") == before
  assert TrainCheckpoints(workdir, every_steps=1).all_steps() == [1, 2]


def test_set_aside_twice_keeps_both(workdir, capsys):
  save_steps(workdir, [1, 2])
  truncate_largest_file(workdir / "checkpoints" / "2")
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    checkpoints.restore_newest(make_state(0))
    checkpoints.save(2, make_state(2), {"step": 2})
  truncate_largest_file(workdir / "checkpoints" / "2")
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    _, record = checkpoints.restore_newest(make_state(0))
  assert record == {"step": 1}
  assert sorted(p.name for p in (workdir / "checkpoints_corrupt").iterdir()) == ["2", "2.2"]
  assert "moved to " + str(workdir / "checkpoints_corrupt" / "2.2") in capsys.readouterr().err


def test_no_readable_checkpoint_is_one_error_and_nothing_moves(workdir):
  save_steps(workdir, [1, 2])
  truncate_largest_file(workdir / "checkpoints" / "2")
  overwrite_record(workdir / "checkpoints" / "1")
  before = tree_of(workdir)
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    with pytest.raises(TrainCheckpointError) as raised:
      checkpoints.restore_newest(make_state(0))
  message = str(raised.value)
  assert f"no checkpoint in {workdir / 'checkpoints'} can be restored" in message
  assert "step 2: its arrays: " in message and "step 1: its record: " in message
  assert "move " in message and "new --workdir" in message and "\n" not in message
  assert tree_of(workdir) == before


def test_a_checkpoint_of_another_shape_is_an_error_not_corruption(workdir):
  save_steps(workdir, [1, 2])
  other = make_state(0)
  other["params"]["w"] = jnp.zeros((256, 256))
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    with pytest.raises(TrainCheckpointError, match=r"checkpoint .*2 does not match this run's "
                       r"state .*params\.w: \(\(256, 512\), 'float32'\) in the checkpoint, "
                       r"\(\(256, 256\), 'float32'\) in this run"):
      checkpoints.restore_newest(other)
  assert not (workdir / "checkpoints_corrupt").exists()
  assert TrainCheckpoints(workdir, every_steps=1).all_steps() == [1, 2]


def test_a_refused_record_stops_the_search_and_moves_nothing(workdir):
  save_steps(workdir, [1, 2])
  truncate_largest_file(workdir / "checkpoints" / "2")

  def refuse(step, record):
    raise ValueError(f"refused {step} {record}")

  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    # 2's record reads fine: the check refuses it before its arrays are touched.
    with pytest.raises(ValueError, match=r"refused 2 \{'step': 2\}"):
      checkpoints.restore_newest(make_state(0), refuse)
  assert not (workdir / "checkpoints_corrupt").exists()


def test_unfinished_save_is_removed_with_a_message(workdir, capsys):
  save_steps(workdir, [1])
  # What a save killed before its rename leaves (Orbax lists only renamed step folders).
  unfinished = workdir / "checkpoints" / "2.orbax-checkpoint-tmp-1796631845"
  (unfinished / "state").mkdir(parents=True)
  (unfinished / "state" / "_METADATA").write_text("{")
  with TrainCheckpoints(workdir, every_steps=1) as checkpoints:
    assert checkpoints.all_steps() == [1]
    checkpoints.save(2, make_state(2), {"step": 2})
  assert not unfinished.exists()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
  err = capsys.readouterr().err
  assert ("removing the unfinished save of an interrupted run in "
          f"{workdir / 'checkpoints'} (2.orbax-checkpoint-tmp-1796631845)") in err


def test_no_checkpoints_folder_before_the_first_save(workdir):
  with TrainCheckpoints(workdir, every_steps=2) as checkpoints:
    assert checkpoints.restore_newest(make_state(0)) is None
    assert not checkpoints.save(1, make_state(1), {})
    assert not (workdir / "checkpoints").exists()
    assert checkpoints.due(2) and checkpoints.due(3, force=True) and not checkpoints.due(3)
    checkpoints.save(2, make_state(2), {})
    checkpoints.wait()
    assert not checkpoints.due(2, force=True)  # saved already
  assert (workdir / "checkpoints" / "2").is_dir()

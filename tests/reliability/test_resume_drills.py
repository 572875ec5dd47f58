"""Fault drills on a real training run, through the CLI: a corrupted newest checkpoint, a
changed config or teacher on resume, a diverging run, a start that fails its checks.

One run is trained for the whole module (tests/reliability/tiny_retro.py: Retro as in
configs/resnet18.py:smoke at 1/8 of the width, 2 steps of 16 Fashion-MNIST images, a checkpoint
after each, monitor off) with a teacher model directory; each drill works on a copy of its
workdir, or checks that a refused start changed nothing in it. Only two drills train (the
resume from a corrupted checkpoint and the diverging run): each call of the CLI traces the
step again, while its compile comes from the test run's XLA cache.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import pytest

from retro_jax import checkpoint
from retro_jax import main as main_lib
from retro_jax.train import run_record

import drill_runs

# Slow, all of them: the module's run takes ~45 s with a cold XLA cache on the 2-core CPU (the
# step's compile is ~30 s of it), the drills ~25 s together. Marking only some would split the
# module (slow tests run first) and train its run twice.
pytestmark = pytest.mark.slow


def truncate_weights(step_dir: pathlib.Path) -> None:
  """Truncates the checkpoint's largest file (weights), as a copy cut short would."""
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:1000])


@dataclasses.dataclass(frozen=True)
class Trained:
  workdir: pathlib.Path
  teacher: pathlib.Path
  data_dir: pathlib.Path

  def args(self, workdir=None, *overrides) -> list[str]:
    return drill_runs.run_args(workdir or self.workdir, self.data_dir, self.teacher, *overrides)

  def copy(self, destination: pathlib.Path) -> pathlib.Path:
    shutil.copytree(self.workdir, destination)
    return destination


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_mnist_tfds) -> Trained:
  root = tmp_path_factory.mktemp("drills")
  run = Trained(root / "run", drill_runs.save_teacher(root / "teacher", seed=1), fashion_mnist_tfds)
  assert main_lib.main(run.args()) == 0
  assert checkpoint.TrainCheckpoints(run.workdir, every_steps=1).all_steps() == [1, 2]
  return run


def test_first_start_records_its_config_and_the_config_hash(trained):
  config = json.loads((trained.workdir / "config.json").read_text())
  assert config["optimizer"]["lr"] == 0.03 and config["total_steps"] == 2
  assert not (trained.workdir / run_record.CHANGES_JSONL).exists()
  record = checkpoint.TrainCheckpoints(trained.workdir, every_steps=1).read_record(2)
  assert record["config"] == run_record.flatten(config)
  assert record["config_hash"] == run_record.config_hash(run_record.flatten(config))
  assert record["teacher"]["content_sha256"] == checkpoint.content_digest(trained.teacher)


def test_corrupted_newest_checkpoint_is_set_aside_and_the_run_resumes(trained, tmp_path, capsys):
  workdir = trained.copy(tmp_path / "run")
  truncate_weights(workdir / "checkpoints" / "2")
  corrupted = drill_runs.checksums(workdir / "checkpoints" / "2")
  # log_every_steps is exempt from the config check: accepted, and recorded.
  assert main_lib.main(trained.args(workdir, "--config.log_every_steps=2")) == 0
  captured = capsys.readouterr()
  moved = [line for line in captured.err.splitlines() if "cannot be restored" in line]
  assert len(moved) == 1
  assert moved[0].startswith("checkpoint 2 cannot be restored (its arrays: ")
  assert moved[0].endswith(f"moved to {workdir / 'checkpoints_corrupt' / '2'}; "
                           "resuming from step 1")
  assert "resuming from step 1" in captured.out and "Traceback" not in captured.err
  assert drill_runs.checksums(workdir / "checkpoints_corrupt" / "2") == corrupted
  assert checkpoint.TrainCheckpoints(workdir, every_steps=1).all_steps() == [1, 2]
  (entry,) = [json.loads(line) for line in (workdir / run_record.CHANGES_JSONL).open()]
  assert entry["step"] == 1
  assert entry["changes"] == {"log_every_steps": {"from": 1, "to": 2}}
  # The resumed run ends where the uninterrupted one did.
  for got, want in zip(drill_runs.student_weights(workdir),
                       drill_runs.student_weights(trained.workdir)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_no_readable_checkpoint_says_how_to_start_again(trained, tmp_path, capsys):
  workdir = trained.copy(tmp_path / "run")
  truncate_weights(workdir / "checkpoints" / "2")
  truncate_weights(workdir / "checkpoints" / "1")
  before = drill_runs.checksums(workdir)
  assert main_lib.main(trained.args(workdir)) == 1
  err = capsys.readouterr().err
  assert f"no checkpoint in {workdir / 'checkpoints'} can be restored (step 2: its arrays" in err
  assert "nothing was moved" in err and "new --workdir" in err and "Traceback" not in err
  assert drill_runs.checksums(workdir) == before


def test_changed_learning_rate_is_refused_and_nothing_changes(trained, capsys):
  before = drill_runs.checksums(trained.workdir)
  assert main_lib.main(trained.args(None, "--config.optimizer.lr=3.0")) == 1
  err = capsys.readouterr().err
  assert ("differs from the one checkpoint 2 was trained with in 1 training-relevant key: "
          "optimizer.lr: 0.03 -> 3.0") in err
  assert "--allow_config_change" in err and "Traceback" not in err
  assert drill_runs.checksums(trained.workdir) == before


def test_allowed_config_change_is_recorded_with_its_step(trained, tmp_path):
  workdir = trained.copy(tmp_path / "run")
  config_json = (workdir / "config.json").read_bytes()
  # The latest checkpoint is the last step: the resume trains nothing, then saves the student.
  assert main_lib.main(trained.args(workdir, "--config.optimizer.lr=3.0",
                                    "--allow-config-change")) == 0
  assert (workdir / "config.json").read_bytes() == config_json
  (entry,) = [json.loads(line) for line in (workdir / run_record.CHANGES_JSONL).open()]
  assert entry["step"] == 2 and entry["changes"] == {"optimizer.lr": {"from": 0.03, "to": 3.0}}
  recorded = run_record.recorded_config(workdir)
  assert recorded["optimizer.lr"] == 3.0 and recorded["total_steps"] == 2


def test_teacher_rewritten_in_place_is_refused(trained, capsys):
  before = drill_runs.checksums(trained.workdir)
  original = trained.teacher.with_name("teacher_original")
  shutil.copytree(trained.teacher, original)
  try:
    # The same directory and architecture, other weights.
    drill_runs.save_teacher(trained.teacher, seed=2)
    assert main_lib.main(trained.args()) == 1
  finally:
    shutil.rmtree(trained.teacher)
    original.rename(trained.teacher)
  err = capsys.readouterr().err
  assert (f"the teacher directory {trained.teacher} changed since checkpoint "
          f"{trained.workdir / 'checkpoints' / '2'} was written (content SHA-256") in err
  assert "Traceback" not in err
  assert drill_runs.checksums(trained.workdir) == before


def test_diverging_run_stops_before_saving_a_non_finite_state(trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  teacher = drill_runs.save_teacher(tmp_path / "nan_teacher", seed=1, nan=True)
  # Step 1 is a checkpoint step but not a log step: the guard fetches and checks it anyway.
  args = drill_runs.run_args(workdir, trained.data_dir, teacher, "--config.log_every_steps=2")
  assert main_lib.main(args) == 1
  err = capsys.readouterr().err
  assert "training diverged at step 1: " in err and ", loss, " in err and "are not finite" in err
  assert "loss nan" in err and "grad_norm nan" in err and "lr 0.001875" in err
  assert "no checkpoint was written" in err and "Traceback" not in err
  assert not (workdir / "checkpoints").exists()


def test_a_start_that_fails_its_checks_leaves_no_record(trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  # Refused by the monitor, which is set up after the model, the teacher and the checkpoints.
  args = drill_runs.run_args(workdir, trained.data_dir, trained.teacher,
                             "--config.monitor.every_steps=2")
  args[1] = f"{drill_runs.CONFIG}:training_view_monitor"
  assert main_lib.main(args) == 1
  assert "monitor.augmentation: expected one (eval) view, got 2" in capsys.readouterr().err
  assert sorted(p.name for p in workdir.iterdir()) == []

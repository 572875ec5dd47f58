"""Interrupted runs resume to the uninterrupted run's exact parameters: kill -9 at sampled
points (during asynchronous saves too), SIGTERM and SIGINT (a save, then exit 0 / 130).

One workdir is trained by a chain of CLI processes (tests/reliability/tiny_retro.py, 1/8-width
Retro, a checkpoint after every step): each is killed at its point, and the next one resumes
where the checkpoints allow; the last runs to the end. The points come from a seed printed
in the output (RETRO_JAX_DRILL_SEED=N replays a run's points). The reference is the same
config trained without interruption (and with one checkpoint, at the end), in this process.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from retro_jax import checkpoint
from retro_jax import main as main_lib

import drill_runs

# 8 CLI processes of ~10-15 s each (imports, tracing; the compile comes from the XLA cache).
pytestmark = pytest.mark.slow

TOTAL_STEPS = 24
KILLS = 5


def _start(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-u", "-m", "retro_jax.main", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, target: int) -> int | None:
  """Reads the run's output until it reports step `target` or later; None if it ended first."""
  for line in proc.stdout:
    if line.startswith("step "):
      step = int(line.split()[1].split("/")[0])
      if step >= target:
        return step
  return None


def _unfinished_saves(workdir: pathlib.Path) -> list[pathlib.Path]:
  return sorted((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def _kill_during_save(proc: subprocess.Popen, workdir: pathlib.Path, timeout: float) -> bool:
  """SIGKILL as soon as a save is in flight (its temporary folder exists); whether one was."""
  end = time.monotonic() + timeout
  while time.monotonic() < end and proc.poll() is None:
    if _unfinished_saves(workdir):
      proc.kill()
      return True
    time.sleep(0.0005)
  proc.kill()
  return False


def _newest(workdir: pathlib.Path) -> int:
  steps = checkpoint.TrainCheckpoints(workdir, every_steps=1).all_steps()
  return max(steps, default=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fashion_mnist_tfds):
  root = tmp_path_factory.mktemp("interruptions")
  teacher = drill_runs.save_teacher(root / "teacher", seed=1)

  def args(workdir):
    return drill_runs.run_args(workdir, fashion_mnist_tfds, teacher,
                               f"--config.total_steps={TOTAL_STEPS}")

  # The reference saves only at its end: where checkpoints fall must not change the result,
  # and 24 saves were most of this fixture's time.
  reference = root / "reference"
  assert main_lib.main([*args(reference), f"--config.checkpoint_every_steps={TOTAL_STEPS}"]) == 0
  return root, args, drill_runs.student_weights(reference)


def test_killed_and_signalled_runs_resume_to_the_uninterrupted_parameters(setup, capsys):
  root, args, want = setup
  capsys.readouterr()
  seed = int(os.environ.get("RETRO_JAX_DRILL_SEED", time.time_ns() % 2**31))
  rng = np.random.default_rng(seed)
  # Each process trains 2 to 4 steps past its resume point (a save commits about one step
  # after it starts, so the chain moves on). At least two of the kills then wait for a save in
  # flight; the others land at a random moment after that step's log line (the save's start,
  # the next batch, the next step).
  kinds = rng.permutation(["save", "save"] + ["moment"] * (KILLS - 2)).tolist()
  ahead = rng.integers(2, 5, size=KILLS).tolist()
  print(f"interruption drill seed {seed} (RETRO_JAX_DRILL_SEED={seed} replays it): "
        f"{list(zip(kinds, ahead))}")
  workdir = root / "chain"
  reached, during_save = [], 0
  for kind, steps in zip(kinds, ahead):
    # Read before the process starts: a checkpoint manager opened here must not race its saves.
    after = _newest(workdir) if workdir.exists() else 0
    proc = _start(args(workdir))
    step = _wait_for_step(proc, after + steps)
    assert step is not None and step < TOTAL_STEPS, (kind, step, proc.wait(), proc.stderr.read())
    if kind == "save":
      during_save += _kill_during_save(proc, workdir, timeout=5.0)
    else:
      time.sleep(rng.uniform(0.0, 0.6))
      proc.kill()
    assert proc.wait() == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()
    reached.append(step)
  print(f"{KILLS} kills, {during_save} during a save, after the log lines of steps {reached}; "
        f"newest checkpoint {_newest(workdir)}")
  assert during_save >= 1  # a save takes long enough to be caught on every machine seen

  # SIGTERM, then SIGINT: each saves the step it is training, says where, and stops.
  for signum, status in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
    before = _newest(workdir)
    proc = _start(args(workdir))
    step = _wait_for_step(proc, before + 1)
    assert step is not None and step < TOTAL_STEPS - 1, proc.stderr.read()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    name = signal.Signals(signum).name
    assert f"{name} received: saving a checkpoint after this step" in err
    stopped = int(err.split(f"stopped by {name} after step ")[1].split(";")[0])
    assert stopped >= step and _newest(workdir) == stopped, (stopped, _newest(workdir))
    assert f"checkpoint of step {stopped}: {workdir / 'checkpoints' / str(stopped)}" in err
    assert "Traceback" not in err and not _unfinished_saves(workdir)

  proc = _start(args(workdir))
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in out
  for got, expected in zip(drill_runs.student_weights(workdir), want, strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_a_second_signal_aborts_at_once(tmp_path):
  # No training here: the second SIGTERM must end the process at once, with the signal's own
  # status, while the first only set the request.
  script = textwrap.dedent("""
      import os, signal, time
      from retro_jax.train.stop_request import StopRequest
      with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        while not stop.requested:
          time.sleep(0.01)
        print("first: requested", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        print("not reached", flush=True)
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == -signal.SIGTERM, proc.stderr
  assert proc.stdout == "first: requested\n"
  assert "SIGTERM received: saving a checkpoint after this step" in proc.stderr

"""Joining a multi-process run (retro_jax/distributed.py) and what the processes must agree on.

No cluster and no network here: JAX's own cluster detection reads SLURM's environment variables
(set by monkeypatch), and `jax.distributed.initialize` is replaced by a recorder. The two-process
runs on 127.0.0.1 are in tests/train/test_multiprocess.py.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from jax._src import xla_bridge

from retro_jax import checkpoint
from retro_jax import distributed
from retro_jax import main as main_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent / "reliability"))
import model_dirs  # pylint: disable=wrong-import-position

# What jax/_src/clusters/slurm_cluster.py reads: a job of 2 tasks, this one task 1.
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
# Every environment JAX detects without a network query on this machine.
OTHER_CLUSTERS = ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_HOSTNAMES",
                  "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def calls(monkeypatch):
  """The calls to jax.distributed.initialize, recorded instead of made; no cluster variables;
  JAX's backends as before any computation (as in a fresh `python -m retro_jax.main`)."""
  for name in (*SLURM, *OTHER_CLUSTERS):
    monkeypatch.delenv(name, raising=False)
  made = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: made.append(kwargs))
  monkeypatch.setattr(distributed, "_use_gloo_on_cpu", lambda jax: None)
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  return made


def test_no_cluster_and_no_flags_is_one_process(calls):
  assert distributed.detected_cluster() is None
  assert distributed.initialize(["--config", "x.py"]) is None
  assert calls == []


def test_a_slurm_job_is_joined_without_flags(calls, monkeypatch):
  for name, value in SLURM.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize(["--config", "x.py", "--workdir", "w"]) == "SlurmCluster"
  assert calls == [{}]  # no arguments: JAX fills in SLURM's coordinator, count and rank


def test_a_one_task_slurm_job_is_left_alone(calls, monkeypatch):
  for name, value in {**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}.items():
    monkeypatch.setenv(name, value)
  assert distributed.initialize([]) is None
  assert calls == []


def test_explicit_flags_win_over_detection(calls, monkeypatch):
  for name, value in SLURM.items():
    monkeypatch.setenv(name, value)
  argv = ["--config", "x.py", "--coordinator_address=10.0.0.1:1234", "--num_processes", "4",
          "--process_id=3"]
  assert distributed.initialize(argv) == "flags"
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                    "process_id": 3}]


def test_a_cluster_found_after_jax_started_is_reported_not_joined(calls, monkeypatch, capsys):
  for name, value in SLURM.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
  assert distributed.initialize([]) is None
  assert calls == []
  err = capsys.readouterr().err
  assert "SlurmCluster cluster of 2 processes" in err and "jax.distributed.initialize()" in err


def test_a_failed_join_is_one_line_and_exit_1(monkeypatch, capsys):
  def refuse(**kwargs):
    raise RuntimeError("coordinator 10.0.0.1:1 unreachable")
  monkeypatch.setattr(jax.distributed, "initialize", refuse)
  monkeypatch.setattr(distributed, "_use_gloo_on_cpu", lambda jax: None)
  assert main_lib.main(["--config", "quickstart", "--workdir", "w",
                        "--coordinator_address=10.0.0.1:1", "--num_processes=2",
                        "--process_id=1"]) == 1
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "could not join the multi-process run" in err
  assert "10.0.0.1:1 unreachable" in err


def test_processes_with_different_newest_checkpoints_refuse_to_resume(tmp_path, monkeypatch):
  with checkpoint.TrainCheckpoints(tmp_path, every_steps=1, async_save=False) as checkpoints:
    checkpoints.save(3, {"x": jnp.zeros(2)}, {"step": 3})
  # Process 0 (this one) sees step 3; process 1 sees no checkpoint (its own local disk).
  monkeypatch.setattr(distributed, "values_of_all_processes", lambda value: [value, -1])
  with checkpoint.TrainCheckpoints(tmp_path, every_steps=1) as checkpoints:
    with pytest.raises(checkpoint.TrainCheckpointError) as error:
      checkpoints.restore_newest({"x": jnp.ones(2)})
  message = str(error.value)
  assert "step 3 on process 0, none on process 1" in message
  assert "gs://" in message and "shared filesystem" in message
  assert (tmp_path / "checkpoints" / "3").is_dir()  # nothing moved


def test_a_model_directory_refused_on_one_process_is_refused_on_all(tmp_path, monkeypatch):
  # This process's directory is new, another process's is not: all refuse before the
  # collective Orbax save (one refusing alone would leave the others waiting in it).
  monkeypatch.setattr(distributed, "values_of_all_processes", lambda value: [value, True])
  with pytest.raises(checkpoint.ModelDirectoryError, match="exists and is not empty"):
    model_dirs.save_random(tmp_path / "model")
  assert not (tmp_path / "model").exists()

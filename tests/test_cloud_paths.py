"""gs:// (and other cloud) paths everywhere: workdirs, checkpoints, teachers, students, exports,
metrics, TensorBoard and reports, through `retro_jax.storage`, with tests/fake_gcs.py standing
in for Google Cloud Storage. The test that matters: nothing is written to a local folder named
"gs:" (what pathlib made of gs://bucket/x before), and everything reads back."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from retro_jax import checkpoint
from retro_jax import export as export_lib
from retro_jax import main as main_lib
from retro_jax import output_paths
from retro_jax import storage

sys.path.insert(0, str(pathlib.Path(__file__).parent / "reliability"))
import drill_runs  # pylint: disable=wrong-import-position

from fake_gcs import fake_gcs
from fake_gcs import local_folders_named_gs

RUN = "gs://retro-test/runs/tiny"
TEACHER = "gs://retro-test/teachers/tiny"
EXPORT = "gs://retro-test/exports/tiny"


def test_local_paths_become_absolute_and_cloud_paths_stay_uris(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(storage, "_gcs_client_missing", lambda: False)
  assert str(storage.path("runs/x")) == str(tmp_path / "runs" / "x")
  assert str(storage.path(f"file://{tmp_path}/y")) == str(tmp_path / "y")
  for uri in ("gs://bucket/runs/x", "s3://bucket/x"):
    path = storage.path(uri)
    assert str(path) == uri and str(path / "checkpoints") == uri + "/checkpoints"
    assert not storage.is_local(path)
  assert str(output_paths.check_directory("gs://bucket/runs/x", "--workdir")) == (
      "gs://bucket/runs/x")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, says", [
    ("gs:/bucket/x", "did you mean gs://bucket/x? (as written, it is a local folder named 'gs:')"),
    ("ftp://host/x", "retro_jax cannot write ftp:// paths; use a local path or one of gs://"),
])
def test_paths_that_would_go_wrong_are_refused(value, says):
  with pytest.raises(storage.StoragePathError) as error:
    storage.path(value)
  assert str(error.value).startswith(f"{value}: {says}")


def test_gs_without_google_cloud_storage_says_what_to_install(monkeypatch):
  monkeypatch.setattr(storage, "_gcs_client_missing", lambda: True)
  with pytest.raises(storage.StoragePathError, match=r'pip install "retro_jax\[gcs\]"'):
    storage.path("gs://bucket/x")


def test_export_refuses_a_bad_scheme_as_a_usage_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    export_lib.main(["--workdir", str(tmp_path), "--out", "ftp://host/x", "--format", "orbax"])
  assert exit_.value.code == 2
  assert "argument --out: ftp://host/x: retro_jax cannot write ftp:// paths" in (
      capsys.readouterr().err)


@pytest.fixture(scope="module")
def cloud_run(tmp_path_factory, fashion_mnist_tfds):
  """The fault drills' tiny Retro run (2 steps) with its teacher, workdir and export on gs://.

  Its compile comes from the test run's XLA cache when the drills ran first (same config).
  """
  root = tmp_path_factory.mktemp("cloud")
  bucket_root, cwd = root / "gcs", root / "cwd"
  bucket_root.mkdir()
  cwd.mkdir()
  with pytest.MonkeyPatch.context() as monkeypatch, fake_gcs(bucket_root, monkeypatch):
    monkeypatch.chdir(cwd)
    drill_runs.save_teacher(TEACHER, seed=1)
    args = drill_runs.run_args(RUN, fashion_mnist_tfds, TEACHER)
    assert main_lib.main(args) == 0
    # A rerun resumes from the last checkpoint on gs:// (its record, teacher check, arrays).
    assert main_lib.main(args) == 0
    assert export_lib.main(["--workdir", RUN, "--out", EXPORT, "--format", "orbax"]) == 0
    student, _ = checkpoint.load_model(f"{RUN}/student")
    exported, description = checkpoint.load_model(EXPORT)
    steps = checkpoint.TrainCheckpoints(RUN, every_steps=1).all_steps()
    record = checkpoint.TrainCheckpoints(RUN, every_steps=1).read_record()
  yield {"root": root, "bucket": bucket_root / "retro-test", "cwd": cwd, "student": student,
         "exported": exported, "description": description, "steps": steps, "record": record}


# One 2-step training run of the drills' config, resumed once, and its export (measured on the
# loaded 2-core machine, the module alone): 52 s with a warm XLA cache, which the drills leave
# (Fashion-MNIST's preparation, shared with the suite, included); 150-230 s cold.
@pytest.mark.slow
def test_a_run_on_gs_writes_only_to_the_bucket(cloud_run):
  assert local_folders_named_gs(cloud_run["root"], pathlib.Path.cwd()) == []
  assert list(cloud_run["cwd"].iterdir()) == []
  run = cloud_run["bucket"] / "runs" / "tiny"
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2"]
  for name in ("config.json", "metrics.jsonl", "report.md", "student/model.json",
               "plots/losses.png"):
    assert (run / name).is_file(), name
  events = [p for p in (run / "tensorboard").iterdir()]
  # Both starts logged (uploaded from the local mirror), each to its own event file.
  assert len(events) == 2 and all(p.name.startswith("events.out.tfevents") for p in events)
  assert max(p.stat().st_size for p in events) > 500  # The first start's scalars.
  assert cloud_run["steps"] == [1, 2]
  assert cloud_run["record"]["teacher"]["checkpoint"] == TEACHER  # The URI, not ./gs:/...
  steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 2


@pytest.mark.slow  # Shares cloud_run.
def test_the_export_on_gs_reads_back_as_the_trained_backbone(cloud_run):
  assert cloud_run["description"]["source"]["workdir"] == RUN
  assert cloud_run["description"]["source"]["model_directory"] == f"{RUN}/student"
  trained = nnx.state(cloud_run["student"].backbone, nnx.Param)
  exported = nnx.state(cloud_run["exported"].backbone, nnx.Param)
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(exported), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (cloud_run["bucket"] / "exports" / "tiny" / "model.json").is_file()

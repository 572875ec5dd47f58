"""The quickstart end to end (`configs/quickstart.py:test`: the same stages with few steps).

Data -> MoCo-v2 teacher -> Retro student -> k-NN and linear probe of both -> export -> table,
then the same command again, which finds every stage done and only prints the table.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from retro_jax import checkpoint
from retro_jax import main as main_lib

CONFIG = str(pathlib.Path(__file__).parents[1] / "configs" / "quickstart.py")


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_resumes(fashion_mnist_tfds, tmp_path, capsys):
  workdir = tmp_path / "quickstart"
  args = ["--config", f"{CONFIG}:test", "--workdir", str(workdir),
          f"--config.data_dir={fashion_mnist_tfds}"]
  assert main_lib.main(args) == 0
  out = capsys.readouterr().out

  stages = json.loads((workdir / "stages.json").read_text())
  assert stages["final"] == "student"
  teacher_dir = workdir / stages["stages"]["teacher"] / "student"
  student_dir = workdir / stages["stages"]["student"] / "student"
  teacher_description = checkpoint.read_description(teacher_dir)
  student_description = checkpoint.read_description(student_dir)
  assert teacher_description["source"]["method"] == "mocov2"
  assert student_description["source"]["method"] == "retro"
  assert student_description["encoder"]["head_kind"] == "adapter"
  # The Retro stage was trained with the MoCo-v2 stage's student as its teacher.
  config = json.loads((workdir / stages["stages"]["student"] / "config.json").read_text())
  assert config["teacher"]["checkpoint"] == str(teacher_dir)

  # Evaluation rows: k-NN (k = 20, 200) and the linear probe for both models, as printed.
  rows = []
  for role in ("teacher", "student", "student_at_init"):
    rows += json.loads((workdir / "evaluation" / f"{role}.json").read_text())
  models = ("teacher", "student", "student at init")
  assert {(r["model"], r["protocol"]) for r in rows} == {
      (m, p) for m in models for p in ("knn_k20", "knn_k200", "linear")}
  assert {r["features"] for r in rows} == {"backbone", "embedding"}
  for row in rows:
    assert 0.0 <= row["top1"] <= row["top5"] <= 100.0
    assert row["test_examples"] == 256
    assert f"| {row['model']} | {row['protocol']} | {row['features']} | {row['top1']:.2f} |" in out

  # The export is the student's backbone, and it embeds like the trained student.
  exported, description = checkpoint.load_model(workdir / "export")
  assert exported.head is None and description["encoder"]["architecture"] == "resnet18"
  trained, _ = checkpoint.load_model(student_dir)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(exported(images).features),
                                np.asarray(trained(images).features))
  report = (workdir / "report.md").read_text()
  assert "linear" in report and "knn_k200" in report
  for stage in ("teacher", "student"):
    assert (workdir / stages["stages"][stage] / "report.md").is_file()

  # Again: everything is found done; nothing is trained or evaluated a second time.
  assert main_lib.main(args) == 0
  again = capsys.readouterr().out
  assert again.count("skipped") >= 6
  assert "first step" not in again
  assert "| student | linear |" in again

"""The study runner end to end (`configs/study_fashion_mnist.py:test`), and the quickstart's
config (a one-seed study of the same runner).

Data -> MoCo-v2 teacher -> two student arms (MoCo-v2 alone, Retro) x two seeds -> untrained
networks -> k-NN and linear probe of every model -> export -> table with 95 % intervals, then
the same command again, which finds every stage done and only prints the table. The study's
other arms differ from these only in their configs, which are checked without training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from retro_jax import checkpoint
from retro_jax import main as main_lib
from retro_jax import study_report

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"


def test_interval_is_the_student_t_interval_of_the_mean():
  # By hand: mean 2, sample sd 1; Student's t with 2 degrees of freedom has the closed-form
  # quantile t_p = (2p - 1) sqrt(2 / (4 p (1 - p))), here 4.3027 at p = 0.975.
  mean, half = study_report.interval([1.0, 2.0, 3.0])
  p = 0.975
  assert mean == 2.0
  assert half == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))) / math.sqrt(3),
                               rel=1e-9)
  assert study_report.interval([5.0]) == (5.0, None)


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


study_config = _config_module("study_fashion_mnist")


def test_study_arms_differ_only_in_method_and_the_reference_form():
  # The end-to-end test below trains two of the four arms; the other two are these configs.
  config = study_config.get_config()
  arms = config.students
  assert set(arms) == {"mocov2", "disco", "retro", "retro_reference"}
  for arm in arms.values():
    for key in ("total_steps", "global_batch_size", "data", "optimizer", "seed"):
      assert arm[key] == arms.retro[key], key
  assert arms.retro.objective.consistency_pairing == "same_view"
  assert arms.retro.teacher.bn_mode == "eval"
  reference = arms.retro_reference
  assert reference.method == "retro" and reference.objective.consistency_pairing == "cross_view"
  assert reference.teacher.bn_mode == "batch"
  assert arms.disco.method == "disco" and arms.mocov2.teacher.checkpoint == ""
  test = study_config.get_config("test")
  assert set(test.students) == set(study_config.TEST_ARMS)


def test_quickstart_is_a_one_seed_study_with_the_moco_alone_row():
  config = _config_module("quickstart").get_config()
  assert config.task == "study" and list(config.seeds) == [0] and config.export
  assert set(config.students) == {"retro", "mocov2"} and config.baseline == "mocov2"
  retro, moco = config.students.retro, config.students.mocov2
  # The papers' comparison: the same network, budget, data and optimiser; only the method.
  for key in ("total_steps", "global_batch_size", "student", "data", "optimizer"):
    if key == "student":
      assert retro.student.name == moco.student.name
      assert retro.student.kwargs == moco.student.kwargs
    else:
      assert retro[key] == moco[key], key


@pytest.mark.slow
def test_study_runs_every_stage_and_resumes(fashion_mnist_tfds, tmp_path, capsys):
  workdir = tmp_path / "study"
  args = ["--config", f"{CONFIGS / 'study_fashion_mnist.py'}:test", "--workdir", str(workdir),
          f"--config.data_dir={fashion_mnist_tfds}", "--config.export=True"]
  assert main_lib.main(args) == 0
  out = capsys.readouterr().out

  stages = json.loads((workdir / "stages.json").read_text())
  assert stages["final"] == "retro"
  arms = ("mocov2", "retro")
  assert set(stages["stages"]) == {"teacher", *arms}
  assert arms == study_config.TEST_ARMS
  teacher_dir = workdir / "teacher" / "student"
  assert checkpoint.read_description(teacher_dir)["source"]["method"] == "mocov2"
  for arm in arms:
    for seed in (0, 1):
      run = workdir / arm / f"seed_{seed}"
      description = checkpoint.read_description(run / "student")
      assert description["source"]["method"] == arm
      config = json.loads((run / "config.json").read_text())
      assert config["seed"] == seed
      # Every distillation arm learned from the study's teacher; MoCo-v2 alone from none.
      assert config["teacher"]["checkpoint"] == ("" if arm == "mocov2" else str(teacher_dir))

  # Every model evaluated on the same test rows; the table's cells are the seeds' mean +- CI.
  results = json.loads((workdir / "results.json").read_text())
  by_model = {(r["model"], r["features"]): r for r in results["table"]}
  for arm in arms:
    cell = by_model[(arm, "backbone")]["knn_k20"]
    assert len(cell["values"]) == 2
    assert cell["mean"] == pytest.approx(np.mean(cell["values"]))
    assert f"| {arm} | backbone | 2 | {cell['mean']:.2f} ± {cell['ci95']:.2f} |" in out
  for label in ("teacher", "retro__seed_1", "init__seed_0", "init__teacher"):
    rows = json.loads((workdir / "evaluation" / f"{label}.json").read_text())
    assert {r["protocol"] for r in rows} == {"knn_k20", "knn_k200", "linear"}
    assert all(r["test_examples"] == 256 and 0 <= r["top1"] <= 100 for r in rows)
  paired = {(p["arm"], p["baseline"]): p for p in results["paired"]}
  assert set(paired) == {("retro", "mocov2")}
  assert paired[("retro", "mocov2")]["linear"]["values"] == pytest.approx(np.subtract(
      by_model[("retro", "backbone")]["linear"]["values"],
      by_model[("mocov2", "backbone")]["linear"]["values"]))
  markdown = (workdir / "results.md").read_text()
  assert "Training diagnostics" in markdown and "| teacher |" in markdown
  for plot in ("knn_over_training.png", "final_accuracy.png"):
    assert (workdir / "plots" / plot).stat().st_size > 1000

  # The export is the final arm's seed-0 backbone, and it embeds like that student.
  exported, description = checkpoint.load_model(workdir / "export")
  assert exported.head is None and description["encoder"]["architecture"] == "resnet18"
  trained, _ = checkpoint.load_model(workdir / "retro" / "seed_0" / "student")
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(exported(images).features),
                                np.asarray(trained(images).features))

  # Again: everything is found done; nothing is trained or evaluated a second time.
  timings = json.loads((workdir / "timings.json").read_text())
  assert main_lib.main(args) == 0
  again = capsys.readouterr().out
  assert again.count("already trained") == 1 + 2 * len(arms)
  assert "first step" not in again and "evaluate " not in again
  assert json.loads((workdir / "timings.json").read_text()) == timings

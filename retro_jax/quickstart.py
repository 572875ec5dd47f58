"""The quickstart: data, a MoCo-v2 teacher, a Retro student, evaluation, export, one table.

`python -m retro_jax.main --config configs/quickstart.py --workdir runs/quickstart` runs the
stages below in order (config.task = 'quickstart'); each one leaves its result in the workdir
and is skipped when that result is already there, and the training stages resume from their
last checkpoint, so an interrupted quickstart continues where it stopped when the same command
is run again.

  1. data      Fashion-MNIST prepared offline into TFDS (Debian's dataset-fashion-mnist)
  2. teacher   MoCo-v2 pretraining of the teacher            WORKDIR/teacher_mocov2/
               (no pretrained teacher can be downloaded here; real users convert one and
               point the student stage's teacher.checkpoint at it)
  3. student   Retro distillation of the small student       WORKDIR/student_retro/
  4. evaluate  k-NN and linear probe of teacher and student  WORKDIR/evaluation/
               (and of the untrained student network, the baseline to beat)
  5. export    the student backbone as an Orbax model        WORKDIR/export/
  6. summary   the table (stdout, WORKDIR/report.md) with the measured numbers and paths

WORKDIR/stages.json names the training stages, so `python -m retro_jax.export --workdir
WORKDIR` exports the final student (or `--stage teacher`).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import ml_collections

from retro_jax.export import STAGES_JSON  # the file `export` reads (export imports no JAX)

STAGES = {"teacher": "teacher_mocov2", "student": "student_retro"}
FINAL_STAGE = "student"


class QuickstartError(ValueError):
  """A stage cannot run (data missing and not preparable, a broken earlier stage)."""


def _log(message: str) -> None:
  print(f"[quickstart] {message}", flush=True)


def _prepare_data(config: ml_collections.ConfigDict) -> None:
  from retro_jax.data import prepare  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  try:
    prepared = prepare.prepare("fashion_mnist", data_dir=data_dir, download=False,
                               log=_log)
  except prepare.PrepareError as error:
    raise QuickstartError(f"data: {error}") from None
  _log(f"data: fashion_mnist in {prepared.data_dir}")


def _stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A training stage's own config, pointed at the quickstart's data directory."""
  stage = ml_collections.ConfigDict(config[name].to_dict())
  stage.data.data_dir = config.data_dir
  return stage


def _finished(workdir: pathlib.Path, total_steps: int) -> bool:
  """True when the stage's final student is saved at its last step."""
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    description = checkpoint.read_description(workdir / "student")
  except checkpoint.ModelDirectoryError:
    return False
  return description.get("source", {}).get("step") == total_steps


def _train_stage(config: ml_collections.ConfigDict, name: str, workdir: pathlib.Path,
                 teacher_dir: pathlib.Path | None = None) -> pathlib.Path:
  from retro_jax.train import loop  # pylint: disable=g-import-not-at-top
  stage = _stage_config(config, f"{name}_stage")
  if teacher_dir is not None:
    stage.teacher.checkpoint = str(teacher_dir)
  stage_dir = workdir / STAGES[name]
  if _finished(stage_dir, stage.total_steps):
    _log(f"{name}: already trained ({stage_dir / 'student'}); skipped")
    return stage_dir / "student"
  _log(f"{name}: {stage.method} {stage.student.name}, {stage.total_steps} steps of "
       f"{stage.global_batch_size} -> {stage_dir}")
  stage_dir.mkdir(parents=True, exist_ok=True)
  (stage_dir / "config.json").write_text(stage.to_json_best_effort(indent=2, sort_keys=True)
                                         + "\n")
  started = time.perf_counter()
  loop.train(stage, stage_dir)
  _log(f"{name}: trained in {time.perf_counter() - started:.0f} s")
  return stage_dir / "student"


def _initial_student(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
  """The student's network at initialisation (no training): the baseline distillation must beat.

  Random convolutional features are strong on Fashion-MNIST (a k-NN on them scores in the
  70s), so the table shows them next to the trained models.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from retro_jax.models.encoder import EncoderSpec  # pylint: disable=g-import-not-at-top
  from retro_jax.models.encoder import build_encoder  # pylint: disable=g-import-not-at-top
  out = workdir / "student_init"
  if (out / "model.json").is_file():
    return out
  stage = config.student_stage
  spec = EncoderSpec(stage.student.name, stage.student.kwargs.to_dict())
  checkpoint.save_model(out, build_encoder(spec, rngs=nnx.Rngs(stage.seed)), spec,
                        {"input": stage.input.to_dict(),
                         "source": {"format": "retro_jax.quickstart", "method": "none",
                                    "note": "the student's network at initialisation"}},
                        overwrite=True)
  return out


def _evaluate(config: ml_collections.ConfigDict, models: dict[str, pathlib.Path],
              workdir: pathlib.Path) -> list[dict[str, Any]]:
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from retro_jax.evaluate import cli as evaluate_cli  # pylint: disable=g-import-not-at-top
  evaluation = config.evaluation
  out = workdir / "evaluation"
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for role, model_dir in models.items():
    result_file = out / f"{role.replace(' ', '_')}.json"
    if result_file.is_file():
      _log(f"evaluate {role}: already done ({result_file}); skipped")
      rows += json.loads(result_file.read_text())
      continue
    started = time.perf_counter()
    features = tuple(evaluation.features)
    if checkpoint.read_description(model_dir)["encoder"]["head_kind"] is None:
      features = tuple(f for f in features if f != "embedding") or ("backbone",)
    role_rows = evaluate_cli.evaluate_model(
        model_dir, dataset="tfds:fashion_mnist", data_dir=config.data_dir or None,
        train_split=evaluation.train_split, test_split=evaluation.test_split,
        protocols=tuple(evaluation.protocols), features=features,
        image_size=evaluation.image_size,
        linear_epochs=evaluation.linear_epochs, linear_lr=evaluation.linear_lr,
        linear_batch_size=evaluation.linear_batch_size, batch_size=evaluation.batch_size,
        seed=config.seed, log=_log)
    role_rows = [dict(row, model=role) for row in role_rows]
    result_file.write_text(json.dumps(role_rows, indent=2) + "\n")
    _log(f"evaluate {role}: {time.perf_counter() - started:.0f} s")
    rows += role_rows
  return rows


def _export(workdir: pathlib.Path) -> pathlib.Path:
  from retro_jax import export  # pylint: disable=g-import-not-at-top
  out = workdir / "export"
  if (out / "model.json").is_file():
    _log(f"export: already written ({out}); skipped")
    return out
  try:
    export.export(workdir, out, "orbax", overwrite=True)
  except export.ExportError as error:
    raise QuickstartError(f"export: {error}") from None
  _log(f"export: {out}")
  return out


def _table(rows: list[dict[str, Any]]) -> str:
  lines = ["| model | protocol | features | top-1 (%) | top-5 (%) |",
           "| --- | --- | --- | ---: | ---: |"]
  for row in rows:
    top5 = "-" if row.get("top5") is None else f"{row['top5']:.2f}"
    lines.append(f"| {row['model']} | {row['protocol']} | {row['features']} | "
                 f"{row['top1']:.2f} | {top5} |")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Runs (or resumes) every stage; returns {'<model> <protocol> top1': value, ...}."""
  from retro_jax import report  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / STAGES_JSON).write_text(json.dumps({"final": FINAL_STAGE, "stages": STAGES},
                                                indent=2) + "\n")
  _prepare_data(config)
  teacher = _train_stage(config, "teacher", workdir)
  student = _train_stage(config, "student", workdir, teacher_dir=teacher)
  rows = _evaluate(config, {"teacher": teacher, "student": student,
                            "student at init": _initial_student(config, workdir)}, workdir)
  exported = _export(workdir)

  table = _table(rows)
  paths = {"teacher": teacher, "student": student, "export": exported,
           "evaluation": workdir / "evaluation",
           "logs": f"{workdir / STAGES['teacher'] / 'metrics.jsonl'}, "
                   f"{workdir / STAGES['student'] / 'metrics.jsonl'}"}
  report.write_results_report(
      workdir, "retro_jax quickstart: MoCo-v2 teacher -> Retro student on Fashion-MNIST",
      [{k: row[k] for k in ("model", "protocol", "features", "top1", "top5")} for row in rows])
  elapsed = time.perf_counter() - started
  print("\n" + table + "\n", flush=True)
  for name, path in paths.items():
    print(f"{name:>10}: {path}", flush=True)
  print(f"{'report':>10}: {workdir / 'report.md'} (and each stage's report.md)", flush=True)
  print(f"quickstart finished in {elapsed:.0f} s (this invocation)", flush=True)
  return {f"{row['model']} {row['protocol']} {row['features']} top1": float(row["top1"])
          for row in rows}

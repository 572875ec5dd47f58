"""A study: a teacher, students trained from it under several methods and seeds, one table.

`python -m retro_jax.main --config configs/study_fashion_mnist.py --workdir runs/study` (and
the quickstart, configs/quickstart.py, which is a one-seed study) run the stages below
(config.task = 'study'). Each leaves its result in the workdir and is skipped when that result
is already there; training stages resume from their last checkpoint, so an interrupted study
continues where it stopped when the same command runs again.

  1. data      Fashion-MNIST prepared offline into TFDS (Debian's dataset-fashion-mnist)
  2. teacher   the teacher's pretraining (MoCo-v2)               WORKDIR/teacher/
               (no pretrained teacher can be downloaded here; real users convert one)
  3. students  every arm of config.students, for every seed     WORKDIR/<arm>/seed_<s>/
               (the same budget for all: the arms differ only in what the config says)
  4. init      the untrained networks (the student's at every    WORKDIR/init/
               seed, and the teacher's): the baselines to beat
  5. evaluate  k-NN and linear probe of every model               WORKDIR/evaluation/
  6. export    the final arm's seed-0 student (config.export)    WORKDIR/export/
  7. summary   results.md / results.json, plots/, the table on stdout (retro_jax.study_report)

Layout of the config (configs/study_fashion_mnist.py builds one):
  task 'study', title, seed (the teacher's), data_dir, seeds (the students')
  teacher          a training config (recipes.contrastive_config), trained once
  students         {arm: training config}; the teacher's checkpoint is filled in
  final            the arm exported and named "final" in stages.json
  export           whether to export it
  untrained_teacher  whether to evaluate the teacher's network untrained too
  evaluation       train_split, test_split, protocols, features, knn_ks, image_size, linear_*
  diagnostics      metric names summarised per arm (first, minimum, last)

WORKDIR/stages.json names the training stages, so `python -m retro_jax.export --workdir
WORKDIR` exports the final student (`--stage teacher` or another arm's name: its seed 0).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import ml_collections

from retro_jax import storage
from retro_jax.export import STAGES_JSON  # the file `export` reads (export imports no JAX)
from retro_jax.user_errors import UserError

TEACHER = "teacher"
TIMINGS_JSON = "timings.json"


class StudyError(UserError, ValueError):
  """A stage cannot run (data missing and not preparable, a broken earlier stage)."""


def _log(message: str) -> None:
  print(f"[study] {message}", flush=True)


def student_dir(arm: str, seed: int) -> str:
  """The run directory of one arm and seed, relative to the study's workdir."""
  return f"{arm}/seed_{seed}"


class Timings:
  """Wall time of every stage, kept in WORKDIR/timings.json across resumed invocations."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / TIMINGS_JSON
    self.values: dict[str, float] = (json.loads(self.path.read_text())
                                     if self.path.is_file() else {})

  def record(self, name: str, seconds: float) -> None:
    # A resumed stage adds its time to what the interrupted invocation spent.
    self.values[name] = self.values.get(name, 0.0) + seconds
    self.path.write_text(json.dumps(self.values, indent=2, sort_keys=True) + "\n")


def _prepare_data(config: ml_collections.ConfigDict) -> None:
  from retro_jax.data import prepare  # pylint: disable=g-import-not-at-top
  try:
    prepared = prepare.prepare("fashion_mnist", data_dir=config.data_dir or None,
                               download=False, log=_log)
  except prepare.PrepareError as error:
    raise StudyError(f"data: {error}") from None
  _log(f"data: fashion_mnist in {prepared.data_dir}")


def _finished(run_dir: pathlib.Path, total_steps: int) -> bool:
  """True when the run's final student is saved at its last step."""
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    description = checkpoint.read_description(run_dir / "student")
  except checkpoint.ModelDirectoryError:
    return False
  return description.get("source", {}).get("step") == total_steps


def train_stage(stage: ml_collections.ConfigDict, name: str, run_dir: pathlib.Path,
                timings: Timings, *, allow_config_change: bool = False) -> pathlib.Path:
  """Trains (or resumes, or skips) one training config in `run_dir`; returns its student.

  The stage keeps its own record (`loop.train`: run_dir/config.json, config_changes.jsonl)."""
  from retro_jax.train import loop  # pylint: disable=g-import-not-at-top
  if _finished(run_dir, stage.total_steps):
    _log(f"{name}: already trained ({run_dir / 'student'}); skipped")
    return run_dir / "student"
  _log(f"{name}: {stage.method} {stage.student.name}, {stage.total_steps} steps of "
       f"{stage.global_batch_size}, seed {stage.seed} -> {run_dir}")
  started = time.perf_counter()
  loop.train(stage, run_dir, allow_config_change=allow_config_change)
  elapsed = time.perf_counter() - started
  timings.record(name, elapsed)
  _log(f"{name}: trained in {elapsed:.0f} s")
  return run_dir / "student"


def _stage_config(stage: ml_collections.ConfigDict, config: ml_collections.ConfigDict, *,
                  seed: int, teacher: pathlib.Path | None) -> ml_collections.ConfigDict:
  """A copy of `stage` at `seed`, on the study's data directory, with its teacher filled in."""
  stage = ml_collections.ConfigDict(stage.to_dict())
  stage.seed = seed
  stage.data.data_dir = config.data_dir
  if teacher is not None:
    stage.teacher.checkpoint = str(teacher)
  return stage


def untrained_model(stage: ml_collections.ConfigDict, seed: int,
                    out: pathlib.Path) -> pathlib.Path:
  """`stage`'s student backbone at initialisation: its architecture and initialisation
  scheme drawn with `seed` (not the training run's own draw, which splits its keys otherwise)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from retro_jax.models.encoder import EncoderSpec  # pylint: disable=g-import-not-at-top
  from retro_jax.models.encoder import build_encoder  # pylint: disable=g-import-not-at-top
  if (out / "model.json").is_file():
    return out
  spec = EncoderSpec(stage.student.name, stage.student.kwargs.to_dict())
  checkpoint.save_model(out, build_encoder(spec, rngs=nnx.Rngs(seed)), spec,
                        {"input": stage.input.to_dict(),
                         "source": {"format": "retro_jax.study", "method": "none",
                                    "seed": seed, "note": "the network at initialisation"}},
                        overwrite=True)
  return out


def evaluate_models(config: ml_collections.ConfigDict, models: dict[str, pathlib.Path],
                    workdir: pathlib.Path, timings: Timings) -> dict[str, list[dict[str, Any]]]:
  """{label: evaluation rows} for each model directory, each kept in evaluation/LABEL.json."""
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from retro_jax.evaluate import cli as evaluate_cli  # pylint: disable=g-import-not-at-top
  evaluation = config.evaluation
  out = workdir / "evaluation"
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  for label, model_dir in models.items():
    result_file = out / f"{label.replace('/', '__')}.json"
    if result_file.is_file():
      results[label] = json.loads(result_file.read_text())
      continue
    started = time.perf_counter()
    features = tuple(evaluation.features)
    if checkpoint.read_description(model_dir)["encoder"]["head_kind"] is None:
      features = tuple(f for f in features if f != "embedding") or ("backbone",)
    rows = evaluate_cli.evaluate_model(
        model_dir, dataset="tfds:fashion_mnist", data_dir=config.data_dir or None,
        train_split=evaluation.train_split, test_split=evaluation.test_split,
        protocols=tuple(evaluation.protocols), features=features,
        knn_ks=tuple(evaluation.knn_ks), image_size=evaluation.image_size,
        linear_epochs=evaluation.linear_epochs, linear_lr=evaluation.linear_lr,
        linear_batch_size=evaluation.linear_batch_size, batch_size=evaluation.batch_size,
        seed=config.seed, log=None)
    elapsed = time.perf_counter() - started
    timings.record(f"evaluate {label}", elapsed)
    result_file.write_text(json.dumps(rows, indent=2) + "\n")
    _log(f"evaluate {label}: " + ", ".join(f"{r['protocol']}/{r['features']} {r['top1']:.2f}"
                                            for r in rows) + f" ({elapsed:.0f} s)")
    results[label] = rows
  return results


def _export(workdir: pathlib.Path) -> pathlib.Path:
  from retro_jax import export  # pylint: disable=g-import-not-at-top
  out = workdir / "export"
  if (out / "model.json").is_file():
    _log(f"export: already written ({out}); skipped")
    return out
  try:
    export.export(workdir, out, "orbax", overwrite=True)
  except export.ExportError as error:
    raise StudyError(f"export: {error}") from None
  _log(f"export: {out}")
  return out


def _check(config: ml_collections.ConfigDict) -> None:
  """Refuses a study that names no student or a final arm it does not train."""
  if config.students and not config.seeds:
    raise StudyError("seeds: give at least one student seed")
  if config.final not in config.students and config.final != TEACHER:
    raise StudyError(f"final: {config.final!r} is not one of the students "
                     f"({', '.join(config.students)}) nor {TEACHER!r}")
  for arm, stage in config.students.items():
    if "/" in arm or arm in (TEACHER, "init", "evaluation", "export", "plots"):
      raise StudyError(f"students: {arm!r} cannot name an arm (reserved or a path)")
    if stage.method == "mocov2" and stage.teacher.checkpoint:
      raise StudyError(f"students.{arm}: mocov2 trains without a teacher")
  networks = {(stage.student.name, repr(stage.student.kwargs.to_dict()))
              for stage in config.students.values()}
  if len(networks) > 1:
    raise StudyError(f"students: the arms must train the same network, got {sorted(networks)}")


def _check_rerun(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
                 allow_config_change: bool) -> dict[str, Any] | None:
  """The changes against the study's record in `workdir` (None: its first start); a changed
  training-relevant value is refused unless allowed, since finished stages are not rerun."""
  from retro_jax.train import run_record  # pylint: disable=g-import-not-at-top
  recorded = run_record.recorded_config(workdir)
  if recorded is None:
    return None
  changes = run_record.differences(recorded, run_record.flatten(config))
  run_record.check_changes(changes, allow=allow_config_change,
                           against=f"the study's record in {workdir} (its finished stages are "
                           "not trained again)")
  return changes


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        allow_config_change: bool = False) -> dict[str, float]:
  """Runs (or resumes) every stage; returns {'<label> <protocol> <features> top1': value}.

  A rerun whose config differs from the study's record (WORKDIR/config.json and
  config_changes.jsonl, retro_jax/train/run_record.py) in a training-relevant value is
  refused unless `allow_config_change`; the change is then recorded, and every stage resumes
  or trains with it (finished stages are kept as they are).
  """
  from retro_jax import study_report  # pylint: disable=g-import-not-at-top
  from retro_jax.train import run_record  # pylint: disable=g-import-not-at-top
  started = time.perf_counter()
  _check(config)
  workdir = storage.path(workdir)  # local (absolute) or gs://...
  changes = _check_rerun(config, workdir, allow_config_change=allow_config_change)
  workdir.mkdir(parents=True, exist_ok=True)
  timings = Timings(workdir)
  stages = {TEACHER: TEACHER}
  stages.update({arm: student_dir(arm, config.seeds[0]) for arm in config.students or {}})
  (workdir / STAGES_JSON).write_text(json.dumps({"final": config.final, "stages": stages},
                                                indent=2) + "\n")
  _prepare_data(config)
  if changes is None:  # every check has passed: the study's record
    run_record.write_first(workdir, config)
  else:
    run_record.append_changes(workdir, changes, step=None)

  teacher_stage = _stage_config(config.teacher, config, seed=config.seed, teacher=None)
  teacher = train_stage(teacher_stage, TEACHER, workdir / TEACHER, timings,
                        allow_config_change=allow_config_change)
  models = {TEACHER: teacher}
  runs = {TEACHER: workdir / TEACHER}
  for arm, stage in config.students.items():
    for seed in config.seeds:
      label = student_dir(arm, seed)
      stage_config = _stage_config(stage, config, seed=seed,
                                   teacher=None if stage.method == "mocov2" else teacher)
      models[label] = train_stage(stage_config, label, workdir / label, timings,
                                  allow_config_change=allow_config_change)
      runs[label] = workdir / label
  # The untrained networks: the teacher's (its seed) and the students' (every seed).
  if config.untrained_teacher:
    models["init/teacher"] = untrained_model(teacher_stage, config.seed,
                                             workdir / "init" / "teacher")
  for seed in config.seeds if config.students else ():
    models[f"init/seed_{seed}"] = untrained_model(next(iter(config.students.values())), seed,
                                                  workdir / "init" / f"seed_{seed}")
  results = evaluate_models(config, models, workdir, timings)
  exported = _export(workdir) if config.export else None

  summary = study_report.write(config, workdir, results, runs, timings.values)
  print("\n" + summary.table + "\n", flush=True)
  print(f"{'results':>10}: {summary.markdown}", flush=True)
  print(f"{'plots':>10}: {summary.plots}", flush=True)
  if exported is not None:
    print(f"{'export':>10}: {exported}", flush=True)
  print(f"study finished in {time.perf_counter() - started:.0f} s (this invocation)",
        flush=True)
  return {f"{label} {row['protocol']} {row['features']} top1": float(row["top1"])
          for label, rows in results.items() for row in rows}

"""The training run, top to bottom: devices, teacher, data, model, state, resume, steps, save.

`train(config, workdir)` is what `python -m retro_jax.main` calls. Every check that can fail
on a user's input (batch sizes, queue length, teacher file, data) runs before anything is
compiled; a run restarted with the same command continues from its last readable checkpoint
as if it had never stopped (the data pipeline is addressed by step, the random key by step
too), once the checkpoint's teacher and config match the run's (retro_jax/train/run_record.py).
WORKDIR/config.json is written only after all of that has passed. A loss, gradient norm or
state that stops being finite ends the run before it is saved (retro_jax/train/finite_guard.py).
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from retro_jax import checkpoint
from retro_jax import report
from retro_jax import storage
from retro_jax.data import pipeline as pipeline_lib
from retro_jax.data import sources
from retro_jax.data.presets import Augmentation
from retro_jax.models.encoder import Encoder
from retro_jax.models.encoder import EncoderSpec
from retro_jax.objectives import contrastive
from retro_jax.objectives import dino
from retro_jax.objectives import disco
from retro_jax.objectives import mocov2
from retro_jax.objectives import retro
from retro_jax.objectives import rob_dino
from retro_jax.objectives import rob_ibot
from retro_jax.objectives import rob_msn
from retro_jax.objectives import rob_swav
from retro_jax.train import mesh as mesh_lib
from retro_jax.train import optim
from retro_jax.train import precision
from retro_jax.train import preflight
from retro_jax.train import run_record
from retro_jax.train import step as step_lib
from retro_jax.train import teacher as teacher_lib
from retro_jax.train.contrastive_methods import ContrastiveMethod
from retro_jax.train.finite_guard import FiniteGuard
from retro_jax.train.finite_guard import NonFiniteError
from retro_jax.train.multicrop_methods import METHODS as MULTICROP_METHODS
from retro_jax.train.multicrop_methods import MultiCropMethod
from retro_jax.train.monitor import KnnMonitor
from retro_jax.train.prefetch import DevicePrefetch
from retro_jax.train.progress import Progress
from retro_jax.train.save_timer import SaveTimer
from retro_jax.train.stop_request import StopRequest
from retro_jax.train.stop_request import TrainingStopped
from retro_jax.user_errors import UserError


OBJECTIVE_CONFIGS = {"mocov2": mocov2.Config, "disco": disco.Config, "retro": retro.Config,
                     "dino": dino.Config, "rob_dino": rob_dino.Config,
                     "rob_msn": rob_msn.Config, "rob_swav": rob_swav.Config,
                     "rob_ibot": rob_ibot.Config}


class ConfigError(UserError, ValueError):
  """A config value that cannot work, found before any compute is spent."""


def objective_config(config: ml_collections.ConfigDict):
  """The objective's frozen Config from `config.objective`, unknown keys refused."""
  cls = OBJECTIVE_CONFIGS.get(config.method)
  if cls is None:
    raise ConfigError(f"method: unknown {config.method!r}; expected one of "
                      f"{sorted(OBJECTIVE_CONFIGS)}")
  given = dict(config.objective)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(given) - known)
  if unknown:
    raise ConfigError(f"objective: {unknown} are not options of {config.method}; expected "
                      f"some of {sorted(known)}")
  try:
    return cls(**given)
  except ValueError as error:
    raise ConfigError(f"objective: {error}") from None


def build_method(config: ml_collections.ConfigDict, objective, *, steps_per_epoch: int,
                 total_steps: int) -> ContrastiveMethod | MultiCropMethod:
  """The method object of `config.method` with its objective (`objective_config`) and model
  choices."""
  student = config.student
  if "dtype" in student.kwargs:
    raise ConfigError("student.kwargs.dtype: set the student's precision with student.dtype "
                      "(float32 | bfloat16), which keeps parameters and optimiser state "
                      "float32")
  dtype = student.get("dtype", "float32")
  if dtype not in precision.DTYPES:
    raise ConfigError(f"student.dtype: {dtype!r} is not one of {sorted(precision.DTYPES)}")
  if config.method in MULTICROP_METHODS:
    dino_options = config.get("dino") or {}
    try:
      return MultiCropMethod(
          config.method, objective, student.name, student.kwargs.to_dict(),
          head=student.head.to_dict(), steps_per_epoch=steps_per_epoch,
          total_steps=total_steps, token_drop_ratio=student.get("token_drop_ratio", 0.0),
          teacher_momentum=dino_options.get("teacher_momentum", 0.996),
          freeze_last_layer_epochs=dino_options.get("freeze_last_layer_epochs", 0),
          dtype=dtype)
    except ValueError as error:
      raise ConfigError(f"student: {error}") from None
  adapter_kwargs = student.get("adapter_kwargs")
  bn_groups = student.get("bn_groups", 1)
  if isinstance(bn_groups, bool) or not isinstance(bn_groups, int) or bn_groups < 1:
    raise ConfigError(f"student.bn_groups: {bn_groups!r} is not a positive integer")
  if config.global_batch_size % bn_groups:
    raise ConfigError(f"student.bn_groups: {bn_groups} does not divide global_batch_size "
                      f"{config.global_batch_size} (batch norm runs on bn_groups equal "
                      "slices of the batch)")
  return ContrastiveMethod(config.method, objective, student.name,
                           student.kwargs.to_dict(), head_hidden=student.get("head_hidden") or None,
                           adapter=student.get("adapter", "inverted_residual"),
                           adapter_kwargs=adapter_kwargs.to_dict() if adapter_kwargs else {},
                           bn_groups=bn_groups, dtype=dtype)


def _steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.get("total_steps"):
    return int(config.total_steps)
  return int(round(config.epochs * steps_per_epoch))


@dataclasses.dataclass(frozen=True)
class Engine:
  """What `train` steps with, built from the config (also what benchmarks/retro_step.py times).

  Attributes:
    method: the method object (`build_method`).
    graphdef: the student container's structure.
    state: the fresh `TrainState`, replicated over the mesh.
    teacher_state: the frozen teacher's state, replicated (None without a teacher).
    teacher_identity: what identifies the teacher (recorded in checkpoints).
    schedules: the optimiser's schedules (learning rate, weight decay), for logging.
    step_fn: the jitted `train_step(state, teacher_state, batch)`.
  """
  method: ContrastiveMethod | MultiCropMethod
  graphdef: nnx.GraphDef
  state: step_lib.TrainState
  teacher_state: Any
  teacher_identity: dict[str, Any]
  schedules: Any
  step_fn: Any


def build_engine(config: ml_collections.ConfigDict, objective, augmentation: Augmentation,
                 mesh, *, steps_per_epoch: int, total_steps: int) -> Engine:
  """Method, teacher, student, optimiser, initial state and the jitted step of a run."""
  global_batch = config.global_batch_size
  method = build_method(config, objective, steps_per_epoch=steps_per_epoch,
                        total_steps=total_steps)
  teacher, teacher_identity = teacher_lib.load_teacher(config,
                                                       needs_teacher=method.needs_teacher)

  # Model, optimiser, state.
  model = method.build(teacher, rngs=nnx.Rngs(config.seed))
  model.train()
  tx, schedules = optim.build_optimizer(config.optimizer, steps_per_epoch=steps_per_epoch,
                                        total_steps=total_steps,
                                        global_batch_size=global_batch,
                                        freeze=method.early_freeze)
  trainable = method.trainable_filter()
  graphdef, state = step_lib.init_state(model, trainable, tx,
                                        method.init_state(jax.random.key(config.seed + 2)),
                                        config.seed)
  replicated = mesh_lib.replicated(mesh)
  state = jax.device_put(state, replicated)
  teacher_graphdef, teacher_state = (None, None) if teacher is None else nnx.split(teacher)
  if teacher is not None:
    teacher_state = teacher_lib.cast_state(teacher_state, config.teacher.get("dtype", "float32"))
  teacher_state = jax.device_put(teacher_state, replicated)
  step_fn = step_lib.jit_train_step(
      step_lib.make_train_step(method, graphdef, teacher_graphdef, trainable, tx,
                               augmentation.device_views),
      replicated, replicated, mesh_lib.batch_sharding(mesh))
  return Engine(method, graphdef, state, teacher_state, teacher_identity, schedules, step_fn)


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          allow_config_change: bool = False,
          clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
  """Runs (or resumes) the training the config describes; returns the final metrics.

  A resume is refused when the teacher or a training-relevant config value differs from the
  checkpoint's (`run_record`), unless `allow_config_change` (the config only). The run's record
  (config.json, config_changes.jsonl) is written once every check has passed. `clock` times
  `checkpoint_every_minutes` (retro_jax/train/save_timer.py; tests pass a fake one).
  """
  workdir = storage.path(workdir)  # local (absolute) or gs://...
  workdir.mkdir(parents=True, exist_ok=True)

  # Devices and batch layout.
  mesh = mesh_lib.make_mesh()
  global_batch = config.global_batch_size
  mesh_lib.check_global_batch(global_batch, mesh)
  objective = objective_config(config)
  if hasattr(objective, "queue_size"):
    contrastive.check_queue_size(objective.queue_size, global_batch)

  # Data, method, teacher.
  augmentation = Augmentation.from_config(config.data.augmentation)
  source = sources.open_source(config.data.dataset, config.data.get("split") or None,
                               config.data.get("data_dir") or None)
  if source.num_examples < global_batch:
    raise ConfigError(f"data: {source} has {source.num_examples} examples, fewer than one "
                      f"global batch of {global_batch}")
  steps_per_epoch = source.num_examples // global_batch
  total_steps = _steps(config, steps_per_epoch)
  preflight.check(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  engine = build_engine(config, objective, augmentation, mesh,
                        steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  method, graphdef, state = engine.method, engine.graphdef, engine.state
  teacher_state, teacher_identity = engine.teacher_state, engine.teacher_identity
  print(f"parameters: trainable {step_lib.count_parameters(state.trainable):,}, other "
        f"student state {step_lib.count_parameters(state.rest):,}, teacher (frozen) "
        f"{0 if teacher_state is None else step_lib.count_parameters(teacher_state):,}",
        flush=True)

  checkpoints = checkpoint.TrainCheckpoints(workdir, every_steps=config.checkpoint_every_steps,
                                            keep=config.keep_checkpoints)
  resume_record = run_record.ResumeRecord(config, allow_change=allow_config_change)

  def check_resume(step: int, record: dict[str, Any]) -> None:
    """Refuses a checkpoint of another teacher or config before any of its arrays is read."""
    _check_teacher(record.get("teacher"), teacher_identity, checkpoints.directory / str(step))
    resume_record.check(step, record)

  start_step = 0
  resumed = checkpoints.restore_newest(state, check_resume)  # the fresh state's shapes
  if resumed is not None:
    state, record = resumed
    start_step = int(record["step"])
    print(f"resuming from step {start_step} ({checkpoints.directory})", flush=True)

  # The next batch is read and placed while the current step runs (train/prefetch.py).
  batches = DevicePrefetch(pipeline_lib.make_pipeline(
      source, augmentation.host_views, global_batch_size=global_batch, seed=config.seed,
      sharding=mesh_lib.batch_sharding(mesh), start_step=start_step,
      process_invariant=config.data.get("process_invariant", False),
      shuffle_buffer=config.data.get("shuffle_buffer", pipeline_lib.DEFAULT_SHUFFLE_BUFFER)),
      count=max(0, total_steps - start_step))

  step_fn = engine.step_fn

  monitor = None
  if config.get("monitor") and config.monitor.every_steps > 0:
    monitor = KnnMonitor(config.monitor, config.data, method, graphdef,
                         mesh_lib.batch_sharding(mesh))
  # Every check has passed: the run's record, then its logs.
  if jax.process_index() == 0:
    resume_record.write(workdir, start_step)
  progress = Progress(workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                      global_batch=global_batch, every=config.log_every_steps,
                      schedules=engine.schedules)
  guard = FiniteGuard(engine.schedules, checkpoints.latest_step, start_step=start_step)
  # Several processes ask process 0's clock on log steps only (one broadcast each).
  timer = SaveTimer(config.get("checkpoint_every_minutes") or 0, clock=clock,
                    check_every=1 if jax.process_count() == 1 else config.log_every_steps)
  config_record = run_record.checkpoint_fields(config)
  metrics: dict[str, Any] = {}
  # SIGTERM / SIGINT: the step being trained is saved, then the run stops (stop_request.py);
  # several processes agree on the step through JAX's preemption sync point instead.
  with StopRequest(install=jax.process_count() == 1) as stop:
    try:
      for step in range(start_step, total_steps):
        batch = next(batches)
        started = time.perf_counter()
        state, metrics = step_fn(state, teacher_state, batch)
        if step == start_step:
          jax.block_until_ready(metrics)
          print(f"first step (compile + run): {time.perf_counter() - started:.1f} s", flush=True)
        done = step + 1
        stopping = stop.requested or checkpoints.reached_preemption(done)
        timed = timer.due(done)  # every step on every process: its checks can be collective
        forced = done == total_steps or stopping or timed
        save = checkpoints.due(done, force=forced)
        # Metrics leave the device only at log and checkpoint steps; NaN/inf stop the run there,
        # and a state is checked before it is saved (retro_jax/train/finite_guard.py).
        if save or progress.due(done):
          metrics = jax.device_get(metrics)
          try:
            guard.check_metrics(done, metrics)
            if save:
              guard.check_state(done, state, metrics)
          except NonFiniteError:
            progress.update(done, metrics, skipped=batches.skipped_count)  # in the log too
            raise
        if monitor is not None and monitor.due(done, total_steps):
          metrics = dict(metrics, **monitor.evaluate(state))
        progress.update(done, metrics, skipped=batches.skipped_count)
        record = {"step": done, "teacher": teacher_identity, **config_record,
                  "data": {"epoch": done // steps_per_epoch, "skipped": batches.skipped}}
        if checkpoints.save(done, state, record, force=forced):
          timer.saved(done)
        if stopping and done < total_steps:
          checkpoints.wait()
          raise TrainingStopped(stop.signum or signal.SIGTERM, done,
                                str(checkpoints.directory / str(done)))
    finally:
      checkpoints.close()
      progress.close()

  _save_student(workdir, method, graphdef, state, config)
  if jax.process_index() == 0:  # only process 0 logs metrics
    try:
      print(f"report: {report.write_report(workdir)}", flush=True)
    except report.ReportError as error:
      print(f"report: not written: {error}", flush=True)
  return {k: float(v) for k, v in metrics.items()}


def _check_teacher(recorded: Any, identity: dict[str, Any], where: pathlib.Path) -> None:
  """Refuses to resume checkpoint `where` with a teacher other than the one it was trained with."""
  if isinstance(recorded, dict) and "content_sha256" not in recorded and (
      "content_sha256" in identity):
    identity = {k: v for k, v in identity.items() if k != "content_sha256"}
    print(f"teacher: checkpoint {where} predates teacher content hashes: the teacher's "
          "directory is checked by path, not by content", flush=True)
  if recorded == identity:
    return
  if (isinstance(recorded, dict) and recorded.get("checkpoint") == identity.get("checkpoint")
      and recorded.get("content_sha256") != identity.get("content_sha256")):
    raise ConfigError(
        f"the teacher directory {identity['checkpoint']} changed since checkpoint {where} was "
        f"written (content SHA-256 {str(recorded.get('content_sha256'))[:12]}... then, "
        f"{str(identity.get('content_sha256'))[:12]}... now): restore the teacher it was "
        "trained with, or start a new run in a new --workdir")
  raise ConfigError(f"checkpoint {where} was trained with teacher {recorded}, this run has "
                    f"{identity}; use a new workdir or the original teacher")


def _save_student(workdir: pathlib.Path, method: ContrastiveMethod | MultiCropMethod, graphdef,
                  state, config: ml_collections.ConfigDict) -> None:
  """The trained backbone and its projection head as a model directory.

  This is what `embed`, `export` (backbone only by default) and evaluation load; a MoCo-v2
  run's student, head included, is a teacher for a later Retro or DisCo run.
  """
  model = nnx.merge(graphdef, state.trainable, state.rest)
  head, head_kind, head_kwargs = method.export_head(model)
  spec = EncoderSpec(config.student.name, config.student.kwargs.to_dict(), head_kind,
                     head_kwargs)
  out = workdir / "student"
  checkpoint.save_model(out, Encoder(method.export_backbone(model), head), spec,
                        {"source": {"format": "retro_jax.train", "method": config.method,
                                    "workdir": str(workdir), "step": int(state.step)},
                         "input": config.input.to_dict()}, overwrite=True)
  print(f"student (backbone + {head_kind} head): {out}", flush=True)

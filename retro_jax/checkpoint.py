"""Model directories on disk: an Orbax checkpoint of the weights plus a JSON description.

Every Orbax call of the project lives in this module. A model directory (a converted teacher,
an exported student) holds

  model.json   what the model is: its `EncoderSpec`, feature width, input normalisation, where
               it came from (format, file, SHA-256);
  state/       an Orbax checkpoint of its parameters and batch statistics (nothing else:
               no RNG state, no optimiser).

`load_model` rebuilds the module from the spec and restores the weights into it, so a model
directory needs no pickled code and loads with one call; `content_digest` fingerprints its
files (what identifies a teacher on resume).

A training run keeps its own checkpoints (`TrainCheckpoints`): WORKDIR/checkpoints/STEP/ holds
the whole training state (a pytree of arrays: student, adapter, EMA, optimiser, queue, step,
RNG) and a JSON record: the step and data position, the teacher's identity (its directory,
the SHA-256 of the file it was converted from, the SHA-256 of the directory's content), the
resolved config and the SHA-256 of its training-relevant part (`config_hash`,
retro_jax/train/run_record.py). The record is read back before any array, so a resume can
refuse a changed teacher or config before spending compute. A resume takes the newest
checkpoint that can be read; an unreadable one (truncated or corrupted files) is set aside in
WORKDIR/checkpoints_corrupt/STEP with a message (`TrainCheckpoints.restore_newest`).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import orbax.checkpoint as ocp

from retro_jax import distributed
from retro_jax import storage
from retro_jax.models.encoder import Encoder
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder
from retro_jax.models.encoder import materialize_rng_state
from retro_jax.user_errors import UserError

MODEL_JSON = "model.json"
STATE_DIR = "state"
FORMAT = "retro_jax.model"
FORMAT_VERSION = 1


class ModelDirectoryError(UserError, ValueError):
  """A model directory is missing, incomplete or not one of ours."""


@functools.cache  # once per process: it replaces Orbax's registered jax.Array handler
def _save_replicated_arrays_whole() -> None:
  """On CPU, a replicated array is saved whole by its first replica (Orbax's replica-parallel
  saving off; Orbax already turns it off when JAX_PLATFORMS names a GPU).

  Replica-parallel saving splits each replicated array into one slice per replica. CPU devices
  share the host's memory, so the split saves no transfer, and each slice is a compiled
  program per array shape and device: 496 compiles and ~17 s at the first save of a narrow
  MobileNetV3 run on 8 simulated CPU devices. Checkpoints restore the same arrays either way.
  """
  if jax.default_backend() != "cpu":
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      use_replica_parallel=False,
      # The default handler's per-array metadata files, kept (None if Orbax renames it).
      array_metadata_store=getattr(default, "_array_metadata_store", None)), override=True)


def _weights(model: nnx.Module) -> nnx.State:
  return nnx.state(model, (nnx.Param, nnx.BatchStat))  # One filter: their union.


def save_model(directory: str | pathlib.Path, model: Encoder, spec: EncoderSpec,
               description: dict[str, Any], *, overwrite: bool = False) -> pathlib.Path:
  """Writes `model` and its description to `directory` (created; must be new unless overwrite).

  Args:
    directory: the model directory to write.
    model: the encoder whose parameters and batch statistics are saved.
    spec: what rebuilds `model`.
    description: extra JSON-ready facts (input mean/std, source, head summary, ...).
    overwrite: replace an existing directory's checkpoint instead of refusing.
  """
  directory = storage.path(directory)
  # The Orbax save is collective: every process of a multi-process run calls this, and all
  # refuse together (one process raising alone would leave the others waiting in the save).
  occupied = directory.exists() and any(directory.iterdir()) and not overwrite
  if any(distributed.values_of_all_processes(occupied)):
    raise ModelDirectoryError(f"{directory} exists and is not empty; choose a new directory "
                              "or pass overwrite=True (--overwrite)")
  directory.mkdir(parents=True, exist_ok=True)
  _save_replicated_arrays_whole()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / STATE_DIR, _weights(model), force=overwrite)
  document = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": spec.to_json(),
              "feature_width": int(model.feature_width), **description}
  # The JSON is written last (by process 0): a directory with model.json has a complete
  # checkpoint; every process returns once it is there.
  if jax.process_index() == 0:
    (directory / MODEL_JSON).write_text(json.dumps(document, indent=2) + "\n")
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes("retro_jax_save_model_json")
  return directory


def read_description(directory: str | pathlib.Path) -> dict[str, Any]:
  """The parsed model.json of a model directory, with clear errors for anything else."""
  directory = storage.path(directory)
  path = directory / MODEL_JSON
  if directory.is_file():
    raise ModelDirectoryError(
        f"{directory} is a file, not a retro_jax model directory; a PyTorch checkpoint must be "
        f"converted first: python -m retro_jax convert --src {directory} --format "
        "torchvision|timm|moco|dino --arch ARCH --out MODEL_DIR")
  if not directory.is_dir():
    raise ModelDirectoryError(f"no model directory at {directory}")
  if not path.is_file():
    raise ModelDirectoryError(f"{directory} is not a retro_jax model directory: no {MODEL_JSON} "
                              "(was the conversion or export interrupted?)")
  try:
    document = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
    raise ModelDirectoryError(f"{path} is not valid JSON: {error}") from None
  if not isinstance(document, dict) or document.get("format") != FORMAT:
    found = document.get("format") if isinstance(document, dict) else type(document).__name__
    raise ModelDirectoryError(f"{path} does not describe a retro_jax model "
                              f"(format {found!r})")
  if document.get("format_version", 0) > FORMAT_VERSION:
    raise ModelDirectoryError(f"{path} has format version {document['format_version']}; this "
                              f"retro_jax reads up to {FORMAT_VERSION}: upgrade retro_jax")
  return document


def load_model(directory: str | pathlib.Path) -> tuple[Encoder, dict[str, Any]]:
  """Rebuilds the model saved in `directory`; returns it (eval mode) and its description."""
  directory = storage.path(directory)
  document = read_description(directory)
  try:
    model = abstract_encoder(EncoderSpec.from_json(document["encoder"]))
  except (KeyError, TypeError, ValueError) as error:  # a damaged or hand-edited model.json
    raise ModelDirectoryError(f"{directory / MODEL_JSON}: its \"encoder\" entry does not "
                              f"describe a model ({type(error).__name__}: {error})") from None
  # Shapes and dtypes only, placed on one local device: the model loads on any machine,
  # whatever the device layout of the run that saved it (a multi-host run included).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        _weights(model))
  silence_abandoned_reads()  # Before: the leftovers of a failed read may come at once.
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory / STATE_DIR, target)
  # Orbax raises a bare Exception around TensorStore's errors (a truncated or corrupted file:
  # OUT_OF_RANGE, DATA_LOSS, ...); whatever fails here is the directory's content.
  except Exception as error:  # pylint: disable=broad-except
    reason = read_error_reason(error)
  else:
    reason = None
  if reason is not None:
    # Collects the abandoned reads' coroutines now (the exception that held them is gone),
    # under the filter: pytest, for one, puts its own sys.unraisablehook back after a test.
    gc.collect()
    raise ModelDirectoryError(
        f"could not restore the weights in {directory / STATE_DIR} (missing, truncated or "
        f"corrupted files?): {reason}. Convert or export the model again into a new "
        "directory.")
  # Uncommitted, as a freshly built model's arrays: a multi-process run can then replicate
  # them over every process's devices (from a committed single-device array, jax.device_put
  # would need a cross-host transfer, which the CPU and GPU backends refuse).
  nnx.update(model, jax.tree.map(lambda array: jnp.asarray(np.asarray(array)), restored))
  materialize_rng_state(model)
  model.eval()
  return model, document


def read_error_reason(error: BaseException, limit: int = 300) -> str:
  """The first line of the innermost cause of a failed Orbax read (TensorStore's own words).

  Orbax wraps TensorStore's errors in exceptions whose text is the whole TensorStore spec
  (~100 lines); the cause at the bottom of the chain says what is wrong, e.g. `OUT_OF_RANGE:
  Error reading "head.0.kernel.value/0.0" ... Requested byte range [19010, 20952) is not valid
  for value of size 1000`.
  """
  seen = {id(error)}
  while (cause := error.__cause__ or error.__context__) is not None and id(cause) not in seen:
    seen.add(id(cause))
    error = cause
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0].rstrip('.')}" if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_abandoned_read(unraisable) -> bool:
  """Whether an unraisable exception is the leftover of an Orbax read that failed.

  When one array of a restore fails, Orbax closes its event loop with the other reads still
  in flight: as they finish, TensorStore's callbacks meet the closed loop ("Event loop is
  closed") and the abandoned coroutines raise when collected. Both go to sys.unraisablehook,
  whose default prints a traceback per array, after the clear error was already reported.
  """
  value, obj = unraisable.exc_value, unraisable.object
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def silence_abandoned_reads() -> None:
  """Drops the leftovers of a failed Orbax read (`_is_abandoned_read`) from then on.

  Installed once, before the first restore; every other unraisable exception still reaches
  the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_retro_jax_filter", False):
    return

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook._retro_jax_filter = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def content_digest(directory: str | pathlib.Path) -> str:
  """SHA-256 over every file of a model directory (relative path and content).

  It is what identifies a teacher's weights on resume: the same directory rewritten with other
  weights (or another model.json) is another teacher. Reading everything is cheap next to
  loading: 0.07 s for a ResNet-50 directory (103 MB in 15 files, page cache warm) against
  1.25 s for `load_model` of it, on the 2-core CPU of the tests.
  """
  directory = storage.path(directory)
  digest = hashlib.sha256()
  for name in storage.files(directory):
    content = hashlib.sha256()
    with (directory / name).open("rb") as file:  # Chunks: TF's GFile has no readinto.
      while chunk := file.read(1 << 20):
        content.update(chunk)
    digest.update(f"{name}\0{content.hexdigest()}\n".encode())
  return digest.hexdigest()


def _is_key(leaf: Any) -> bool:
  return (isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))
          and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key))


def _keys_as_data(tree: Any) -> Any:
  """Typed PRNG keys (NNX's RNG streams, the run key) as their raw uint32 data for Orbax."""
  def convert(leaf):
    if not _is_key(leaf):
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, leaf)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=leaf.sharding)
    return jax.random.key_data(leaf)
  return jax.tree.map(convert, tree)


def _restore_key(target: Any, restored: Any) -> Any:
  if not _is_key(target):
    return restored
  return jax.random.wrap_key_data(restored, impl=target.dtype._impl)  # pylint: disable=protected-access


def _as_abstract(leaf: Any) -> Any:
  """A live array's shape, dtype and sharding (what a restore fills in); others unchanged."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


class TrainCheckpointError(UserError, RuntimeError):
  """A training checkpoint cannot be written or read back."""


class UnreadableCheckpointError(TrainCheckpointError):
  """A checkpoint whose files cannot be read (truncated, corrupted, missing), as opposed to one
  that does not match the run's state."""

  def __init__(self, directory: pathlib.Path, step: int, what: str, error: BaseException):
    self.step = step
    self.reason = f"{what}: {read_error_reason(error)}"
    super().__init__(f"checkpoint {directory / str(step)} cannot be read ({self.reason})")


# Orbax writes a checkpoint as STEP.orbax-checkpoint-tmp-TIME and renames it once complete.
_UNFINISHED_SAVE = "*.orbax-checkpoint-tmp*"


def _array_layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{dotted path: (shape, dtype)} of a pytree of arrays or of Orbax's array metadata (Orbax
  saves a pytree as nested dicts, so a state and its checkpoint's metadata name alike)."""
  def name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
  return {name(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class TrainCheckpoints:
  """The checkpoints of one training run, in `WORKDIR/checkpoints`, by Orbax's manager.

  Saves are asynchronous (training goes on while the arrays are written) and atomic (a step
  directory appears only once complete), so a run killed mid-save resumes from the previous
  checkpoint; the unfinished save it leaves (`STEP.orbax-checkpoint-tmp-*`, which Orbax never
  lists) is removed, with a message, when the run starts again. Every `every_steps` steps and
  the final step are kept until `keep` newer ones exist. The directory is created by the first
  save, so a run that fails its checks leaves none. Use it as a context manager, or call
  `close()`: pending writes finish before exit.

  `restore_newest` resumes from the newest checkpoint that can be read: one whose files are
  truncated or corrupted is skipped and, once an older one is restored, moved to
  WORKDIR/checkpoints_corrupt/STEP (kept for inspection, out of Orbax's sight), with a message.
  A checkpoint that reads but does not fit the run's state (another model or queue size) is an
  error, never moved.
  """

  STATE, RECORD = "state", "record"
  SET_ASIDE = "checkpoints_corrupt"

  def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, keep: int = 2,
               async_save: bool = True):
    if every_steps <= 0 or keep <= 0:
      raise ValueError(f"every_steps and keep must be positive, got {every_steps} and {keep}")
    self.directory = storage.path(workdir) / "checkpoints"
    self.set_aside_directory = self.directory.parent / self.SET_ASIDE
    self.every_steps = every_steps
    unfinished = (sorted(p.name for p in self.directory.glob(_UNFINISHED_SAVE))
                  if self.directory.is_dir() else [])
    if unfinished and jax.process_index() == 0:
      print(f"checkpoints: removing the unfinished save{'s' if len(unfinished) > 1 else ''} "
            f"of an interrupted run in {self.directory} ({', '.join(unfinished)}); the "
            "complete checkpoints are kept", file=sys.stderr, flush=True)
    _save_replicated_arrays_whole()
    # The step grid is decided here (Orbax would also save the first step of a run).
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, create=False, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    # The handlers are named so that a fresh manager reads a checkpoint's metadata.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={self.STATE: ocp.StandardCheckpointHandler(),
                       self.RECORD: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None for a fresh run."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def due(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, ..., force=force)` would start a save."""
    return (force or not step % self.every_steps) and step not in self.all_steps()

  def reached_preemption(self, step: int) -> bool:
    """Whether the processes of a multi-process run agreed to save `step` after one of them got
    SIGTERM (JAX's preemption sync point, asked at every step); always False in one process,
    where retro_jax.train.stop_request handles the signals."""
    return jax.process_count() > 1 and self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, record: dict[str, Any], *, force: bool = False) -> bool:
    """Starts writing `state` (arrays only) and `record` (JSON-ready) as checkpoint `step`.

    Returns whether a save was started: steps off the `every_steps` grid are skipped unless
    `force` (the final step is saved with force=True), and so is a step saved already (e.g.
    the final step fell on the grid).
    """
    if not self.due(step, force=force):
      return False
    self.directory.mkdir(parents=True, exist_ok=True)
    args = ocp.args.Composite(**{self.STATE: ocp.args.StandardSave(_keys_as_data(state)),
                                 self.RECORD: ocp.args.JsonSave(record)})
    return self._manager.save(step, args=args, force=True)

  def read_record(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of checkpoint `step` (default: the latest), without reading arrays."""
    step = self._step(step)
    args = ocp.args.Composite(**{self.RECORD: ocp.args.JsonRestore()})
    try:
      return dict(self._manager.restore(step, args=args)[self.RECORD])
    except Exception as error:  # pylint: disable=broad-except  (Orbax: JSON, OS, bare errors)
      raise UnreadableCheckpointError(self.directory, step, "its record", error) from None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Checkpoint `step` (default: the latest) read into the shapes, dtypes and shardings of
    `abstract_state` (a pytree of jax.ShapeDtypeStruct, e.g. from jax.eval_shape, or arrays).

    Raises:
      TrainCheckpointError: the checkpoint's arrays are not the state's (names, shapes or
        dtypes); UnreadableCheckpointError (a subclass): its files cannot be read.
    """
    step = self._step(step)
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    target = _keys_as_data(abstract_state)
    # The layout first, from the checkpoint's metadata: a state of another shape is the run's
    # mistake, while a failure to read arrays of the right layout is the files' fault.
    try:
      saved = _array_layout(self._manager.item_metadata(step)[self.STATE])
    except Exception as error:  # pylint: disable=broad-except
      raise UnreadableCheckpointError(self.directory, step, "its array metadata",
                                      error) from None
    wanted = _array_layout(target)
    if saved != wanted:
      differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
      raise TrainCheckpointError(
          f"checkpoint {self.directory / str(step)} does not match this run's state (was the "
          f"config changed since it was written?): {len(differ)} array(s) differ, e.g. "
          f"{differ[0]}: {saved.get(differ[0], 'absent')} in the checkpoint, "
          f"{wanted.get(differ[0], 'absent')} in this run")
    args = ocp.args.Composite(**{self.STATE: ocp.args.StandardRestore(target),
                                 self.RECORD: ocp.args.JsonRestore()})
    silence_abandoned_reads()  # the leftovers of a failed read would print tracebacks
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as error:  # pylint: disable=broad-except  (TensorStore: bare Exception)
      raise UnreadableCheckpointError(self.directory, step, "its arrays", error) from None
    state = jax.tree.map(_restore_key, abstract_state, restored[self.STATE])
    return state, dict(restored[self.RECORD])

  def restore_newest(self, abstract_state: Any,
                     check: Callable[[int, dict[str, Any]], None] | None = None
                     ) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that can be read, restored (`restore`); None without checkpoints.

    `check(step, record)` sees each candidate's record before any of its arrays is read and
    raises to refuse the resume (nothing is moved then). Unreadable newer checkpoints are set
    aside once an older one is restored; if none can be read, nothing is moved and
    TrainCheckpointError says how to start the run again.
    """
    self._check_processes_agree()
    unreadable: list[UnreadableCheckpointError] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        record = self.read_record(step)
        if check is not None:
          check(step, record)
        restored = self.restore(abstract_state, step)
      except UnreadableCheckpointError as error:
        unreadable.append(error)
        continue
      self._set_aside(unreadable, resumed=step)
      return restored
    if unreadable:
      reasons = "; ".join(f"step {e.step}: {e.reason}" for e in unreadable)
      raise TrainCheckpointError(
          f"no checkpoint in {self.directory} can be restored ({reasons}); nothing was moved. "
          f"To start this run again from step 0, move {self.directory} elsewhere and rerun the "
          "same command, or use a new --workdir")
    return None

  def _check_processes_agree(self) -> None:
    """Refuses a multi-process resume whose processes see different newest checkpoints.

    Each host reading its own local disk would restore different states (or some none) and
    then hang in the first collective; the workdir must be storage all processes share.
    """
    newest = self.latest_step()
    steps = distributed.values_of_all_processes(-1 if newest is None else newest)
    if len(set(steps)) == 1:
      return
    this = jax.process_index()
    other = next(i for i, step in enumerate(steps) if step != steps[this])

    def name(step: int) -> str:
      return "none" if step < 0 else f"step {step}"

    raise TrainCheckpointError(
        f"the processes disagree on the latest checkpoint in {self.directory}: "
        f"{name(steps[this])} on process {this}, {name(steps[other])} on process {other}; "
        "every process must see the same workdir: put it on storage all hosts share (gs://... "
        "or a shared filesystem), not on each host's local disk")

  def _set_aside(self, unreadable: list[UnreadableCheckpointError], *, resumed: int) -> None:
    """Moves unreadable checkpoints to WORKDIR/checkpoints_corrupt (process 0; all wait)."""
    if not unreadable:
      return
    if jax.process_index() == 0:
      for error in unreadable:
        target = self.set_aside_directory / str(error.step)
        copy = 1
        while target.exists():  # set aside before: keep both
          copy += 1
          target = self.set_aside_directory / f"{error.step}.{copy}"
        target.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(error.step)).rename(target)
        print(f"checkpoint {error.step} cannot be restored ({error.reason}); moved to "
              f"{target}; resuming from step {resumed}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("retro_jax_set_aside_checkpoints")
    self._manager.reload()

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self.all_steps():
      raise TrainCheckpointError(f"no checkpoint {'' if step is None else step} in "
                                 f"{self.directory}; have {self.all_steps()}")
    return step

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> TrainCheckpoints:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

"""Model directories on disk: an Orbax checkpoint of the weights plus a JSON description.

Every Orbax call of the project lives in this module. A model directory (a converted teacher,
an exported student) holds

  model.json   what the model is: its `EncoderSpec`, feature width, input normalisation, where
               it came from (format, file, SHA-256);
  state/       an Orbax checkpoint of its parameters and batch statistics (nothing else:
               no RNG state, no optimiser).

`load_model` rebuilds the module from the spec and restores the weights into it, so a model
directory needs no pickled code and loads with one call.

A training run keeps its own checkpoints (`TrainCheckpoints`): WORKDIR/checkpoints/STEP/ holds
the whole training state (a pytree of arrays: student, adapter, EMA, optimiser, queue, step,
RNG) and a JSON record (data position, teacher file and SHA-256, config hash) that is read
back before any array so a resume can refuse a changed teacher before spending compute.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
from flax import nnx
import orbax.checkpoint as ocp

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
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and any(directory.iterdir()) and not overwrite:
    raise ModelDirectoryError(f"{directory} exists and is not empty; choose a new directory "
                              "or pass overwrite=True (--overwrite)")
  directory.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / STATE_DIR, _weights(model), force=overwrite)
  document = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": spec.to_json(),
              "feature_width": int(model.feature_width), **description}
  # The JSON is written last: a directory with model.json has a complete checkpoint.
  (directory / MODEL_JSON).write_text(json.dumps(document, indent=2) + "\n")
  return directory


def read_description(directory: str | pathlib.Path) -> dict[str, Any]:
  """The parsed model.json of a model directory, with clear errors for anything else."""
  directory = pathlib.Path(directory)
  path = directory / MODEL_JSON
  if not directory.is_dir():
    raise ModelDirectoryError(f"no model directory at {directory}")
  if not path.is_file():
    raise ModelDirectoryError(f"{directory} is not a retro_jax model directory: no {MODEL_JSON} "
                              "(was the conversion or export interrupted?)")
  try:
    document = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ModelDirectoryError(f"{path} is not valid JSON: {error}") from None
  if document.get("format") != FORMAT:
    raise ModelDirectoryError(f"{path} does not describe a retro_jax model "
                              f"(format {document.get('format')!r})")
  if document.get("format_version", 0) > FORMAT_VERSION:
    raise ModelDirectoryError(f"{path} has format version {document['format_version']}; this "
                              f"retro_jax reads up to {FORMAT_VERSION}: upgrade retro_jax")
  return document


def load_model(directory: str | pathlib.Path) -> tuple[Encoder, dict[str, Any]]:
  """Rebuilds the model saved in `directory`; returns it (eval mode) and its description."""
  directory = pathlib.Path(directory).absolute()
  document = read_description(directory)
  model = abstract_encoder(EncoderSpec.from_json(document["encoder"]))
  # Shapes and dtypes only, placed on one local device: the model loads on any machine,
  # whatever the device layout of the run that saved it (a multi-host run included).
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        _weights(model))
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory / STATE_DIR, target)
  except (FileNotFoundError, ValueError) as error:
    raise ModelDirectoryError(f"could not restore the weights in {directory / STATE_DIR}: "
                              f"{error}") from None
  nnx.update(model, restored)
  materialize_rng_state(model)
  model.eval()
  return model, document


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


class TrainCheckpoints:
  """The checkpoints of one training run, in `WORKDIR/checkpoints`, by Orbax's manager.

  Saves are asynchronous (training goes on while the arrays are written) and atomic (a step
  directory appears only once complete), so a run killed mid-save resumes from the previous
  checkpoint. Every `every_steps` steps and the final step are kept until `keep` newer ones
  exist. Use it as a context manager, or call `close()`: pending writes finish before exit.
  """

  STATE, RECORD = "state", "record"

  def __init__(self, workdir: str | pathlib.Path, *, every_steps: int, keep: int = 2,
               async_save: bool = True):
    if every_steps <= 0 or keep <= 0:
      raise ValueError(f"every_steps and keep must be positive, got {every_steps} and {keep}")
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.every_steps = every_steps
    # The step grid is decided here (Orbax would also save the first step of a run).
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None for a fresh run."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, record: dict[str, Any], *, force: bool = False) -> bool:
    """Starts writing `state` (arrays only) and `record` (JSON-ready) as checkpoint `step`.

    Returns whether a save was started: steps off the `every_steps` grid are skipped unless
    `force` (the final step is saved with force=True).
    """
    if step % self.every_steps and not force:
      return False
    if step in self.all_steps():
      return False  # E.g. the final step fell on the grid and is saved already.
    args = ocp.args.Composite(**{self.STATE: ocp.args.StandardSave(_keys_as_data(state)),
                                 self.RECORD: ocp.args.JsonSave(record)})
    return self._manager.save(step, args=args, force=True)

  def read_record(self, step: int | None = None) -> dict[str, Any]:
    """The JSON record of checkpoint `step` (default: the latest), without reading arrays."""
    step = self._step(step)
    args = ocp.args.Composite(**{self.RECORD: ocp.args.JsonRestore()})
    return dict(self._manager.restore(step, args=args)[self.RECORD])

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Checkpoint `step` (default: the latest) read into the shapes, dtypes and shardings of
    `abstract_state` (a pytree of jax.ShapeDtypeStruct, e.g. from jax.eval_shape, or arrays)."""
    step = self._step(step)
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    args = ocp.args.Composite(**{
        self.STATE: ocp.args.StandardRestore(_keys_as_data(abstract_state)),
        self.RECORD: ocp.args.JsonRestore()})
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError) as error:
      raise TrainCheckpointError(
          f"checkpoint {self.directory / str(step)} does not match this run's state (was the "
          f"config changed since it was written?): {error}") from None
    state = jax.tree.map(_restore_key, abstract_state, restored[self.STATE])
    return state, dict(restored[self.RECORD])

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

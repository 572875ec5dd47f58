"""Model directories on disk: an Orbax checkpoint of the weights plus a JSON description.

Every Orbax call of the project lives in this module. A model directory (a converted teacher,
an exported student) holds

  model.json   what the model is: its `EncoderSpec`, feature width, input normalisation, where
               it came from (format, file, SHA-256);
  state/       an Orbax checkpoint of its parameters and batch statistics (nothing else:
               no RNG state, no optimiser).

`load_model` rebuilds the module from the spec and restores the weights into it, so a model
directory needs no pickled code and loads with one call.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from flax import nnx
import orbax.checkpoint as ocp

from retro_jax.models.encoder import Encoder
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder
from retro_jax.models.encoder import materialize_rng_state

MODEL_JSON = "model.json"
STATE_DIR = "state"
FORMAT = "retro_jax.model"
FORMAT_VERSION = 1


class ModelDirectoryError(ValueError):
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
  target = _weights(model)  # Shapes and dtypes only: Orbax reads into them.
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

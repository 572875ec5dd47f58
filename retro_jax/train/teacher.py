"""The frozen teacher of a distillation run: loading, precision, batch-norm mode, forward.

`load_teacher(config)` returns the teacher as an NNX module and what identifies it (its
directory and SHA-256, recorded in every checkpoint and checked on resume). Two settings
change how it runs inside the train step:

  teacher.dtype    'float32' (default) or 'bfloat16': the weights are stored and the forward
                   runs in that precision (half the memory and, on accelerators, about twice
                   the speed); outputs come back as float32.
  teacher.bn_mode  'eval' (default): running statistics, a fixed function of the image.
                   'batch': batch statistics of the (global) batch, as the DisCo/Retro
                   reference code, which leaves its teacher in train mode. The running
                   statistics are not updated (the teacher's state is never written back).

The teacher's state is an argument of the step that is never differentiated, optimised,
donated or saved.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from retro_jax import checkpoint
from retro_jax.models.encoder import Encoder
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BN_MODES = ("eval", "batch")


class TeacherConfigError(ValueError):
  """The teacher section names no teacher, or a setting that does not exist."""


def load_teacher(config: ml_collections.ConfigDict, *, needs_teacher: bool
                 ) -> tuple[Encoder | None, dict[str, Any]]:
  """The frozen teacher in its configured BN mode, and its identity; (None, {}) if unused."""
  if not needs_teacher:
    return None, {}
  teacher_config = config.teacher
  dtype_name = teacher_config.get("dtype", "float32")
  bn_mode = teacher_config.get("bn_mode", "eval")
  if dtype_name not in DTYPES:
    raise TeacherConfigError(f"teacher.dtype: {dtype_name!r} is not one of {sorted(DTYPES)}")
  if bn_mode not in BN_MODES:
    raise TeacherConfigError(f"teacher.bn_mode: {bn_mode!r} is not one of {list(BN_MODES)}")
  if teacher_config.checkpoint:
    teacher, description = checkpoint.load_model(teacher_config.checkpoint)
    source = description.get("source", {})
    identity = {"checkpoint": str(pathlib.Path(teacher_config.checkpoint).absolute()),
                "sha256": source.get("sha256") if isinstance(source, dict) else None,
                "architecture": description["encoder"]["architecture"]}
  elif teacher_config.get("random_spec"):
    # Tests and smoke runs only: a randomly initialised teacher, loudly labelled.
    spec = EncoderSpec.from_json(teacher_config.random_spec.to_dict())
    teacher = build_encoder(spec, rngs=nnx.Rngs(config.seed + 1))
    identity = {"random": spec.to_json(), "seed": config.seed + 1}
    log.warning("teacher: RANDOMLY INITIALISED %s (teacher.random_spec); for smoke tests only",
                spec.architecture)
  else:
    raise TeacherConfigError(f"{config.method} needs a teacher: set teacher.checkpoint to a "
                             "model directory made by `python -m retro_jax convert`")
  teacher.eval()
  if bn_mode == "batch":
    set_batch_norm_mode(teacher, use_running_average=False)
  return teacher, identity


def set_batch_norm_mode(model: nnx.Module, *, use_running_average: bool) -> int:
  """Switches every BatchNorm of `model` (and nothing else); returns how many there are."""
  count = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.BatchNorm):
      module.use_running_average = use_running_average
      count += 1
  return count


def cast_state(state: nnx.State, dtype_name: str) -> nnx.State:
  """The teacher's floating-point arrays in `dtype_name` (integers, e.g. RNG counts, kept)."""
  dtype = DTYPES[dtype_name]

  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, state)


def compute_dtype(teacher: nnx.Module) -> jnp.dtype:
  """The dtype the teacher's weights are stored in (what its inputs are cast to)."""
  leaves = [x for x in jax.tree.leaves(nnx.state(teacher, nnx.Param))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return leaves[0].dtype if leaves else jnp.float32


def as_input(teacher: nnx.Module, images: jax.Array) -> jax.Array:
  """Images in the teacher's precision: a bfloat16 teacher must not be promoted to float32."""
  return images.astype(compute_dtype(teacher))

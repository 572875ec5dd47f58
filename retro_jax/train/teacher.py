"""The frozen teacher of a distillation run: loading, precision, batch-norm mode, forward.

`load_teacher(config)` returns the teacher as an NNX module and what identifies it (its
directory, the SHA-256 of the file it was converted from and the SHA-256 of the directory's
content, `checkpoint.content_digest`), recorded in every checkpoint and checked on resume.
Two settings change how it runs inside the train step:

  teacher.dtype    'float32' (default) or 'bfloat16': the weights are stored and the forward
                   runs in that precision (half the memory and, on accelerators, about twice
                   the speed); outputs come back as float32.
  teacher.bn_mode  'eval' (default): running statistics, a fixed function of the image.
                   'batch': batch statistics of the (global) batch, as the DisCo/Retro
                   reference code, which leaves its teacher in train mode. The running
                   statistics are not updated (the teacher's state is never written back).

The teacher's input. The student's views are normalised with the augmentation's mean/std
(`data.augmentation.views[*].photometric.normalize`, which `config.input` records), but the
teacher was trained on images normalised with its own, which its model directory records
(model.json's "input": {"mean", "std"}, written by `convert` and by a training run's student
export). `as_input` renormalises per channel inside the step, exactly and at the cost of one
multiply-add:

  x_teacher = (x_student * std_s + mean_s - mean_t) / std_t = x_student * scale + shift

(the same as normalising the raw image with the teacher's statistics). It is the identity,
with no op at all, when the two are equal (ImageNet's on both sides, the usual case). The
`TeacherInput` lives on the teacher module as a static attribute (part of its graphdef), so
every method reaches it through `as_input(teacher, images)`, the one place it is applied.
A model directory without recorded statistics: the student's are assumed and a warning says
so; a `teacher.random_spec` teacher (smoke runs) has no statistics of its own and takes the
student's views as they are. The run's teacher identity (checked on resume) records which
statistics were used and where they came from. Recorded statistics of one channel (a
grayscale teacher) apply to all three channels of the RGB views (grayscale data is repeated
to three channels on the host); a teacher built for other than 3 input channels is refused.

The teacher's state is an argument of the step that is never differentiated, optimised,
donated or saved.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from retro_jax import checkpoint
from retro_jax import storage
from retro_jax.data import device_ops
from retro_jax.models.encoder import Encoder
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder
from retro_jax.user_errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BN_MODES = ("eval", "batch")


class TeacherConfigError(UserError, ValueError):
  """The teacher section names no teacher, or a setting that does not exist."""


def load_teacher(config: ml_collections.ConfigDict, *, needs_teacher: bool
                 ) -> tuple[Encoder | None, dict[str, Any]]:
  """The frozen teacher in its configured BN mode, and its identity; (None, {}) if unused.

  The teacher carries its `TeacherInput` (attribute `teacher_input`), which `as_input` applies.
  """
  if not needs_teacher:
    return None, {}
  teacher_config = config.teacher
  dtype_name = teacher_config.get("dtype", "float32")
  bn_mode = teacher_config.get("bn_mode", "eval")
  if dtype_name not in DTYPES:
    raise TeacherConfigError(f"teacher.dtype: {dtype_name!r} is not one of {sorted(DTYPES)}")
  if bn_mode not in BN_MODES:
    raise TeacherConfigError(f"teacher.bn_mode: {bn_mode!r} is not one of {list(BN_MODES)}")
  student = student_normalization(config)
  if teacher_config.checkpoint:
    # Its input checked from model.json before the weights are read.
    description = checkpoint.read_description(teacher_config.checkpoint)
    _check_channels(description["encoder"], teacher_config.checkpoint)
    teacher_input = _checkpoint_input(description, student, teacher_config.checkpoint)
    teacher, description = checkpoint.load_model(teacher_config.checkpoint)
    source = description.get("source", {})
    identity = {"checkpoint": str(storage.path(teacher_config.checkpoint)),
                "sha256": source.get("sha256") if isinstance(source, dict) else None,
                # The directory's content: rewritten in place, it is another teacher.
                "content_sha256": checkpoint.content_digest(teacher_config.checkpoint),
                "architecture": description["encoder"]["architecture"],
                "input": teacher_input.to_json()}
  elif teacher_config.get("random_spec"):
    # Tests and smoke runs only: a randomly initialised teacher, loudly labelled.
    spec = EncoderSpec.from_json(teacher_config.random_spec.to_dict())
    _check_channels(spec.to_json(), "teacher.random_spec")
    teacher = build_encoder(spec, rngs=nnx.Rngs(config.seed + 1))
    identity = {"random": spec.to_json(), "seed": config.seed + 1}
    log.warning("teacher: RANDOMLY INITIALISED %s (teacher.random_spec); for smoke tests only",
                spec.architecture)
    # No statistics of its own: it takes the student's views as they are (the identity).
    teacher_input = None if student is None else TeacherInput(student, student, RANDOM)
    identity["input"] = ({"from": RANDOM} if teacher_input is None
                         else teacher_input.to_json())
  else:
    raise TeacherConfigError(f"{config.method} needs a teacher: set teacher.checkpoint to a "
                             "model directory made by `python -m retro_jax convert`")
  teacher.teacher_input = teacher_input  # static: travels in the graphdef into the step
  teacher.eval()
  if bn_mode == "batch":
    set_batch_norm_mode(teacher, use_running_average=False)
  return teacher, identity


# Where the teacher's statistics came from (recorded in the run's teacher identity).
RECORDED = "recorded in the teacher's model.json"
ASSUMED = "ASSUMED the student's: the teacher's model.json records none"
RANDOM = "the student's (random teacher)"


@dataclasses.dataclass(frozen=True)
class TeacherInput:
  """The student's normalisation of the views and the teacher's; applied by `as_input`.

  Attributes:
    student: the mean/std the views were normalised with.
    teacher: the mean/std the teacher expects.
    source: where `teacher` came from (RECORDED, ASSUMED or RANDOM).
  """
  student: device_ops.Normalize
  teacher: device_ops.Normalize
  source: str

  @property
  def is_identity(self) -> bool:
    return self.student == self.teacher

  def __call__(self, images: jax.Array) -> jax.Array:
    """The views renormalised for the teacher, in float32 (unchanged if the statistics agree)."""
    if self.is_identity:
      return images
    # scale and shift in float64 on the host, one float32 multiply-add on the device.
    std_t = np.asarray(self.teacher.std, np.float64)
    scale = np.asarray(self.student.std, np.float64) / std_t
    shift = (np.asarray(self.student.mean, np.float64) - np.asarray(self.teacher.mean)) / std_t
    images = images.astype(jnp.float32)
    return images * jnp.asarray(scale, jnp.float32) + jnp.asarray(shift, jnp.float32)

  def to_json(self) -> dict[str, Any]:
    return {"mean": list(self.teacher.mean), "std": list(self.teacher.std), "from": self.source}


def _normalization(mean: Any, std: Any, where: str) -> device_ops.Normalize:
  """Per-channel statistics; one channel's (a grayscale teacher's) repeated to three."""
  try:
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) == 1 and len(std) == 1:
      mean, std = mean * 3, std * 3
    return device_ops.Normalize(tuple(mean), tuple(std))
  except (TypeError, ValueError) as error:
    raise TeacherConfigError(f"{where}: input mean/std {mean!r}/{std!r} are not 1 or 3 "
                             f"numbers with positive stds ({error})") from None


def student_normalization(config: ml_collections.ConfigDict) -> device_ops.Normalize | None:
  """The mean/std the run's views are normalised with (None if the config names none).

  Read from the augmentation (what is applied; a view without "normalize" is in [0, 1], i.e.
  mean 0 and std 1), else from `config.input`. Every view must share one normalisation (the
  teacher sees some of them); a `config.input` that disagrees gets a warning, since it is only
  what the exported student records.
  """
  data = config.get("data")
  augmentation = data.get("augmentation") if data is not None else None
  recorded = config.get("input")
  recorded = None if not recorded else _normalization(recorded["mean"], recorded["std"],
                                                      "config.input")
  if augmentation is None:
    return recorded
  found = set()
  for i, view in enumerate(augmentation["views"]):
    try:
      spec = device_ops.PhotometricSpec.from_config(view["photometric"])
    except ValueError as error:
      raise TeacherConfigError(f"data.augmentation.views[{i}].photometric: {error}") from None
    found.add(spec.normalize or device_ops.Normalize((0.0,) * 3, (1.0,) * 3))
  if len(found) != 1:
    raise TeacherConfigError(
        "data.augmentation: the views are normalised differently "
        f"({sorted((n.mean, n.std) for n in found)}); the teacher's input needs one "
        "normalisation of the student's views")
  (student,) = found
  if recorded is not None and recorded != student:
    log.warning("config.input (mean %s, std %s) differs from the views' normalisation (mean "
                "%s, std %s); the teacher's input is renormalised from the views'",
                recorded.mean, recorded.std, student.mean, student.std)
  return student


def _check_channels(encoder: dict[str, Any], where: Any) -> None:
  channels = (encoder.get("backbone_kwargs") or {}).get("in_channels", 3)
  if channels != 3:
    raise TeacherConfigError(f"{where}: the teacher takes {channels}-channel images; the "
                             "student's views are RGB (3 channels; grayscale data is repeated "
                             "to 3 on the host)")


def _checkpoint_input(description: dict[str, Any], student: device_ops.Normalize | None,
                      directory: Any) -> TeacherInput:
  """The teacher's recorded statistics against the student's, or the student's, warned."""
  if student is None:
    raise TeacherConfigError("the run's config names no input normalisation (config.input or "
                             "data.augmentation), so the teacher's input cannot be derived")
  recorded = description.get("input")
  if not recorded:
    log.warning("teacher %s: its model.json records no input mean/std; ASSUMING the "
                "student's (mean %s, std %s). Re-convert it with --mean/--std if it was "
                "trained with others", directory, student.mean, student.std)
    return TeacherInput(student, student, ASSUMED)
  if not isinstance(recorded, dict) or "mean" not in recorded or "std" not in recorded:
    raise TeacherConfigError(f"teacher {directory}: model.json's input {recorded!r} is not "
                             "{'mean': [...], 'std': [...]}")
  teacher = _normalization(recorded["mean"], recorded["std"], f"teacher {directory}")
  teacher_input = TeacherInput(student, teacher, RECORDED)
  if not teacher_input.is_identity:
    log.info("teacher %s: its input is renormalised from the student's mean %s, std %s to its "
             "own mean %s, std %s", directory, student.mean, student.std, teacher.mean,
             teacher.std)
  return teacher_input


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
  """The student's normalised views as the teacher's input: renormalised to the teacher's
  statistics (its `teacher_input`, set by `load_teacher`; none: unchanged), then in the
  teacher's precision (a bfloat16 teacher must not be promoted to float32)."""
  teacher_input = getattr(teacher, "teacher_input", None)
  if teacher_input is not None:
    images = teacher_input(images)
  return images.astype(compute_dtype(teacher))


def uses_batch_statistics(teacher: nnx.Module) -> bool:
  """Whether any BatchNorm of `teacher` normalises with the batch's statistics (bn_mode 'batch')."""
  return any(isinstance(m, nnx.BatchNorm) and not m.use_running_average
             for _, m in nnx.iter_modules(teacher))


def embed_views(teacher: nnx.Module, views) -> list[jax.Array]:
  """The teacher's float32 embeddings of each view (B, D), without gradient.

  With running statistics (bn_mode 'eval') the teacher is a fixed function of each image, so
  the views go through one forward of their concatenation: the same numbers (up to float
  rounding of larger matmuls) for one pass over the weights instead of one per view. In
  bn_mode 'batch' each view is its own forward, normalised by its own batch statistics, as
  the authors' separate calls are.
  """
  if uses_batch_statistics(teacher) or len(views) == 1:
    embeddings = [teacher(as_input(teacher, x)).embedding for x in views]
  else:
    both = teacher(as_input(teacher, jnp.concatenate(views))).embedding
    embeddings = jnp.split(both, len(views))
  return [jax.lax.stop_gradient(e.astype(jnp.float32)) for e in embeddings]


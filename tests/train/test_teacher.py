"""The teacher's input normalisation (retro_jax/train/teacher.py): renormalising the student's
views to the statistics the teacher's model directory records.

The precision and batch-norm modes are tested in tests/train/test_multicrop_methods.py.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from retro_jax import checkpoint
from retro_jax.data import device_ops
from retro_jax.data import presets
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder
from retro_jax.train import teacher as teacher_lib

IMAGENET = device_ops.Normalize(presets.IMAGENET_MEAN, presets.IMAGENET_STD)
OTHER = device_ops.Normalize((0.5, 0.3, 0.7), (0.25, 0.4, 0.2))  # what the teacher "was trained on"
SPEC = EncoderSpec("resnet18", {"low_res_stem": True}, "mlp", {"dims": [512, 64, 16]})


@pytest.fixture(scope="module")
def raw():
  """Images as `to_float` makes them: levels / 255 in [0, 1]."""
  levels = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3))
  return (levels / 255.0).astype(np.float32)


def _config(checkpoint_dir="", random_spec=None, augmentation="mocov2_lowres"):
  config = {"method": "retro", "seed": 0,
            "teacher": {"checkpoint": str(checkpoint_dir), "random_spec": random_spec,
                        "dtype": "float32", "bn_mode": "eval"},
            "input": {"mean": list(presets.IMAGENET_MEAN), "std": list(presets.IMAGENET_STD)}}
  if augmentation:
    config["data"] = {"augmentation": presets.preset(augmentation, size=32)}
  return ml_collections.ConfigDict(config)


@pytest.mark.parametrize("teacher", [OTHER, device_ops.Normalize((0.2,) * 3, (0.3,) * 3)])
def test_renormalisation_equals_normalising_the_raw_image_with_the_teachers_statistics(
    raw, teacher):
  student_views = device_ops.normalize(jnp.asarray(raw), IMAGENET.mean, IMAGENET.std)
  teacher_input = teacher_lib.TeacherInput(IMAGENET, teacher, teacher_lib.RECORDED)
  expected = (raw.astype(np.float64) - np.asarray(teacher.mean)) / np.asarray(teacher.std)
  for got in (teacher_input(student_views), jax.jit(teacher_input)(student_views)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)


def test_equal_statistics_are_the_identity_with_no_op(raw):
  teacher_input = teacher_lib.TeacherInput(IMAGENET, IMAGENET, teacher_lib.RECORDED)
  assert teacher_input.is_identity
  views = jnp.asarray(raw)
  assert teacher_input(views) is views

  class _Teacher(nnx.Module):  # float32 weights, so as_input's cast is a no-op too

    def __init__(self):
      self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  teacher = _Teacher()
  teacher.teacher_input = teacher_input
  assert not jax.make_jaxpr(lambda x: teacher_lib.as_input(teacher, x))(views).eqns
  teacher.teacher_input = teacher_lib.TeacherInput(IMAGENET, OTHER, teacher_lib.RECORDED)
  assert jax.make_jaxpr(lambda x: teacher_lib.as_input(teacher, x))(views).eqns


def test_grayscale_statistics_apply_to_the_three_channels():
  one = teacher_lib._normalization([0.3], [0.2], "test")  # pylint: disable=protected-access
  assert one == device_ops.Normalize((0.3,) * 3, (0.2,) * 3)
  with pytest.raises(teacher_lib.TeacherConfigError, match="1 or 3 numbers"):
    teacher_lib._normalization([0.3, 0.2], [0.2, 0.2], "test")  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory):
  """One tiny random ResNet-18 saved twice: with OTHER statistics and with none recorded."""
  model = build_encoder(SPEC, rngs=nnx.Rngs(3))
  root = tmp_path_factory.mktemp("teachers")
  with_stats = checkpoint.save_model(root / "with_stats", model, SPEC, {
      "input": {"mean": list(OTHER.mean), "std": list(OTHER.std)}})
  without = checkpoint.save_model(root / "without", model, SPEC, {})
  return with_stats, without


def test_teacher_directory_statistics_change_the_embedding_as_teacher_normalised_images_do(
    raw, teacher_dirs):
  with_stats, _ = teacher_dirs
  teacher, identity = teacher_lib.load_teacher(_config(with_stats), needs_teacher=True)
  assert identity["input"] == {"mean": list(OTHER.mean), "std": list(OTHER.std),
                               "from": teacher_lib.RECORDED}
  student_views = device_ops.normalize(jnp.asarray(raw), IMAGENET.mean, IMAGENET.std)
  teacher_views = device_ops.normalize(jnp.asarray(raw), OTHER.mean, OTHER.std)
  graphdef, state = nnx.split(teacher)

  @jax.jit
  def embed(state, images):  # as in the train step: the statistics travel in the graphdef
    model = nnx.merge(graphdef, state, copy=True)
    return model(teacher_lib.as_input(model, images)).embedding

  plain, _ = checkpoint.load_model(with_stats)  # no teacher_input: images used as given
  got = np.asarray(embed(state, student_views))
  np.testing.assert_allclose(got, np.asarray(plain(teacher_views).embedding),
                             rtol=1e-4, atol=1e-5)
  assert not np.allclose(got, np.asarray(plain(student_views).embedding), rtol=1e-2)


def test_missing_statistics_assume_the_students_with_a_warning(raw, teacher_dirs, caplog):
  _, without = teacher_dirs
  with caplog.at_level(logging.WARNING, logger=teacher_lib.__name__):
    teacher, identity = teacher_lib.load_teacher(_config(without), needs_teacher=True)
  assert "records no input mean/std; ASSUMING the student's" in caplog.text
  assert identity["input"] == {"mean": list(IMAGENET.mean), "std": list(IMAGENET.std),
                               "from": teacher_lib.ASSUMED}
  assert teacher.teacher_input.is_identity


def test_random_teacher_takes_the_students_views_as_they_are():
  spec = SPEC.to_json()
  teacher, identity = teacher_lib.load_teacher(_config(random_spec=spec), needs_teacher=True)
  assert teacher.teacher_input.is_identity
  assert identity["input"]["from"] == teacher_lib.RANDOM
  # A config without data or input (unit tests): nothing to renormalise.
  bare = _config(random_spec=spec, augmentation=None)
  del bare["input"]
  teacher, identity = teacher_lib.load_teacher(bare, needs_teacher=True)
  assert teacher.teacher_input is None and identity["input"] == {"from": teacher_lib.RANDOM}


def test_views_in_zero_one_and_mixed_normalisations():
  config = _config(random_spec=SPEC.to_json())
  for view in config.data.augmentation.views:
    view.photometric.normalize = None
  assert teacher_lib.student_normalization(config) == device_ops.Normalize((0.0,) * 3,
                                                                           (1.0,) * 3)
  mixed = _config(random_spec=SPEC.to_json())
  mixed.data.augmentation.views[1].photometric.normalize = None
  with pytest.raises(teacher_lib.TeacherConfigError, match="normalised differently"):
    teacher_lib.student_normalization(mixed)


def test_a_teacher_for_other_than_three_channels_is_refused():
  spec = EncoderSpec("vit_tiny_patch16", {"img_size": 32, "in_channels": 1}).to_json()
  with pytest.raises(teacher_lib.TeacherConfigError, match="1-channel images"):
    teacher_lib.load_teacher(_config(random_spec=spec), needs_teacher=True)

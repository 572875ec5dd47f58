"""`retro_jax.load_student`: a model directory as a Flax module plus its input preprocessing."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

import retro_jax
from retro_jax import checkpoint
from retro_jax import embed
from retro_jax import pretrained
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import abstract_encoder
from retro_jax.models.encoder import materialize_rng_state

# A ResNet-18 at 1/8 width: the real graph, small enough to build and run in seconds.
SPEC = EncoderSpec("resnet18", {"low_res_stem": True, "width": 8}, None, {})
MEAN, STD = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  # Random weights written into the abstract model: eager initialisers would compile for ~40 s.
  rng = np.random.default_rng(0)
  model = abstract_encoder(SPEC)
  params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype),
                        nnx.state(model, nnx.Param))
  stats = jax.tree.map(lambda x: rng.uniform(0.5, 1.5, x.shape).astype(x.dtype),
                       nnx.state(model, nnx.BatchStat))  # running variances must be positive
  nnx.update(model, params, stats)
  materialize_rng_state(model)
  directory = tmp_path_factory.mktemp("student") / "export"
  checkpoint.save_model(directory, model, SPEC, {"input": {"mean": MEAN, "std": STD}})
  return directory


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)


def test_the_three_lines_give_what_embed_computes(model_dir, images):
  model, preprocess = retro_jax.load_student(model_dir)
  features = model(preprocess(images)).features
  # `embed` (the CLI's path) normalises uint8 images with the model.json statistics itself.
  reference_model, _ = checkpoint.load_model(model_dir)
  expected = embed.embed(reference_model, images, mean=MEAN, std=STD, batch_size=4)
  np.testing.assert_allclose(np.asarray(features), expected, rtol=1e-5, atol=1e-5)
  assert features.shape == (4, model.feature_width)


def test_preprocess_is_the_recorded_normalisation(model_dir, images):
  _, preprocess = pretrained.load_student(model_dir)
  expected = (images / 255.0 - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(np.asarray(preprocess(images)), expected, rtol=1e-5, atol=1e-6)
  # Floats are pixels in [0, 1]; one channel is repeated to RGB; it runs under jit.
  np.testing.assert_allclose(np.asarray(preprocess(images / np.float32(255))), expected,
                             rtol=1e-5, atol=1e-6)
  gray = images[..., :1]
  np.testing.assert_array_equal(np.asarray(jax.jit(preprocess)(gray)),
                                np.asarray(preprocess(np.repeat(gray, 3, axis=-1))))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 8, 8, 2), np.uint8), "the model takes 3 channels, the images have 2"),
    (np.zeros((2, 8, 8, 3), np.int32), "uint8 pixels .* got int32"),
    (np.zeros((8, 8, 3), np.uint8), r"NHWC images \(4 dimensions\), got shape \(8, 8, 3\)"),
])
def test_preprocess_refuses_images_the_model_cannot_take(bad, message):
  preprocess = pretrained.make_preprocess(MEAN, STD)
  with pytest.raises(pretrained.PreprocessError, match=message):
    preprocess(bad)


def test_a_directory_without_normalisation_is_refused_before_loading(model_dir, tmp_path):
  broken = tmp_path / "no_input"
  broken.mkdir()
  document = json.loads((model_dir / checkpoint.MODEL_JSON).read_text())
  del document["input"]
  (broken / checkpoint.MODEL_JSON).write_text(json.dumps(document))  # no state/: never read
  with pytest.raises(checkpoint.ModelDirectoryError, match="records no input normalisation"):
    retro_jax.load_student(broken)

"""Fine-tuning from a model directory (configs/finetune.py:smoke) through `retro_jax.main`."""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from retro_jax import checkpoint
from retro_jax import main as main_lib
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder
from retro_jax.data import presets


def model_dir(path):
  spec = EncoderSpec("resnet18", {"low_res_stem": True, "width": 16}, head_kind="mlp",
                     head_kwargs={"dims": [128, 32]})
  model = build_encoder(spec, rngs=nnx.Rngs(0))
  return checkpoint.save_model(path, model, spec, {"input": {
      "mean": list(presets.IMAGENET_MEAN), "std": list(presets.IMAGENET_STD)}})


def args(variant, workdir, data_dir, *extra):
  return ["--config", f"configs/finetune.py:{variant}", "--workdir", str(workdir),
          f"--config.data.data_dir={data_dir}", *extra]


def backbone_weights(directory):
  model, _ = checkpoint.load_model(directory)
  return jax.tree.leaves(nnx.state(model.backbone, nnx.Param))


def test_finetune_smoke_end_to_end_and_resume(tmp_path, fashion_mnist_tfds, capsys):
  init = model_dir(tmp_path / "init")
  workdir = tmp_path / "ft"
  run = args("smoke", workdir, fashion_mnist_tfds, f"--config.init_checkpoint={init}")
  assert main_lib.main(run) == 0
  out = capsys.readouterr().out
  assert "test: test_top1" in out and "first step" in out
  results = json.loads((workdir / "results.json").read_text())
  assert results["test_examples"] == 100 and results["num_classes"] == 10
  assert 0 <= results["test_top1"] <= results["test_top5"] <= 100
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 4
  finetuned, description = checkpoint.load_model(workdir / "finetuned")
  assert finetuned.head is None and description["classifier"]["num_classes"] == 10
  with np.load(workdir / "finetuned" / "classifier.npz") as classifier:
    assert classifier["kernel"].shape == (128, 10) and classifier["bias"].shape == (10,)
  assert any(not np.array_equal(a, b) for a, b in
             zip(backbone_weights(init), backbone_weights(workdir / "finetuned")))
  # A rerun resumes from the final checkpoint: no training, the same test accuracy.
  assert main_lib.main(run) == 0
  assert "resuming from step 4" in capsys.readouterr().out
  assert json.loads((workdir / "results.json").read_text())["test_top1"] == results["test_top1"]


def test_linear_protocol_freezes_the_network(tmp_path, fashion_mnist_tfds, capsys):
  init = model_dir(tmp_path / "init")
  workdir = tmp_path / "lin"
  assert main_lib.main(args("linear,smoke", workdir, fashion_mnist_tfds,
                            f"--config.init_checkpoint={init}", "--config.features=embedding",
                            "--config.data.label_fraction=0.2")) == 0
  out = capsys.readouterr().out
  assert "classifier only" in out and "semi-supervised" in out
  for a, b in zip(backbone_weights(init), backbone_weights(workdir / "finetuned")):
    np.testing.assert_array_equal(a, b)
  with np.load(workdir / "finetuned" / "classifier.npz") as classifier:
    assert classifier["kernel"].shape == (32, 10)  # on the head's 32-d embedding


def test_bad_input_exits_1_with_one_message(tmp_path, fashion_mnist_tfds, capsys):
  assert main_lib.main(args("smoke", tmp_path / "a", fashion_mnist_tfds)) == 1
  assert "init_checkpoint is not set" in capsys.readouterr().err
  assert main_lib.main(args("smoke", tmp_path / "b", fashion_mnist_tfds,
                            f"--config.init_checkpoint={tmp_path / 'missing'}")) == 1
  assert "no model directory" in capsys.readouterr().err

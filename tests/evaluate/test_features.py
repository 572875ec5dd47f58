"""Features of a whole split from a model directory, and the `evaluate` command built on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from retro_jax import checkpoint
from retro_jax import embed
from retro_jax.data import presets
from retro_jax.data import sources
from retro_jax.evaluate import cli
from retro_jax.evaluate import features
from retro_jax.evaluate import knn
from retro_jax.evaluate import subsets
from retro_jax.models.encoder import EncoderSpec
from retro_jax.models.encoder import build_encoder

DATASET = "tfds:fashion_mnist"
INPUT = {"mean": [0.3, 0.3, 0.3], "std": [0.25, 0.25, 0.25]}  # not ImageNet's: must be used


def tiny_model_dir(path, head: bool = True):
  """A random, narrow ResNet-18 (low-res stem) with a 2-layer MLP head."""
  spec = EncoderSpec("resnet18", {"low_res_stem": True, "width": 8},
                     head_kind="mlp" if head else None,
                     head_kwargs={"dims": [64, 32, 16]} if head else {})
  model = build_encoder(spec, rngs=nnx.Rngs(0))
  return checkpoint.save_model(path, model, spec, {"input": INPUT})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


def direct_forward(model_dir, data_dir, split, output):
  """The same images through the host eval view, then `embed.embed` (no pipeline, no mesh)."""
  source = sources.open_source(DATASET, split, data_dir)
  view = presets.Augmentation.from_preset("eval_lowres", size=32)
  images = np.stack([view.host_views(example["image"], [0, 0])[0].numpy()
                     for example in source.examples()])
  model, description = checkpoint.load_model(model_dir)
  return embed.embed(model, images, mean=description["input"]["mean"],
                     std=description["input"]["std"], output=output, batch_size=64)


def test_every_example_in_order_equal_to_a_direct_forward(model_dir, fashion_mnist_tfds,
                                                          tmp_path):
  split = "test[:100]"  # 100 = 6 batches of 16 + 4: the last batch is partial
  extractor = features.FeatureExtractor(model_dir, which=("backbone", "embedding"),
                                        image_size=32, batch_size=16)
  parts, labels = extractor.extract(DATASET, split, data_dir=fashion_mnist_tfds,
                                    cache_dir=tmp_path)
  assert parts["backbone"].shape == (100, 64) and parts["embedding"].shape == (100, 16)
  source = sources.open_source(DATASET, split, fashion_mnist_tfds)
  np.testing.assert_array_equal(labels, subsets.source_labels(source))
  for name, output in (("backbone", "features"), ("embedding", "embedding")):
    np.testing.assert_allclose(parts[name],
                               direct_forward(model_dir, fashion_mnist_tfds, split, output),
                               rtol=1e-4, atol=1e-4)
  # The cache gives the same arrays back, keyed by split.
  cached, cached_labels = extractor.extract(DATASET, split, data_dir=fashion_mnist_tfds,
                                            cache_dir=tmp_path)
  np.testing.assert_array_equal(cached["embedding"], parts["embedding"])
  np.testing.assert_array_equal(cached_labels, labels)
  assert len(list(tmp_path.glob("features_*.npz"))) == 1
  single, _ = features.split_features(model_dir, dataset=DATASET, split=split,
                                      data_dir=fashion_mnist_tfds, image_size=32, batch_size=16)
  np.testing.assert_allclose(single, parts["backbone"], rtol=1e-5, atol=1e-5)


def test_errors(model_dir, tmp_path):
  headless = tiny_model_dir(tmp_path / "headless", head=False)
  with pytest.raises(features.FeatureError, match="no head"):
    features.FeatureExtractor(headless, which="embedding")
  with pytest.raises(features.FeatureError, match="features must be"):
    features.FeatureExtractor(model_dir, which="logits")
  with pytest.raises(features.FeatureError, match="divisible"):
    features.FeatureExtractor(model_dir, batch_size=12)  # 8 test devices


def test_cli_knn_linear_and_semi_supervised(model_dir, fashion_mnist_tfds, tmp_path, capsys):
  out = tmp_path / "out"
  argv = ["--checkpoint", str(model_dir), "--dataset", DATASET, "--data-dir",
          str(fashion_mnist_tfds), "--train-split", "train[:300]", "--test-split", "test[:60]",
          "--protocol", "knn,linear", "--features", "both", "--image-size", "32",
          "--linear-epochs", "3", "--linear-lr", "0.1", "--batch-size", "32", "--out", str(out)]
  assert cli.main(argv) == 0
  table = capsys.readouterr().out
  assert "knn_k20" in table and "linear" in table and "embedding" in table
  rows = json.loads((out / "results.json").read_text())["results"]
  assert [(r["protocol"], r["features"]) for r in rows] == [
      ("knn_k20", "backbone"), ("knn_k200", "backbone"), ("linear", "backbone"),
      ("knn_k20", "embedding"), ("knn_k200", "embedding"), ("linear", "embedding")]
  for row in rows:
    assert row["top5"] >= row["top1"] and row["test_examples"] == 60
    assert row["train_examples"] == 300
  # The k-NN rows are knn.py's on the (cached) features.
  extractor = features.FeatureExtractor(model_dir, which=("backbone", "embedding"),
                                        image_size=32, batch_size=32)
  (train, train_y), (test, test_y) = (
      extractor.extract(DATASET, split, data_dir=fashion_mnist_tfds, cache_dir=out / "features")
      for split in ("train[:300]", "test[:60]"))
  expected = knn.knn_accuracy(train["backbone"], train_y, test["backbone"], test_y,
                              num_classes=10)
  assert rows[0]["top1"] == expected["knn_top1_k20"]
  assert rows[1]["top5"] == expected["knn_top5_k200"]

  semi = cli.evaluate_model(model_dir, dataset=DATASET, data_dir=fashion_mnist_tfds,
                            train_split="train[:300]", test_split="test[:60]",
                            protocols=("linear",), image_size=32, linear_epochs=2,
                            batch_size=32, label_fraction=0.1, cache_dir=out / "features",
                            log=None)
  assert len(semi) == 1 and semi[0]["label_fraction"] == 0.1
  assert semi[0]["train_examples"] == len(subsets.balanced_subset(train_y, 0.1))


def test_cli_user_errors(tmp_path, capsys):
  argv = ["--checkpoint", str(tmp_path / "nothing"), "--dataset", DATASET]
  assert cli.main(argv) == 1
  assert "no model directory" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(argv + ["--protocol", "svm"])

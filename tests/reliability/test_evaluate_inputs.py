"""`python -m retro_jax.evaluate` given bad input: refused before any feature is extracted.

A mistyped split (either one), an --out that cannot be written or a damaged model directory
fails in about a second: the log shows no feature extraction ("features of ...").
"""

from __future__ import annotations

import json

import pytest

from retro_jax.evaluate import cli

import model_dirs
from refusal import expect_refusal

DATASET = "tfds:fashion_mnist"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate_inputs")
  tiny = model_dirs.save_random(root / "tiny")
  model_dirs.truncated_copy(tiny, root / "truncated")
  (root / "a_file").write_text("not a directory\n")
  (root / "teacher.pth").write_bytes(b"PK\x03\x04")
  return root


def _argv(root, data_dir, *extra, checkpoint="tiny", train="train[:24]", test="test[:16]"):
  return ["--checkpoint", root / checkpoint, "--dataset", DATASET, "--data-dir", data_dir,
          "--train-split", train, "--test-split", test, "--protocol", "knn",
          "--image-size", "16", "--batch-size", "8", *extra]


CASES = {
    # name: (arguments, exit status, what stderr must say)
    "test_split_misspelt": (lambda r, d: _argv(r, d, test="tset"), 1,
                            ["split 'tset'", "available splits: train", "test"]),
    "train_split_misspelt": (lambda r, d: _argv(r, d, train="trian[:24]"), 1,
                             ["split 'trian[:24]'"]),
    "dataset_misspelt": (lambda r, d: ["--checkpoint", r / "tiny", "--dataset",
                                       "tfds:fashion_mnst", "--data-dir", d], 1,
                         # The hint listed fashion_mnist twice (the catalog's and the folder's).
                         ["unknown TFDS dataset 'fashion_mnst'", "did you mean fashion_mnist?"]),
    "out_is_a_file": (lambda r, d: _argv(r, d, "--out", r / "a_file"), 1,
                      ["--out", "a_file is a file"]),
    "out_under_a_file": (lambda r, d: _argv(r, d, "--out", r / "a_file" / "eval"), 1,
                         ["cannot be created", "a_file is a file"]),
    "truncated_weights": (lambda r, d: _argv(r, d, checkpoint="truncated"), 1,
                          ["could not restore the weights", "truncated"]),
    "checkpoint_is_a_pth_file": (lambda r, d: _argv(r, d, checkpoint="teacher.pth"), 1,
                                 ["python -m retro_jax convert --src"]),
    "knn_k_zero": (lambda r, d: _argv(r, d, "--knn-k", "20,0"), 2,
                   ["--knn-k must be a comma list of positive integers"]),
    "knn_k_not_a_number": (lambda r, d: _argv(r, d, "--knn-k", "twenty"), 2,
                           ["--knn-k must be a comma list"]),
    "label_fraction_above_one": (lambda r, d: _argv(r, d, "--label-fraction", "2"), 2,
                                 ["--label-fraction must lie in (0, 1]"]),
    "unknown_protocol": (lambda r, d: _argv(r, d, "--protocol", "svm"), 2,
                         ["protocol must be a comma list of knn, linear"]),
}


@pytest.mark.parametrize("case", CASES)
def test_refused(root, fashion_mnist_tfds, capsys, case):
  argv, code, says = CASES[case]
  err = expect_refusal(cli.main, argv(root, fashion_mnist_tfds), capsys, code=code, says=says,
                       unchanged=[root])
  assert "features of" not in err  # refused before any extraction


def test_k_above_the_training_examples_names_the_k_used(root, fashion_mnist_tfds, tmp_path,
                                                         capsys):
  """k = 200 on 24 training examples used k = 24 but labelled the row knn_k200."""
  out = tmp_path / "eval"
  assert cli.main([str(a) for a in _argv(root, fashion_mnist_tfds, "--knn-k", "5,200",
                                         "--out", out, "--no-cache")]) == 0
  captured = capsys.readouterr()
  assert "k=200 exceeds the 24 labelled training examples: the row knn_k24 uses k=24" in (
      captured.err)
  rows = json.loads((out / "results.json").read_text())["results"]
  assert [(r["protocol"], r["k"], r.get("k_requested")) for r in rows] == [
      ("knn_k5", 5, None), ("knn_k24", 24, [200])]
  assert "knn_k24" in captured.out and "knn_k200" not in captured.out

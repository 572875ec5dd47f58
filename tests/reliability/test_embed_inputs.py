"""`python -m retro_jax.embed` given bad input: one line, the right exit status, nothing written.

Every refusal happens before the model runs; outputs are checked before the model loads.
"""

from __future__ import annotations

import numpy as np
import pytest

from retro_jax import embed

import model_dirs
from refusal import expect_refusal


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny model directory, a truncated copy, images, and things that are not what they say."""
  root = tmp_path_factory.mktemp("embed_inputs")
  model = model_dirs.save_random(root / "model")
  np.save(root / "images.npy", np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3),
                                                                 dtype=np.uint8))
  (root / "weights.pth").write_bytes(b"PK\x03\x04 a torch zip archive, as far as embed knows")
  (root / "a_file").write_text("not a directory\n")
  return {"root": root, "model": model, "images": root / "images.npy",
          "truncated": model_dirs.truncated_copy(model, root / "truncated")}


def _argv(files, **changes):
  args = {"--checkpoint": files["model"], "--images": files["images"],
          "--out": files["root"] / "out" / "features.npy"}
  args.update({f"--{k.replace('_', '-')}": v for k, v in changes.items()})
  return [str(x) for pair in args.items() for x in pair]


CASES = {
    # name: (changes to the arguments, exit status, what stderr must say)
    "out_is_a_directory": (lambda f: {"out": f["root"] / "model"}, 1,
                           ["--out", "is a directory"]),
    "out_under_a_file": (lambda f: {"out": f["root"] / "a_file" / "x.npy"}, 1,
                         ["cannot be created", "a_file is a file"]),
    "images_missing": (lambda f: {"images": f["root"] / "nope.npy"}, 1,
                       ["--images", "nope.npy: no such file"]),
    "images_not_npy": (lambda f: {"images": f["root"] / "a_file"}, 1,
                       ["is not a NumPy .npy array"]),
    "checkpoint_is_a_pth_file": (lambda f: {"checkpoint": f["root"] / "weights.pth"}, 1,
                                 ["weights.pth is a file, not a retro_jax model directory",
                                  "python -m retro_jax convert --src"]),
    "checkpoint_missing": (lambda f: {"checkpoint": f["root"] / "nowhere"}, 1,
                           ["no model directory at", "nowhere"]),
    "checkpoint_without_model_json": (lambda f: {"checkpoint": f["root"] / "out"}, 1,
                                      ["no model.json"]),
    "truncated_weights": (lambda f: {"checkpoint": f["truncated"]}, 1,
                          ["could not restore the weights in", "truncated",
                           "Convert or export the model again"]),
    "batch_size_zero": (lambda f: {"batch_size": 0}, 2, ["--batch-size must be positive"]),
}


@pytest.mark.parametrize("case", CASES)
def test_refused(files, capsys, case):
  changes, code, says = CASES[case]
  (files["root"] / "out").mkdir(exist_ok=True)
  err = expect_refusal(embed.main, _argv(files, **changes(files)), capsys, code=code, says=says,
                       unchanged=[files["root"]])
  if code == 1:
    assert err.startswith("python -m retro_jax.embed: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("array", ["wrong_shape", "wrong_dtype", "empty"])
def test_bad_image_arrays(files, tmp_path, capsys, array):
  images = {"wrong_shape": np.zeros((2, 16, 16), np.uint8),
            "wrong_dtype": np.zeros((2, 16, 16, 3), np.int64),
            "empty": np.zeros((0, 16, 16, 3), np.uint8)}[array]
  np.save(tmp_path / "x.npy", images)
  says = {"wrong_shape": "NHWC with 3 channels", "wrong_dtype": "uint8 (raw pixels) or float32",
          "empty": "holds no images"}[array]
  expect_refusal(embed.main, _argv(files, images=tmp_path / "x.npy", out=tmp_path / "o.npy"),
                 capsys, code=1, says=[says], unchanged=[tmp_path, files["root"]])


def test_out_without_npy_suffix_is_written_where_asked(files, tmp_path, capsys):
  """`--out feat` wrote feat.npy while saying it wrote feat: now it writes feat itself."""
  out = tmp_path / "feat"
  assert embed.main(_argv(files, out=out)) == 0
  assert f"to {out}" in capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["feat"]
  assert np.load(out).shape == (3, 32)

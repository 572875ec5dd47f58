"""`python -m retro_jax.convert` given bad input: one line (or the mismatch list), nothing written.

tests/convert/test_convert_cli.py covers the mismatch messages of a ResNet file (renamed key,
wrong shape, wrong format, same-family architecture guess); these are the other mistakes.
"""

from __future__ import annotations

import datetime
import random

import pytest
import torch
import torchvision

from retro_jax.convert import cli

from refusal import expect_refusal


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("convert_inputs")
  torch.manual_seed(0)
  mobilenet = root / "mobilenet_v3_small.pth"
  torch.save(torchvision.models.mobilenet_v3_small().state_dict(), mobilenet)
  data = mobilenet.read_bytes()
  (root / "truncated.pth").write_bytes(data[:len(data) // 2])
  # Seeded bytes that torch's weights-only unpickler refuses with its weights_only=False advice.
  (root / "random.pth").write_bytes(random.Random(0).randbytes(5000))
  (root / "empty.pth").write_bytes(b"")
  torch.save({"state_dict": {"w": torch.zeros(2)}, "saved": datetime.date(2024, 1, 1)},
             root / "pickled_object.pth")
  (root / "a_file").write_text("not a directory\n")
  (root / "not_empty").mkdir()
  (root / "not_empty" / "keep.txt").write_text("earlier work\n")
  return root


def _argv(root, src="mobilenet_v3_small.pth", arch="mobilenet_v3_small", out="out", *extra):
  return ["--src", root / src, "--format", "torchvision", "--arch", arch, "--out", root / out,
          *extra]


CASES = {
    # name: (arguments from the fixture's folder, exit status, what stderr must say)
    "src_missing": (lambda r: _argv(r, src="nope.pth"), 1, ["--src", "nope.pth: no such file"]),
    "src_is_a_directory": (lambda r: _argv(r, src="not_empty"), 1, ["no such file"]),
    "random_bytes": (lambda r: _argv(r, src="random.pth"), 1,
                     ["cannot read", "truncated, corrupt or not a torch file"]),
    "empty_file": (lambda r: _argv(r, src="empty.pth"), 1, ["cannot read", "EOFError"]),
    "truncated_file": (lambda r: _argv(r, src="truncated.pth"), 1,
                       ["cannot read", "truncated, corrupt or not a torch file"]),
    "pickled_python_object": (lambda r: _argv(r, src="pickled_object.pth"), 1,
                              ["holds pickled Python objects", "datetime.date",
                               "never runs code from a file"]),
    "out_is_a_file": (lambda r: _argv(r, out="a_file"), 1,
                      ["--out", "a_file is a file, not a directory"]),
    "out_under_a_file": (lambda r: _argv(r, out="a_file/model"), 1,
                         ["cannot be created", "a_file is a file"]),
    "out_not_empty": (lambda r: _argv(r, out="not_empty"), 1,
                      ["exists and is not empty", "--overwrite"]),
    "unknown_format": (lambda r: ["--src", r / "mobilenet_v3_small.pth", "--format", "onnx",
                                  "--arch", "resnet18", "--out", r / "out"], 2,
                       ["invalid choice: 'onnx'"]),
    "bad_mean": (lambda r: _argv(r, "mobilenet_v3_small.pth", "mobilenet_v3_small", "out",
                                 "--mean", "0.5,0.5"), 2, ["three comma-separated numbers"]),
    # Silently wrong before: the guess compared keys with `classifier.*` still in them.
    "wrong_arch_of_another_family": (lambda r: _argv(r, arch="resnet18"), 1,
                                     ["state dict does not match",
                                      "looks like: mobilenet_v3_small (use --arch "
                                      "mobilenet_v3_small)"]),
}


@pytest.mark.parametrize("case", CASES)
def test_refused(files, capsys, case):
  argv, code, says = CASES[case]
  err = expect_refusal(cli.main, argv(files), capsys, code=code, says=says, unchanged=[files])
  assert "weights_only" not in err  # torch's advice, which the CLI cannot and must not follow

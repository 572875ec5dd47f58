"""`python -m retro_jax.export` given bad input: one line, exit 1 (2 for usage), nothing written.

Outputs are checked before the model is loaded; a damaged model directory is one message.
"""

from __future__ import annotations

import pytest

from retro_jax import export

import model_dirs
from refusal import expect_refusal


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("export_inputs")
  tiny = model_dirs.save_random(root / "tiny")
  model_dirs.save_random(root / "mobilenet", model_dirs.TORCH_EXPORTABLE)
  model_dirs.truncated_copy(tiny, root / "truncated")
  (root / "a_file").write_text("not a directory\n")
  (root / "unfinished" / "checkpoints" / "4").mkdir(parents=True)
  return root


CASES = {
    # name: (--workdir, --out, --format, extra arguments, exit status, what stderr must say)
    "truncated_weights": ("truncated", "out", "orbax", [], 1,
                          ["cannot load", "could not restore the weights", "truncated"]),
    "workdir_missing": ("nowhere", "out", "orbax", [], 1, ["--workdir", "no such directory"]),
    "workdir_is_a_file": ("a_file", "out", "orbax", [], 1, ["is a file, not a workdir"]),
    "unfinished_run": ("unfinished", "out", "orbax", [], 1,
                       ["has not finished (last checkpoint: step 4)", "rerun the same command"]),
    "orbax_out_is_a_file": ("tiny", "a_file", "orbax", [], 1,
                            ["--out", "a_file is a file"]),
    "orbax_out_under_a_file": ("tiny", "a_file/model", "orbax", [], 1,
                               ["cannot be created", "a_file is a file"]),
    "orbax_out_inside_the_model": ("tiny", "tiny/export", "orbax", [], 1,
                                   ["overlaps the model directory"]),
    "torch_out_under_a_file": ("mobilenet", "a_file/model.pt", "torch", [], 1,
                               ["cannot be created", "a_file is a file"]),
    "torch_of_a_width_torchvision_lacks": ("tiny", "out.pt", "torch", [], 1,
                                           ["{'width': 4}", "no torchvision equivalent",
                                            "--format orbax"]),
    "stage_without_stages": ("tiny", "out", "orbax", ["--stage", "teacher"], 1,
                             ["not a multi-stage workdir (drop --stage)"]),
    "with_head_for_torch": ("mobilenet", "out.pt", "torch", ["--with-head"], 2,
                            ["--with-head applies to --format orbax"]),
}


@pytest.mark.parametrize("case", CASES)
def test_refused(root, capsys, case):
  workdir, out, fmt, extra, code, says = CASES[case]
  argv = ["--workdir", root / workdir, "--out", root / out, "--format", fmt, *extra]
  expect_refusal(export.main, argv, capsys, code=code, says=says, unchanged=[root])

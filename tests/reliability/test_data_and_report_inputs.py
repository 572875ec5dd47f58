"""`python -m retro_jax.data` and `python -m retro_jax.report` given bad input.

`data prepare` checks its data directory before it builds anything (the build takes ~20 s);
`report` reads a damaged metrics.jsonl line by line and refuses what it cannot write.
"""

from __future__ import annotations

import json

import pytest

from retro_jax import report
from retro_jax.data import cli as data_cli

from refusal import expect_refusal


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("data_report_inputs")
  (root / "a_file").write_text("not a directory\n")
  (root / "binary_run").mkdir()
  (root / "binary_run" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\x80\n\x81\x82\n")
  (root / "no_metrics_run").mkdir()
  return root


DATA_CASES = {
    # name: (arguments, exit status, what stderr must say)
    "data_dir_is_a_file": (lambda r, s: ["prepare", "fashion_mnist", "--data-dir", r / "a_file",
                                         "--source-dir", s], 1,
                           ["--data-dir", "a_file is a file, not a directory"]),
    "data_dir_under_a_file": (lambda r, s: ["prepare", "fashion_mnist", "--data-dir",
                                            r / "a_file" / "tfds", "--source-dir", s], 1,
                              ["cannot be created", "a_file is a file"]),
    "unknown_dataset": (lambda r, s: ["prepare", "fashion_mnst", "--data-dir", r / "tfds"], 2,
                        ["unknown TFDS dataset 'fashion_mnst'", "did you mean fashion_mnist?"]),
    "source_dir_without_the_files": (lambda r, s: ["prepare", "fashion_mnist", "--data-dir",
                                                   r / "tfds", "--source-dir", r], 1,
                                     ["Fashion-MNIST files not found in"]),
    "unknown_command": (lambda r, s: ["prepair", "fashion_mnist"], 2, ["invalid choice"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_refused(root, fashion_mnist_dir, capsys, case):
  argv, code, says = DATA_CASES[case]
  expect_refusal(data_cli.main, argv(root, fashion_mnist_dir), capsys, code=code, says=says,
                 unchanged=[root])


REPORT_CASES = {
    "metrics_not_utf8": ("binary_run", ["binary_run/metrics.jsonl holds no metrics records",
                                        "2 unreadable lines"]),
    "no_metrics": ("no_metrics_run", ["metrics.jsonl does not exist"]),
    "workdir_missing": ("nowhere", ["nowhere does not exist"]),
    "workdir_is_a_file": ("a_file", ["--workdir", "a_file is a file"]),
}


@pytest.mark.parametrize("case", REPORT_CASES)
def test_report_refused(root, capsys, case):
  workdir, says = REPORT_CASES[case]
  expect_refusal(report.main, ["--workdir", root / workdir], capsys, code=1, says=says,
                 unchanged=[root])


def test_report_skips_undecodable_lines(tmp_path, capsys):
  """A non-UTF-8 line among good ones (a disk error, a killed write) is noted and skipped."""
  records = [json.dumps({"step": step, "loss": 1.0 / step}).encode() for step in (1, 2, 3)]
  (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(
      [records[0], b"\xff\xfe{\"step\": 2}", records[1], records[2]]) + b"\n")
  (tmp_path / "config.json").write_bytes(b"\x80 not UTF-8")
  assert report.main(["--workdir", str(tmp_path)]) == 0
  text = (tmp_path / "report.md").read_text()
  assert "1 line(s) of metrics.jsonl could not be read and were skipped" in text
  assert "config.json could not be read" in text
  assert "| last logged step | 3 |" in text and "| logged records | 3 |" in text
  assert "Traceback" not in capsys.readouterr().err

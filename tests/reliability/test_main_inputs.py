"""`python -m retro_jax.main` given bad input: one clear line, exit 2 (usage) or 1, nothing written.

Every case fails before a model is built or anything compiled: the flags and the config file
first (exit 2), then the workdir, the run's length, intervals, optimizer, monitor splits and
data (`train/preflight.py`), then the teacher. The workdir already exists and holds a file of
an earlier run, so "nothing on disk changed" covers it too.
"""

from __future__ import annotations

import pytest

from retro_jax import main as main_lib

import model_dirs
from refusal import expect_refusal

CONFIG = "configs/resnet18.py:smoke"  # Retro, 4 steps of 16 on Fashion-MNIST, random teacher


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("main_inputs")
  (root / "run").mkdir()
  (root / "run" / "notes.txt").write_text("an earlier run's file\n")
  (root / "a_file").write_text("not a directory\n")
  (root / "teacher.pth").write_bytes(b"PK\x03\x04")
  model_dirs.truncated_copy(model_dirs.save_random(root / "teacher"), root / "truncated_teacher")
  return root


def _argv(root, data_dir, *overrides, config=CONFIG, workdir="run"):
  return ["--config", config, "--workdir", root / workdir,
          f"--config.data.data_dir={data_dir}", *overrides]


CASES = {
    # name: (arguments, exit status, what stderr must say)
    "config_file_missing": (lambda r, d: _argv(r, d, config="configs/resnet81.py"), 2,
                            ["--config configs/resnet81.py", "no such file"]),
    "config_file_is_a_directory": (lambda r, d: _argv(r, d, config="configs"), 2,
                                   ["is a directory, not a config file"]),
    "config_name_unknown": (lambda r, d: _argv(r, d, config="resnet81:smoke"), 2,
                            ["--config resnet81:smoke: no config named 'resnet81'",
                             "choose one of: ", "effb0, ", "resnet18, "]),
    # A name loads configs/resnet18.py: its :smoke variant gets as far as the optimizer check.
    "config_by_name": (lambda r, d: _argv(r, d, "--config.optimizer.lr=nan",
                                          config="resnet18:smoke"), 1,
                       ["optimizer.lr must be a finite number, got nan"]),
    "unknown_variant": (lambda r, d: _argv(r, d, config="configs/resnet18.py:smokey"), 2,
                        ["--config configs/resnet18.py:smokey: unknown variant 'smokey'",
                         "'smoke', 'reference', 'reference_smoke'"]),
    "misspelt_key": (lambda r, d: _argv(r, d, "--config.optimzer.lr=0.1"), 2,
                     ["--config.optimzer.lr=0.1: the config has no key 'optimzer'",
                      'did you mean "optimizer" instead of "optimzer"?']),
    "misspelt_nested_key": (lambda r, d: _argv(r, d, "--config.optimizer.lrr=0.1"), 2,
                            ["--config.optimizer.lrr=0.1: the config has no key 'lrr'",
                             'did you mean "lr"']),
    "value_of_the_wrong_type": (lambda r, d: _argv(r, d, "--config.seed=1.5"), 2,
                                ["--config.seed=1.5", "invalid literal for int()"]),
    "unknown_flag": (lambda r, d: _argv(r, d, "--workdirr=x"), 2, ["Unknown command line flag"]),
    "no_workdir": (lambda r, d: ["--config", CONFIG], 2, ["--config and --workdir are required"]),
    "workdir_is_a_file": (lambda r, d: _argv(r, d, workdir="a_file"), 1,
                          ["--workdir", "a_file is a file, not a directory"]),
    "workdir_under_a_file": (lambda r, d: _argv(r, d, workdir="a_file/run"), 1,
                             ["cannot be created", "a_file is a file"]),
    "nan_learning_rate": (lambda r, d: _argv(r, d, "--config.optimizer.lr=nan"), 1,
                          ["optimizer.lr must be a finite number, got nan"]),
    "negative_steps": (lambda r, d: _argv(r, d, "--config.total_steps=-3"), 1,
                       ["total_steps=-3 gives -3 training steps"]),
    "negative_epochs": (lambda r, d: _argv(r, d, "--config.total_steps=0", "--config.epochs=-1"),
                        1, ["epochs=-1 (16 steps per epoch) gives -16 training steps"]),
    "checkpoint_every_zero_steps": (lambda r, d: _argv(r, d, "--config.checkpoint_every_steps=0"),
                                    1, ["checkpoint_every_steps: must be a positive number"]),
    "keep_no_checkpoint": (lambda r, d: _argv(r, d, "--config.keep_checkpoints=0"), 1,
                           ["keep_checkpoints: must be a positive number of checkpoints"]),
    "monitor_split_missing": (lambda r, d: _argv(r, d, "--config.monitor.test_split=tset"), 1,
                              ["monitor.test_split: split 'tset'", "available splits"]),
    "dataset_misspelt": (lambda r, d: _argv(r, d, "--config.data.dataset=tfds:fashion_mnst"), 1,
                         ["unknown TFDS dataset 'fashion_mnst'", "did you mean fashion_mnist?"]),
    "unknown_method": (lambda r, d: _argv(r, d, "--config.method=simclr"), 1,
                       ["method: unknown 'simclr'"]),
    "queue_not_a_multiple_of_the_batch": (lambda r, d: _argv(
        r, d, "--config.objective.queue_size=100"), 1,
                                          ["queue size 100 is not a multiple of the global "
                                           "batch 16", "such as 96"]),
    "teacher_is_a_pth_file": (lambda r, d: _argv(
        r, d, f"--config.teacher.checkpoint={r / 'teacher.pth'}"), 1,
                              ["teacher.pth is a file, not a retro_jax model directory",
                               "python -m retro_jax convert --src"]),
    "teacher_missing": (lambda r, d: _argv(r, d, f"--config.teacher.checkpoint={r / 'nowhere'}"),
                        1, ["no model directory at", "nowhere"]),
    "teacher_truncated_weights": (lambda r, d: _argv(
        r, d, f"--config.teacher.checkpoint={r / 'truncated_teacher'}"), 1,
                                  ["could not restore the weights", "truncated_teacher",
                                   "Convert or export the model again"]),
}


@pytest.mark.parametrize("case", CASES)
def test_refused(root, fashion_mnist_tfds, capsys, case):
  argv, code, says = CASES[case]
  err = expect_refusal(main_lib.main, argv(root, fashion_mnist_tfds), capsys, code=code,
                       says=says, unchanged=[root])
  assert err.startswith("python -m retro_jax.main: ")
  assert "\\'" not in err and "\\n" not in err  # no escaped quotes or newlines (repr text)
  message = err.splitlines()
  assert len(message) == (2 if code == 2 else 1), err  # usage errors add the usage line

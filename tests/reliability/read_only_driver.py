"""Runs every CLI with its output on a read-only file system; prints {name: [status, stderr]}.

Started by test_read_only_outputs.py inside a private mount namespace where READ_ONLY is a
read-only tmpfs (holding run/metrics.jsonl); the inputs live outside it.

  python read_only_driver.py READ_ONLY MODEL_DIR SOURCE_FILE FASHION_MNIST_DIR
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys


def main() -> None:
  read_only, model, source, fashion = map(pathlib.Path, sys.argv[1:5])
  # Imported here, after the namespace exists; each CLI is run in this one process.
  # pylint: disable=import-outside-toplevel
  from retro_jax import embed, export, main as train_main, report
  from retro_jax.convert import cli as convert
  from retro_jax.data import cli as data
  from retro_jax.evaluate import cli as evaluate
  # pylint: enable=import-outside-toplevel
  runs = {
      "main": (train_main.main, ["--config", "configs/resnet18.py:smoke", "--workdir",
                                 read_only / "run"]),
      "convert": (convert.main, ["--src", source, "--format", "torchvision", "--arch",
                                 "resnet18", "--out", read_only / "teacher"]),
      "embed": (embed.main, ["--checkpoint", model, "--images", source, "--out",
                             read_only / "features.npy"]),
      "evaluate": (evaluate.main, ["--checkpoint", model, "--dataset", "tfds:fashion_mnist",
                                   "--out", read_only / "eval"]),
      "export": (export.main, ["--workdir", model, "--out", read_only / "export", "--format",
                               "orbax"]),
      "data": (data.main, ["prepare", "fashion_mnist", "--data-dir", read_only / "tfds",
                           "--source-dir", fashion]),
      "report": (report.main, ["--workdir", read_only / "run"]),
  }
  results = {}
  for name, (main_fn, argv) in runs.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
      try:
        status = main_fn([str(arg) for arg in argv])
      except SystemExit as exit_:
        status = exit_.code
    results[name] = [status, err.getvalue()]
  print(json.dumps(results))


if __name__ == "__main__":
  main()

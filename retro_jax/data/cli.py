"""`python -m retro_jax.data`: prepare TFDS datasets on machines without internet.

  python -m retro_jax.data prepare fashion_mnist [--data-dir DIR]
  python -m retro_jax.data list

`prepare NAME` builds TFDS's NAME dataset with TFDS's own builder from files already on disk
(for fashion_mnist: the IDX files of Debian's dataset-fashion-mnist), so that afterwards
`tfds.load(NAME, download=False)` works offline and gives what a normal download gives. Where
the files are missing it downloads, if the download host answers; otherwise it stops at once
and says how to get the files. Without --data-dir the dataset goes to TFDS's default folder
($TFDS_DATA_DIR, else ~/tensorflow_datasets), where tfds.load looks by default.

Exit status: 0 done or already prepared, 1 the data cannot be had (message on stderr),
2 usage error (e.g. an unknown dataset name).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from retro_jax import user_errors
from retro_jax.data import prepare


def _list() -> int:
  width = max(len(name) for name in prepare.DATASETS)
  for name, (_, summary) in prepare.DATASETS.items():
    print(f"{name.ljust(width)}  {summary}")
  return 0


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.data") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  commands.add_parser("list", help="the datasets `prepare` knows")
  build = commands.add_parser(
      "prepare", help="build a TFDS dataset from local files (or download it)",
      description="Builds TFDS's NAME dataset with TFDS's own builder from local files, or "
      "downloads it where the local files are missing and the network is reachable.")
  build.add_argument("name", metavar="NAME", help=f"one of: {', '.join(prepare.DATASETS)}")
  build.add_argument("--data-dir", type=pathlib.Path, default=None, metavar="DIR",
                     help="TFDS data directory to build into (default: $TFDS_DATA_DIR, else "
                     "~/tensorflow_datasets)")
  source = build.add_mutually_exclusive_group()
  source.add_argument("--source-dir", type=pathlib.Path, default=None, metavar="DIR",
                      help="folder holding the dataset's files (default: the dataset's usual "
                      "place, e.g. /usr/share/datasets/fashion-mnist); never downloads")
  source.add_argument("--download", action="store_true",
                      help="ignore local files and let TFDS download the dataset")
  build.add_argument("--force", action="store_true",
                     help="rebuild even if the dataset is already prepared")
  for command in (parser, build):
    user_errors.add_debug_flag(command)
  args = parser.parse_args(argv)
  if args.command == "list":
    return _list()
  # Errors (an unknown name: exit 2; files missing and no download: exit 1) reach the
  # boundary, which prints them as one line.
  prepare.prepare(args.name, data_dir=args.data_dir, source_dir=args.source_dir,
                  download=True if args.download else None, force=args.force)
  return 0


if __name__ == "__main__":
  sys.exit(main())

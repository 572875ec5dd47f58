"""`python -m retro_jax.data`: prepare TFDS datasets on machines without internet.

  python -m retro_jax.data prepare fashion_mnist [--data-dir DIR]
  python -m retro_jax.data prepare NAME [--data-dir DIR|gs://...] [--manual-dir DIR] [--try-gcs]
  python -m retro_jax.data list

`prepare NAME` builds TFDS's NAME dataset with TFDS's own builder from files already on disk
(for fashion_mnist: the IDX files of Debian's dataset-fashion-mnist), so that afterwards
`tfds.load(NAME, download=False)` works offline and gives what a normal download gives. Where
the files are missing it downloads, if the download host answers; otherwise it stops at once
and says how to get the files. Without --data-dir the dataset goes to TFDS's default folder
($TFDS_DATA_DIR, else ~/tensorflow_datasets), where tfds.load looks by default.

Any other TFDS name (`prepare imagenette`, `prepare imagenet2012 --manual-dir DIR`) runs TFDS's
own download_and_prepare (retro_jax/data/prepare_catalog.py): --manual-dir holds the files a
dataset needs downloaded by hand, --try-gcs takes TFDS's prepared copy from its GCS bucket
where TFDS has one, and --data-dir may be gs://. What TFDS needs (the files, the network) is
checked first, and TFDS never retries a download.

Exit status: 0 done or already prepared, 1 the data cannot be had (message on stderr),
2 usage error (e.g. an unknown dataset name).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from retro_jax import storage
from retro_jax import user_errors
from retro_jax.data import prepare
from retro_jax.data import prepare_catalog


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
  build.add_argument("name", metavar="NAME",
                     help=f"offline recipes: {', '.join(prepare.DATASETS)}; or any TFDS name")
  build.add_argument("--data-dir", type=storage.argument, default=None, metavar="DIR",
                     help="TFDS data directory to build into (default: $TFDS_DATA_DIR, else "
                     "~/tensorflow_datasets)")
  source = build.add_mutually_exclusive_group()
  source.add_argument("--source-dir", type=pathlib.Path, default=None, metavar="DIR",
                      help="folder holding the dataset's files (default: the dataset's usual "
                      "place, e.g. /usr/share/datasets/fashion-mnist); never downloads")
  source.add_argument("--download", action="store_true",
                      help="ignore local files and let TFDS download the dataset")
  build.add_argument("--manual-dir", type=storage.argument, default=None, metavar="DIR",
                     help="other TFDS datasets: the files downloaded by hand (TFDS's manual_dir)")
  build.add_argument("--try-gcs", action="store_true",
                     help="other TFDS datasets: TFDS's prepared copy on GCS, where it has one")
  build.add_argument("--force", action="store_true",
                     help="rebuild even if the dataset is already prepared")
  for command in (parser, build):
    user_errors.add_debug_flag(command)
  args = parser.parse_args(argv)
  if args.command == "list":
    return _list()
  # Errors (an unknown name: exit 2; files missing and no download: exit 1) reach the
  # boundary, which prints them as one line.
  if args.name not in prepare.DATASETS:
    if args.source_dir is not None or args.download:
      build.error(f"--source-dir and --download belong to the offline recipes "
                  f"({', '.join(prepare.DATASETS)}); for {args.name} use --manual-dir or "
                  "--try-gcs")
    prepare_catalog.prepare_catalog(args.name, data_dir=args.data_dir,
                                    manual_dir=args.manual_dir, try_gcs=args.try_gcs,
                                    force=args.force)
    return 0
  if args.manual_dir is not None or args.try_gcs:
    build.error(f"--manual-dir and --try-gcs are for other TFDS datasets; {args.name} is built "
                "from its recipe's files (--source-dir) or downloaded (--download)")
  prepare.prepare(args.name, data_dir=args.data_dir, source_dir=args.source_dir,
                  download=True if args.download else None, force=args.force)
  return 0


if __name__ == "__main__":
  sys.exit(main())

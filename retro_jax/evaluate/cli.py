"""`python -m retro_jax.evaluate`: k-NN and linear-probe accuracy of a model directory.

  python -m retro_jax.evaluate --checkpoint MODEL_DIR --dataset tfds:fashion_mnist \\
      --data-dir DIR --train-split train --test-split test --protocol knn,linear \\
      [--features backbone|embedding|both] [--label-fraction 0.01 | --split-file 1percent.txt] \\
      [--image-size 32] [--linear-epochs 100] [--out DIR]

Features are extracted once per split through the deterministic eval view, every example
included (`retro_jax.evaluate.features`), from the frozen model in eval mode; then

  knn     DINO's weighted k-NN (cosine, votes exp(s / 0.07)), k = 20 and 200
          (`retro_jax.evaluate.knn`, the code of the online monitor);
  linear  Linear(D, C) trained with SGD on the cached features: the reference recipe (momentum
          0.9, no weight decay, batch 256, 100 epochs, lr 3.0 halved at epochs 5, 10, ..., 45,
          60, 80: `retro_jax.evaluate.linear`), without train-time augmentation; the augmented
          protocol is `python -m retro_jax.main --config configs/finetune.py:linear`.

`--features embedding` reads the model's head output (for a Retro student exported with its
adapter, the pooled adapter output that the authors' linear evaluation uses), `backbone` the
pooled backbone feature. `--label-fraction F` (or a SimCLR `--split-file`) keeps a
class-balanced F of the training split's labels for both protocols (semi-supervised
evaluation; `retro_jax.evaluate.subsets`). Splits take TFDS slices ("train[:10000]").

Prints a table (protocol, features, top-1, top-5) and writes OUT/results.json; features are
cached in OUT/features (delete it, or pass --no-cache, to recompute).

Several hosts: run the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or let JAX detect them on Cloud TPU / SLURM); each process
extracts the features of its share of every split, every process gets all of them, and
process 0 prints and writes the results.

Exit status: 0 done, 1 bad input (message on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from retro_jax import distributed
from retro_jax import output_paths
from retro_jax import storage
from retro_jax import user_errors

PROTOCOLS = ("knn", "linear")
KNN_KS = (20, 200)
DEFAULT_BATCH_SIZE = 256


def _classes(*label_arrays) -> int:
  return int(max(int(labels.max()) for labels in label_arrays)) + 1


def evaluate_model(model_dir: str | os.PathLike, *, dataset: str,
                   data_dir: str | os.PathLike | None = None, train_split: str = "train",
                   test_split: str = "test", protocols: Sequence[str] = PROTOCOLS,
                   features: Sequence[str] = ("backbone",), image_size: int | None = None,
                   linear_epochs: int | None = None, linear_lr: float | None = None,
                   linear_batch_size: int | None = None, linear_normalize: str = "none",
                   knn_ks: Sequence[int] = KNN_KS,
                   batch_size: int = DEFAULT_BATCH_SIZE, label_fraction: float | None = None,
                   split_file: str | os.PathLike | None = None, seed: int = 0,
                   cache_dir: str | os.PathLike | None = None,
                   log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
  """Evaluates a model directory; returns one row per (protocol, features).

  Args:
    model_dir: a retro_jax model directory.
    dataset, data_dir: the labelled dataset ('tfds:NAME' or 'folder:PATH') and TFDS directory.
    train_split, test_split: the splits (TFDS slices allowed, e.g. "train[:10000]").
    protocols: some of "knn", "linear".
    features: some of "backbone", "embedding".
    image_size: the eval view's side (None: Resize 256 + CenterCrop 224; <= 64: the whole
      image resized, for 28-32 px data).
    linear_epochs, linear_lr, linear_batch_size: the linear probe (None: the reference
      recipe's 100 epochs, lr 3.0, batch 256).
    linear_normalize: 'none' (the reference), 'l2' or 'standardize' (per-dimension, train
      statistics) features before the linear probe; see `linear.train_linear_on_features`.
    knn_ks: the k of the k-NN rows.
    batch_size: images per forward pass during feature extraction.
    label_fraction, split_file: keep a class-balanced fraction of the training labels, or the
      examples a SimCLR split file names (semi-supervised evaluation).
    seed: the linear probe's and the label subset's seed.
    cache_dir: keep the extracted features there (.npz) and reuse them.
    log: progress messages (None: silent).

  Returns:
    [{"protocol": "knn_k20" | "knn_k200" | "linear", "features": ..., "top1": ...,
      "top5": ..., "train_examples", "test_examples", "num_classes", ...}, ...];
    accuracies in percent (top5 None below 5 classes).
  """
  from retro_jax.evaluate import features as features_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.evaluate import knn  # pylint: disable=g-import-not-at-top
  from retro_jax.evaluate import linear  # pylint: disable=g-import-not-at-top
  from retro_jax.evaluate import subsets  # pylint: disable=g-import-not-at-top

  say = log or (lambda message: None)
  protocols = tuple(protocols)
  unknown = [p for p in protocols if p not in PROTOCOLS]
  if not protocols or unknown:
    raise ValueError(f"protocols must be some of {PROTOCOLS}, got {protocols}")
  which = features_lib.check_which(tuple(features))
  if label_fraction is not None and split_file is not None:
    raise ValueError("give a label fraction or a split file, not both")

  # Both splits are opened (names, slices, labels) before the model is loaded: a mistyped
  # test split fails in a second, not after the training split's features.
  from retro_jax.data import sources  # pylint: disable=g-import-not-at-top
  for split in (train_split, test_split):
    sources.open_source(dataset, split, data_dir)
  names = None if split_file is None else subsets.read_split_file(split_file)

  started = time.perf_counter()
  extractor = features_lib.FeatureExtractor(model_dir, which=which, image_size=image_size,
                                            batch_size=batch_size)
  data = {}
  for role, split in (("train", train_split), ("test", test_split)):
    t = time.perf_counter()
    data[role] = extractor.extract(dataset, split, data_dir=data_dir, cache_dir=cache_dir)
    if role == "train":
      train_skipped = extractor.last_skipped
    say(f"features of {dataset} {split}: {len(data[role][1])} examples, "
        f"{time.perf_counter() - t:.1f} s")
  extract_seconds = time.perf_counter() - started
  (train_parts, train_labels), (test_parts, test_labels) = data["train"], data["test"]
  num_classes = _classes(train_labels, test_labels)

  rows_kept = None  # Semi-supervised: the labelled rows of the training split.
  if label_fraction is not None:
    rows_kept = subsets.balanced_subset(train_labels, label_fraction, seed=seed)
  elif split_file is not None:
    if train_skipped:
      raise subsets.SubsetError(f"{train_skipped} examples of {train_split} were unreadable, "
                                "so rows no longer match example ids; cannot apply a split file")
    source = sources.open_source(dataset, train_split, data_dir)
    rows_kept = subsets.indices_of_files(names, subsets.source_file_names(source))
  if rows_kept is not None:
    train_labels = train_labels[rows_kept]
    train_parts = {name: x[rows_kept] for name, x in train_parts.items()}
    say(f"semi-supervised: {len(rows_kept)} labelled training examples")

  used_ks = _used_ks(knn_ks, len(train_labels), say) if "knn" in protocols else {}
  common = {"train_examples": int(len(train_labels)), "test_examples": int(len(test_labels)),
            "num_classes": num_classes, "label_fraction": label_fraction,
            "split_file": None if split_file is None else str(split_file)}
  results = []
  for name in which:
    train_x, test_x = train_parts[name], test_parts[name]
    if "knn" in protocols:
      t = time.perf_counter()
      accuracies = knn.knn_accuracy(train_x, train_labels, test_x, test_labels,
                                    num_classes=num_classes, ks=tuple(used_ks))
      for k, requested in used_ks.items():
        row = {"protocol": f"knn_k{k}", "features": name, "top1": accuracies[f"knn_top1_k{k}"],
               "top5": accuracies.get(f"knn_top5_k{k}"), "k": k}
        if requested != [k]:
          row["k_requested"] = requested
        results.append({**row, "temperature": knn.TEMPERATURE, **common,
                        "seconds": time.perf_counter() - t})
    if "linear" in protocols:
      t = time.perf_counter()
      probe = linear.train_linear_on_features(
          train_x, train_labels, test_x, test_labels, num_classes=num_classes,
          epochs=linear.EPOCHS if linear_epochs is None else linear_epochs,
          lr=linear.LR if linear_lr is None else linear_lr,
          batch_size=linear.BATCH_SIZE if linear_batch_size is None else linear_batch_size,
          normalize=linear_normalize, seed=seed)
      results.append({"protocol": "linear", "features": name, "top1": probe["top1"],
                      "top5": probe["top5"], "best_top1": probe["best_top1"],
                      "epochs": probe["epochs"], "lr": probe["lr"],
                      "batch_size": probe["batch_size"], "normalize": probe["normalize"],
                      "final_train_loss": probe["train_loss"][-1], **common,
                      "seconds": time.perf_counter() - t})
  for row in results:
    row["extract_seconds"] = extract_seconds
  return results


def _used_ks(knn_ks: Sequence[int], train_examples: int,
             say: Callable[[str], None]) -> dict[int, list[int]]:
  """{k used: [the requested ks it stands for]}: a k above the training examples is that many.

  The row is named by the k that was used (knn_k64, not knn_k200), with `k_requested`.
  """
  used: dict[int, list[int]] = {}
  for k in knn_ks:  # k < 1 is left to knn_accuracy, which refuses it.
    used.setdefault(min(k, train_examples), []).append(k)
  for k, requested in used.items():
    if requested != [k]:
      say(f"k-NN: k={', '.join(map(str, requested))} exceeds the {train_examples} labelled "
          f"training examples: the row knn_k{k} uses k={k}")
  return used


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """protocol | features | top-1 | top-5, percentages with two decimals."""
  def pct(value):
    return "-" if value is None else f"{value:.2f}"
  lines = [f"{'protocol':<10} {'features':<10} {'top-1':>7} {'top-5':>7}"]
  lines += [f"{row['protocol']:<10} {row['features']:<10} {pct(row['top1']):>7} "
            f"{pct(row['top5']):>7}" for row in rows]
  return "\n".join(lines)


def _list(value: str, choices: Sequence[str], what: str) -> tuple[str, ...]:
  items = tuple(item.strip() for item in value.split(",") if item.strip())
  if value == "both" and what == "features":
    return tuple(choices)
  bad = [item for item in items if item not in choices]
  if not items or bad:
    raise argparse.ArgumentTypeError(f"{what} must be a comma list of {', '.join(choices)}; "
                                     f"got {value!r}")
  return items


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.evaluate") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  parser.add_argument("--checkpoint", required=True, type=storage.argument,
                      help="a retro_jax model directory (converted, trained or exported)")
  parser.add_argument("--dataset", required=True, help="tfds:NAME[:VERSION] or folder:PATH")
  parser.add_argument("--data-dir", default=None, help="the TFDS data directory")
  parser.add_argument("--train-split", default="train")
  parser.add_argument("--test-split", default="test")
  parser.add_argument("--protocol", default="knn,linear",
                      type=lambda v: _list(v, PROTOCOLS, "protocol"))
  parser.add_argument("--features", default="backbone",
                      type=lambda v: _list(v, ("backbone", "embedding"), "features"),
                      help="backbone, embedding, or both")
  parser.add_argument("--label-fraction", type=float, default=None,
                      help="keep a class-balanced fraction of the training labels")
  parser.add_argument("--split-file", type=pathlib.Path, default=None,
                      help="SimCLR split file (image names) of the labelled examples")
  parser.add_argument("--image-size", type=int, default=None,
                      help="eval view side; <= 64 resizes the whole image (small datasets)")
  parser.add_argument("--linear-epochs", type=int, default=None)
  parser.add_argument("--linear-lr", type=float, default=None)
  parser.add_argument("--linear-batch-size", type=int, default=None)
  parser.add_argument("--linear-normalize", choices=("none", "l2", "standardize"),
                      default="none", help="feature normalisation before the linear probe "
                      "(none: the reference; standardize for large-norm features)")
  parser.add_argument("--knn-k", default="20,200", help="comma list of k")
  parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                      help="images per forward pass (a multiple of the device count)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=storage.argument, default=None,
                      help="write results.json here (and cache features in OUT/features)")
  parser.add_argument("--no-cache", action="store_true", help="do not cache features")
  distributed.add_flags(parser)
  user_errors.add_debug_flag(parser)
  args = parser.parse_args(argv)
  try:  # Before anything touches a JAX backend.
    distributed.initialize(sys.argv[1:] if argv is None else argv)
  except distributed.DistributedError as error:
    print(f"{prog}: error: could not join the multi-process run: {error}", file=sys.stderr)
    return 1
  try:
    ks = tuple(int(k) for k in args.knn_k.split(","))
  except ValueError:
    ks = ()
  if not ks or min(ks) < 1:
    parser.error(f"--knn-k must be a comma list of positive integers, got {args.knn_k!r}")
  if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
    parser.error(f"--label-fraction must lie in (0, 1], got {args.label_fraction}")
  if args.label_fraction is not None and args.split_file is not None:
    parser.error("give --label-fraction or --split-file, not both")
  if args.image_size is not None and args.image_size < 1:
    parser.error("--image-size must be positive")

  if args.out is not None:
    output_paths.check_directory(args.out, "--out")  # Before any feature is extracted.

  cache_dir = None if args.out is None or args.no_cache else args.out / "features"
  started = time.perf_counter()
  rows = evaluate_model(
      args.checkpoint, dataset=args.dataset, data_dir=args.data_dir,
      train_split=args.train_split, test_split=args.test_split, protocols=args.protocol,
      features=args.features, image_size=args.image_size, linear_epochs=args.linear_epochs,
      linear_lr=args.linear_lr, linear_batch_size=args.linear_batch_size,
      linear_normalize=args.linear_normalize, knn_ks=ks,
      batch_size=args.batch_size, label_fraction=args.label_fraction,
      split_file=args.split_file, seed=args.seed, cache_dir=cache_dir,
      log=lambda message: print(message, file=sys.stderr, flush=True))
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:  # every process has the results; process 0 reports them
    return 0
  print(format_table(rows), flush=True)
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"checkpoint": str(args.checkpoint), "dataset": args.dataset,
                "data_dir": args.data_dir, "train_split": args.train_split,
                "test_split": args.test_split, "image_size": args.image_size,
                "seconds": time.perf_counter() - started, "results": rows}
    (args.out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}", file=sys.stderr)
    from retro_jax import report  # pylint: disable=g-import-not-at-top
    columns = ("protocol", "features", "top1", "top5", "train_examples", "test_examples")
    path = report.write_results_report(
        args.out, f"Evaluation of {args.checkpoint} on {args.dataset}",
        [{c: row.get(c) for c in columns} for row in rows])
    print(f"wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

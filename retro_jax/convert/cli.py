"""`python -m retro_jax.convert`: a PyTorch checkpoint -> a retro_jax model directory.

  python -m retro_jax.convert --src moco_v2_800ep_pretrain.pth.tar --format moco \\
      --arch resnet50 --out teachers/mocov2_r50

Formats: `torchvision` and `timm` (plain state dicts of the registered architectures), `moco`
(MoCo v1/v2 training checkpoints: the query encoder and its head), `dino` (DINO backbone-only
files, or full training checkpoints: the EMA teacher and its head), `swav` (SwAV's released
ResNets with their projection head and prototypes), `msn` (MSN ViTs with their projection
head and prototypes, from MSN's released files or VISSL's checkpoints), `ibot` (iBOT's full
checkpoints: the EMA teacher ViT and its head, shared by CLS and patch tokens). The result is
an Orbax checkpoint plus model.json (see `retro_jax.checkpoint`) that training configs name
as the teacher. Conversion is all or nothing: any missing, unexpected or mis-shaped entry
stops it with the list, and nothing is written.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import pathlib
import sys
from typing import Any

from retro_jax import output_paths
from retro_jax import storage
from retro_jax import user_errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConversionError(user_errors.UserError):
  """A user-facing failure: printed as one message, exit code 1."""


def _floats3(text: str) -> tuple[float, float, float]:
  try:
    values = tuple(float(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) != 3:
    raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
  return values  # type: ignore[return-value]


def sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as file:
    for block in iter(lambda: file.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_torch_file(path: pathlib.Path) -> Any:
  """torch.load with the safe (weights-only) unpickler, and messages a user can act on."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(
        "reading PyTorch checkpoints needs torch, which retro_jax does not need otherwise: "
        "pip install torch (CPU wheels: see the README)") from None
  from retro_jax.convert.formats import SAFE_GLOBALS  # pylint: disable=g-import-not-at-top

  try:
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    # torch raises RuntimeError, EOFError, UnpicklingError, ... depending on the damage.
    unpickler, reason = _torch_load_reason(error)
    if unpickler.startswith("Unsupported global"):
      raise ConversionError(
          f"{path} holds pickled Python objects besides tensors ({unpickler}); retro_jax reads "
          "checkpoints with torch's safe, weights-only loader and never runs code from a file. "
          "If you trust the file, load it in PyTorch yourself and save its weights alone: "
          "torch.save(checkpoint['state_dict'], PATH) (or model.state_dict())") from None
    raise ConversionError(f"cannot read {path} as a PyTorch checkpoint (truncated, corrupt or "
                          f"not a torch file?): {reason}") from None


def _torch_load_reason(error: Exception) -> tuple[str, str]:
  """(the weights-only unpickler's own complaint or "", a one-line reason) of a failed load.

  torch's UnpicklingError opens with advice to pass weights_only=False, which would run any
  code the file holds and which this CLI cannot do: only the unpickler's complaint is kept.
  """
  text = str(error)
  if "WeightsUnpickler error:" in text:
    unpickler = text.split("WeightsUnpickler error:", 1)[1]
    unpickler = unpickler.split("Check the documentation of torch.load")[0]
    unpickler = unpickler.split(". Please use `torch.serialization")[0]
    unpickler = " ".join(unpickler.split()).rstrip(".")
    return unpickler, f"{type(error).__name__}: {unpickler}"
  first = text.strip().splitlines()[0] if text.strip() else ""
  return "", f"{type(error).__name__}: {first}" if first else type(error).__name__


def guess_architecture(backbone_state: dict[str, Any], near: str) -> str | None:
  """A registered backbone whose torch keys and shapes equal the file's exactly, if any.

  `backbone_state` is the file's backbone as split for `near` (the --arch asked for): it may
  still hold another family's classifier, which is left out of each candidate's comparison.
  """
  from retro_jax.convert.formats import classifier_prefixes  # pylint: disable=g-import-not-at-top
  from retro_jax.convert.formats import family  # pylint: disable=g-import-not-at-top
  from retro_jax.convert.formats import has_family_keys  # pylint: disable=g-import-not-at-top
  from retro_jax.models import registry  # pylint: disable=g-import-not-at-top

  def wanted(name: str) -> dict[str, tuple[int, ...]]:
    # Without `name`'s ImageNet classifier: the split of the file for another family (the
    # --arch given) kept it in the backbone, e.g. `classifier.*` when --arch was a ResNet.
    return {k: tuple(v.shape) for k, v in backbone_state.items()
            if not k.endswith("num_batches_tracked")
            and not k.startswith(classifier_prefixes(name))}

  # Building each candidate's shapes costs a second or more (a ViT-L three): only families
  # whose kind of keys the file has (no other can match it exactly), the one asked for first,
  # shorter names first within a family (resnet18 before resnet101, cheaper to build).
  names = sorted((name for name in registry.backbone_names()
                  if has_family_keys(name, backbone_state)),
                 key=lambda name: (family(name) != family(near), len(name), name))
  return next((name for name in names if _backbone_shapes(name) == wanted(name)), None)


@functools.cache
def _backbone_shapes(name: str) -> dict[str, tuple[int, ...]]:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from retro_jax.convert.state_dict import torch_shapes  # pylint: disable=g-import-not-at-top
  from retro_jax.models import registry  # pylint: disable=g-import-not-at-top

  return torch_shapes(nnx.eval_shape(lambda: registry.create_backbone(name, rngs=nnx.Rngs(0))))


def convert(src: pathlib.Path, fmt: str, arch: str, out: pathlib.Path, *,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, overwrite: bool = False) -> dict[str, Any]:
  """Converts one file; returns the written description.

  Raises:
    ConversionError: the file cannot be read or converted.
    output_paths.OutputPathError: `out` cannot be written (checked before the file is read).
  """
  # Imported here so that `--help` and argument errors stay instant.
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from retro_jax.convert import formats  # pylint: disable=g-import-not-at-top
  from retro_jax.convert.state_dict import StateDictMismatchError  # pylint: disable=g-import-not-at-top
  from retro_jax.convert.state_dict import load_state_dict  # pylint: disable=g-import-not-at-top
  from retro_jax.models import encoder  # pylint: disable=g-import-not-at-top
  from retro_jax.models import registry  # pylint: disable=g-import-not-at-top

  if arch not in registry.backbone_names():
    raise ConversionError(f"unknown --arch {arch!r}; known: {', '.join(registry.backbone_names())}")
  if not src.is_file():
    raise ConversionError(f"--src {src}: no such file")
  output_paths.check_directory(out, "--out")
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise ConversionError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")

  obj = read_torch_file(src)
  try:
    split = formats.FORMATS[fmt](obj, arch)
  except formats.CheckpointFormatError as error:
    raise ConversionError(f"{src} is not a {fmt!r} checkpoint for {arch}: {error}") from None
  spec = encoder.EncoderSpec(arch, split.backbone_kwargs, split.head_kind, split.head_kwargs)
  # Shapes only: the strict loader below gives every weight its value or fails.
  model = encoder.abstract_encoder(spec)
  try:
    load_state_dict(model.backbone, split.backbone, context=f"{src} ({fmt}, backbone {arch}): ")
  except StateDictMismatchError as error:
    looks_like = guess_architecture(split.backbone, near=arch)
    hint = (f"\nThe file's backbone looks like: {looks_like} (use --arch {looks_like})"
            if looks_like else "\nIt matches no registered architecture exactly.")
    raise ConversionError(f"{error}{hint}") from None
  if split.head is not None:
    try:
      load_state_dict(model.head, split.head, context=f"{src} ({fmt}, {split.head_kind} head): ")
    except StateDictMismatchError as error:
      raise ConversionError(str(error)) from None

  description = {
      "input": {"mean": list(mean), "std": list(std)},
      "source": {"format": fmt, "file": str(src.absolute()), "sha256": sha256(src)},
      "head": None if split.head is None else {"kind": split.head_kind, **split.head_kwargs},
      "ignored_entries": dict(sorted(split.ignored.items())),
  }
  checkpoint.save_model(out, model, spec, description, overwrite=overwrite)
  return description


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.convert") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  parser.add_argument("--src", required=True, type=pathlib.Path, help="the PyTorch file")
  parser.add_argument("--format", required=True,
                      choices=("torchvision", "timm", "moco", "dino", "msn", "swav",
                               "ibot"))
  parser.add_argument("--arch", required=True, help="registered backbone name, e.g. resnet50")
  parser.add_argument("--out", required=True, type=storage.argument,
                      help="model directory to write (local or gs://...)")
  parser.add_argument("--mean", type=_floats3, default=IMAGENET_MEAN,
                      help="input normalisation mean, R,G,B (default: ImageNet's)")
  parser.add_argument("--std", type=_floats3, default=IMAGENET_STD,
                      help="input normalisation std, R,G,B (default: ImageNet's)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  user_errors.add_debug_flag(parser)
  args = parser.parse_args(argv)
  description = convert(args.src, args.format, args.arch, args.out, mean=args.mean,
                        std=args.std, overwrite=args.overwrite)
  head = description["head"]
  print(f"converted {args.src} ({args.format}) -> {args.out}")
  print(f"  backbone  {args.arch}")
  print(f"  head      {head['kind'] + ' ' + str({k: v for k, v in head.items() if k != 'kind'}) if head else 'none'}")
  print(f"  sha256    {description['source']['sha256']}")
  reasons: dict[str, int] = {}
  for reason in description["ignored_entries"].values():
    reasons[reason] = reasons.get(reason, 0) + 1
  for reason, count in reasons.items():
    print(f"  ignored   {count} entries: {reason}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Hands a trained model on: `python -m retro_jax.export`.

  python -m retro_jax.export --workdir runs/effb0 --out exports/effb0 --format orbax
  python -m retro_jax.export --workdir runs/effb0 --out exports/effb0.pt --format torch

--workdir is a training workdir (`python -m retro_jax.main`; its model is WORKDIR/student),
a multi-stage workdir (WORKDIR/stages.json names the stages; the final one is exported unless
--stage NAME) or a model directory itself (e.g. a `convert` output).

`orbax` writes a model directory (Orbax weights + model.json) that `checkpoint.load_model` and
`python -m retro_jax.embed --checkpoint OUT` read: the backbone alone, or with the method's
head if --with-head. `torch` writes a PyTorch state dict of the backbone in torchvision's
layout (timm's for ViTs), without the classifier, and OUT with the suffix .json beside it: the
torch constructor, the lines that build the model and load the file with strict=True, and the
input mean/std. If OUT has no suffix or is a directory, the files are OUT/ARCH.pt and
OUT/ARCH.json. Nothing is overwritten unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

from retro_jax import output_paths
from retro_jax import storage
from retro_jax import user_errors

FORMATS = ("orbax", "torch")
STAGES_JSON = "stages.json"
MODEL_JSON = "model.json"  # retro_jax.checkpoint.MODEL_JSON, without importing JAX for it.
TORCH_FORMAT = "retro_jax.torch_export"

# Backbone kwargs that change nothing in a float32 eval-mode forward: the computation dtype,
# initialisation and training-only settings.
_NO_EFFECT_IN_TORCH = {"dtype", "zero_init_residual"}
_TIMM_VITS = {"vit_tiny_patch16": "vit_tiny_patch16_224",
              "vit_small_patch16": "vit_small_patch16_224",
              "vit_base_patch16": "vit_base_patch16_224"}
# Output channels of the first convolution, for a changed `in_channels`.
_STEM_CHANNELS = {"efficientnet": 32, "mobilenet_v3": 16}


class ExportError(user_errors.UserError):
  """A user-facing failure: printed as one message, exit code 1."""


def _read_stages(path: pathlib.Path) -> dict[str, Any]:
  try:
    stages = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as error:
    raise ExportError(f"cannot read {path}: {error}") from None
  if (not isinstance(stages, dict) or not isinstance(stages.get("stages"), dict)
      or not all(isinstance(v, str) for v in stages["stages"].values())
      or stages.get("final") not in stages["stages"]):
    raise ExportError(f"{path} is not a stages file: expected {{\"final\": NAME, \"stages\": "
                      f"{{NAME: SUB_WORKDIR, ...}}}} with `final` one of the stages")
  return stages


def _checkpoint_steps(directory: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _student_dir(workdir: pathlib.Path, what: str) -> pathlib.Path:
  """WORKDIR/student of a training workdir, or why there is none; `what` names the workdir."""
  student = workdir / "student"
  if (student / MODEL_JSON).is_file():
    return student
  if not workdir.is_dir():
    raise ExportError(f"{what} has not started: no directory {workdir}")
  checkpoints = workdir / "checkpoints"
  if checkpoints.is_dir():
    steps = _checkpoint_steps(checkpoints)
    at = f" (last checkpoint: step {steps[-1]})" if steps else ""
    raise ExportError(
        f"the run in {what} has not finished{at}: {student / MODEL_JSON} is written only at "
        f"its end. Let it finish, or rerun the same command (same --workdir) to resume it, "
        f"then export.")
  raise ExportError(f"{what} is not a training workdir: it has no {student / MODEL_JSON} "
                    f"(written at the end of `python -m retro_jax.main`), no checkpoints/ and "
                    f"no {STAGES_JSON}")


def resolve_model_dir(workdir: str | pathlib.Path, stage: str | None = None) -> pathlib.Path:
  """The model directory to export from `workdir`.

  Args:
    workdir: a training workdir (its `student/`), a multi-stage workdir (`stages.json`:
      {"final": NAME, "stages": {NAME: SUB_WORKDIR relative to workdir}}), or a model
      directory (holding model.json).
    stage: the stage of a multi-stage workdir (default: its `final` one).

  Raises:
    ExportError: no such workdir or stage, or the run has not finished.
  """
  workdir = storage.path(workdir)
  if not workdir.exists():
    raise ExportError(f"--workdir {workdir}: no such directory")
  if not workdir.is_dir():
    raise ExportError(f"--workdir {workdir} is a file, not a workdir")
  if (workdir / STAGES_JSON).is_file():
    stages = _read_stages(workdir / STAGES_JSON)
    name = stages["final"] if stage is None else stage
    if name not in stages["stages"]:
      raise ExportError(f"unknown --stage {name!r}; {workdir / STAGES_JSON} has "
                        f"{', '.join(stages['stages'])} (final: {stages['final']})")
    sub = workdir / stages["stages"][name]
    return _student_dir(sub, f"stage {name!r} ({sub})")
  if stage is not None:
    raise ExportError(f"--stage {stage}: {workdir} has no {STAGES_JSON}, it is not a "
                      "multi-stage workdir (drop --stage)")
  if (workdir / MODEL_JSON).is_file():
    return workdir
  return _student_dir(workdir, f"--workdir {workdir}")


def torch_recipe(architecture: str, backbone_kwargs: dict[str, Any]) -> dict[str, Any]:
  """How to build the torch model that an exported backbone's state dict loads into.

  Returns:
    {"library", "constructor" (a Python expression), "lines" (statements that make `model`
    the backbone: classifier replaced by Identity, stems patched), "notes"}.

  Raises:
    ExportError: torchvision and timm have no such model (e.g. SwAV's ResNet-50w2), or a
      backbone kwarg has no torch equivalent.
  """
  kwargs = {k: v for k, v in backbone_kwargs.items() if k not in _NO_EFFECT_IN_TORCH}
  notes = [f"ignored backbone kwargs {sorted(set(backbone_kwargs) - set(kwargs))}: no effect "
           "on a float32 eval-mode forward"] if len(kwargs) < len(backbone_kwargs) else []
  imports, lines, positional, constructor_kwargs = ["import torch"], [], [], {}
  in_channels = kwargs.pop("in_channels", 3)
  if architecture.startswith("resnet") and architecture != "resnet50x2":
    library, constructor = "torchvision", f"torchvision.models.{architecture}"
    low_res = kwargs.pop("low_res_stem", False)
    width = kwargs.pop("width", 64)
    if width != 64:
      kwargs["width"] = width  # Refused below: torchvision's stem is 64 wide.
    lines.append("model.fc = torch.nn.Identity()")
    if low_res or in_channels != 3:
      k, s, p = (3, 1, 1) if low_res else (7, 2, 3)
      lines.append(f"model.conv1 = torch.nn.Conv2d({in_channels}, 64, kernel_size={k}, "
                   f"stride={s}, padding={p}, bias=False)")
    if low_res:
      lines.append("model.maxpool = torch.nn.Identity()")
      notes.append("low_res_stem: conv1 is 3x3 stride 1 and there is no max-pool (the lines "
                   "above patch torchvision's model)")
  elif architecture.startswith(("efficientnet", "mobilenet_v3")):
    library, constructor = "torchvision", f"torchvision.models.{architecture}"
    family = "efficientnet" if architecture.startswith("efficientnet") else "mobilenet_v3"
    if family == "efficientnet" and "drop_path_rate" in kwargs:
      constructor_kwargs["stochastic_depth_prob"] = kwargs.pop("drop_path_rate")
    if family == "mobilenet_v3" and ("bn_eps" in kwargs or "bn_momentum" in kwargs):
      eps, momentum = kwargs.pop("bn_eps", 1e-3), kwargs.pop("bn_momentum", 0.01)
      imports.append("import functools")
      constructor_kwargs["norm_layer"] = _Literal(
          f"functools.partial(torch.nn.BatchNorm2d, eps={eps!r}, momentum={momentum!r})")
    if family == "mobilenet_v3" and kwargs.pop("conv_head", False):
      # Our conv head is torchvision's classifier.0 (Linear) + classifier.1 (Hardswish).
      lines.append("model.classifier = model.classifier[:2]")
      notes.append("conv_head: the backbone ends with classifier[:2] (Linear + Hardswish on "
                   "the pooled feature), timm's conv_head + act2")
    else:
      lines.append("model.classifier = torch.nn.Identity()")
    if in_channels != 3:
      lines.append(f"model.features[0][0] = torch.nn.Conv2d({in_channels}, "
                   f"{_STEM_CHANNELS[family]}, kernel_size=3, stride=2, padding=1, bias=False)")
  elif architecture in _TIMM_VITS:
    library, constructor = "timm", "timm.create_model"
    positional = [repr(_TIMM_VITS[architecture])]
    constructor_kwargs = {"pretrained": False, "num_classes": 0}
    for ours, theirs in (("img_size", "img_size"), ("patch_size", "patch_size"),
                         ("mlp_ratio", "mlp_ratio"), ("drop_path_rate", "drop_path_rate")):
      if ours in kwargs:
        constructor_kwargs[theirs] = kwargs.pop(ours)
    if in_channels != 3:
      constructor_kwargs["in_chans"] = in_channels
    size = constructor_kwargs.get("img_size", 224)
    notes.append(f"timm's model takes {size} px images only; retro_jax resamples the position "
                 "embedding for other sizes (see retro_jax/models/vit.py)")
    kwargs.pop("pos_embed_offset", None)  # Only used at other input sizes.
  else:
    raise ExportError(f"--format torch: {architecture} has no torchvision or timm model to load "
                      "into; export it with --format orbax")
  if kwargs:
    raise ExportError(f"--format torch: backbone kwargs {kwargs} of {architecture} have no "
                      f"{library} equivalent; export it with --format orbax")
  arguments = positional + [f"{k}={v!r}" for k, v in constructor_kwargs.items()]
  call = f"{constructor}({', '.join(arguments)})"
  return {"library": library, "constructor": call,
          "lines": [*imports, f"import {library}", f"model = {call}", *lines], "notes": notes}


class _Literal(str):
  """A kwarg value written into the generated code as it is (not repr-quoted)."""

  def __repr__(self) -> str:
    return str(self)


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ExportError("--format torch needs PyTorch, which retro_jax does not need otherwise: "
                      "pip install torch (CPU wheels: see the README)") from None
  return torch


def _torch_paths(out: pathlib.Path, architecture: str) -> tuple[pathlib.Path, pathlib.Path]:
  if out.is_dir() or not out.suffix:
    return out / f"{architecture}.pt", out / f"{architecture}.json"
  if out.suffix == ".json":
    raise ExportError(f"--out {out}: name the state-dict file (e.g. {out.with_suffix('.pt')}); "
                      "the .json is written beside it")
  return out, out.with_suffix(".json")


def _same_or_inside(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Whether one path is the other or lies inside it."""
  a, b = (storage.path(os.path.realpath(p)) if storage.is_local(p) else storage.path(p)
          for p in (a, b))
  return a == b or b in a.parents or a in b.parents


def export(workdir: pathlib.Path, out: pathlib.Path, fmt: str, *, stage: str | None = None,
           with_head: bool = False, overwrite: bool = False) -> dict[str, Any]:
  """Exports one model; returns {"paths": what was written, "description"}.

  Raises:
    ExportError: nothing to export there, or it cannot be exported in `fmt`.
    output_paths.OutputPathError: `out` cannot be written (checked before the model loads).
  """
  workdir, out = storage.path(workdir), storage.path(out)
  model_dir = resolve_model_dir(workdir, stage)
  from retro_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from retro_jax.models.encoder import Encoder  # pylint: disable=g-import-not-at-top
  from retro_jax.models.encoder import EncoderSpec  # pylint: disable=g-import-not-at-top

  try:
    source = checkpoint.read_description(model_dir)
  except checkpoint.ModelDirectoryError as error:
    raise ExportError(str(error)) from None
  if "input" not in source:
    raise ExportError(f"{model_dir / MODEL_JSON} has no input normalisation (\"input\")")
  spec = EncoderSpec.from_json(source["encoder"])
  if with_head and spec.head_kind is None:
    raise ExportError(f"--with-head: {model_dir} holds a backbone without a head")
  provenance = {
      "source": {"format": "retro_jax.export", "workdir": str(workdir),
                 "stage": stage if stage is not None else _final_stage(workdir),
                 "model_directory": str(model_dir)},
      "exported_from": source.get("source"),
  }

  if fmt == "orbax":
    if _same_or_inside(out, model_dir):
      raise ExportError(f"--out {out} overlaps the model directory it exports ({model_dir})")
    if out.exists() and not out.is_dir():
      raise ExportError(f"--out {out} is a file; a model directory is written there")
    output_paths.check_directory(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
      raise ExportError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    model = _load(checkpoint, model_dir)
    if with_head:
      encoder, out_spec = model, spec
      # Nested: a head's kwargs may have a `kind` of their own (Retro's adapter).
      head = source.get("head") or {"kind": spec.head_kind, "kwargs": spec.head_kwargs}
    else:
      encoder, out_spec, head = Encoder(model.backbone), EncoderSpec(
          spec.architecture, spec.backbone_kwargs), None
    description = {"architecture": spec.architecture, "input": source["input"], "head": head,
                   **provenance}
    checkpoint.save_model(out, encoder, out_spec, description, overwrite=overwrite)
    return {"paths": [out], "description": description}

  recipe = torch_recipe(spec.architecture, spec.backbone_kwargs)  # Refuses before any work.
  torch = _import_torch()
  pt_path, json_path = _torch_paths(out, spec.architecture)
  if any(_same_or_inside(path, model_dir) for path in (pt_path, json_path)):
    raise ExportError(f"--out {out} is inside the model directory it exports ({model_dir})")
  existing = [p for p in (pt_path, json_path) if p.exists()]
  if existing and not overwrite:
    raise ExportError(f"{', '.join(map(str, existing))} exists (pass --overwrite to replace it)")
  for path in (pt_path, json_path):
    output_paths.check_file(path, "--out")
  from retro_jax.convert.state_dict import model_state_dict  # pylint: disable=g-import-not-at-top

  backbone = _load(checkpoint, model_dir).backbone
  state = {k: torch.from_numpy(v) for k, v in model_state_dict(backbone).items()}
  for key in [k for k in state if k.endswith(".running_mean")]:
    # torch's BatchNorm keeps a counter that strict loading asks for; eval mode ignores it.
    state[key[:-len("running_mean")] + "num_batches_tracked"] = torch.tensor(0)
  lines = recipe["lines"] + [
      f"model.load_state_dict(torch.load({pt_path.name!r}, weights_only=True), strict=True)",
      "model.eval()"]
  description = {
      "format": TORCH_FORMAT, "format_version": 1, "state_dict": pt_path.name,
      "architecture": spec.architecture, "backbone_kwargs": spec.backbone_kwargs,
      "library": recipe["library"], "constructor": recipe["constructor"], "python": lines,
      "feature_width": int(source["feature_width"]),
      "output": (f"model(x) for NCHW float32 images normalised with input.mean/std: the pooled "
                 f"backbone feature, ({source['feature_width']},) per image"),
      "input": source["input"], "notes": recipe["notes"], **provenance}
  pt_path.parent.mkdir(parents=True, exist_ok=True)
  partial = pt_path.with_name(pt_path.name + ".partial")
  with partial.open("wb") as file:
    torch.save(state, file)
  partial.replace(pt_path)
  json_path.write_text(json.dumps(description, indent=2) + "\n")  # Last: the export is complete.
  return {"paths": [pt_path, json_path], "description": description}


def _final_stage(workdir: pathlib.Path) -> str | None:
  path = workdir / STAGES_JSON
  return _read_stages(path)["final"] if path.is_file() else None


def _load(checkpoint, model_dir: pathlib.Path):
  try:
    return checkpoint.load_model(model_dir)[0]
  except (checkpoint.ModelDirectoryError, ValueError) as error:
    raise ExportError(f"cannot load {model_dir}: {error}") from None


@user_errors.boundary
def main(argv: list[str] | None = None, prog: str = "python -m retro_jax.export") -> int:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  parser.add_argument("--workdir", required=True, type=storage.argument,
                      help="training workdir, multi-stage workdir or model directory")
  parser.add_argument("--out", required=True, type=storage.argument,
                      help="model directory (orbax) or .pt file (torch) to write")
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--stage", help="stage of a multi-stage workdir (default: the final one)")
  parser.add_argument("--with-head", action="store_true",
                      help="orbax: keep the method's projection head (default: backbone only)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  user_errors.add_debug_flag(parser)
  args = parser.parse_args(argv)
  if args.with_head and args.format == "torch":
    parser.error("--with-head applies to --format orbax: a torch export is the backbone that "
                 "torchvision/timm models load")
  result = export(args.workdir, args.out, args.format, stage=args.stage,
                  with_head=args.with_head, overwrite=args.overwrite)
  description = result["description"]
  origin = description["exported_from"] or {}
  facts = ", ".join(f"{k} {origin[k]}" for k in ("method", "step", "format") if k in origin)
  stage = description["source"]["stage"]
  print(f"exported {args.workdir}{f' (stage {stage})' if stage else ''} -> "
        f"{', '.join(map(str, result['paths']))}")
  print(f"  backbone  {description['architecture']}" + (f"  ({facts})" if facts else ""))
  if args.format == "orbax":
    head = description["head"]
    print(f"  head      {head['kind'] if head else 'none'}")
    print(f"  use       python -m retro_jax.embed --checkpoint {args.out} --images X.npy "
          "--out F.npy")
  else:
    print("  load      " + "\n            ".join(description["python"]))
  return 0


if __name__ == "__main__":
  sys.exit(main())

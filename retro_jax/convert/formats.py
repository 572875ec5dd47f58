"""Checkpoint formats: which entries of a PyTorch file are the backbone and the head.

Each format is one small function from the loaded file to a `SplitCheckpoint`: the backbone's
and the head's entries under the keys of our module trees (torchvision's layout for CNNs,
timm's for ViTs), the head's description, and every entry deliberately left out with the
reason. Anything a format does not account for is kept, so the strict loader rejects it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
import dataclasses
import math
import re
from typing import Any

from retro_jax.convert import timm_layout
from retro_jax.user_errors import UserError


class CheckpointFormatError(UserError, ValueError):
  """The file is not in the format it was said to be."""


@dataclasses.dataclass
class SplitCheckpoint:
  backbone: dict[str, Any]
  # Constructor arguments making our backbone compute what the file's network computes.
  backbone_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  head: dict[str, Any] | None = None
  head_kind: str | None = None
  head_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> why


def family(arch: str) -> str:
  for prefix in ("resnet", "efficientnet", "mobilenet_v3", "vit"):
    if arch.startswith(prefix):
      return prefix
  raise CheckpointFormatError(f"no checkpoint format knows the architecture {arch!r}")


# The ImageNet classifier of each reference layout: not part of a backbone.
_CLASSIFIERS = {"resnet": ("fc.",), "efficientnet": ("classifier.",),
                "mobilenet_v3": ("classifier.",), "vit": ("head.", "fc_norm.")}


def _is_tensor_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items())


def _plain_state_dict(obj: Any, what: str) -> dict[str, Any]:
  """A bare state dict, or one wrapped under the usual 'state_dict'/'model' entry."""
  if _is_tensor_dict(obj):
    return dict(obj)
  if isinstance(obj, Mapping):
    for wrapper in ("state_dict", "model"):
      if _is_tensor_dict(obj.get(wrapper)):
        return dict(obj[wrapper])
  entries = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
  raise CheckpointFormatError(f"expected a {what} state dict (names -> tensors); the file holds "
                              f"{entries}")


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
  if state and all(k.startswith(prefix) for k in state):
    return {k[len(prefix):]: v for k, v in state.items()}
  return state


# A key that only each family's reference layout has: which architectures a file may be.
_FAMILY_KEYS = {"resnet": re.compile(r"layer1\."),
                "efficientnet": re.compile(r"features\.\d+\.\d+\.block\."),
                "mobilenet_v3": re.compile(r"features\.\d+\.block\."),
                "vit": re.compile(r"blocks\.\d+\.")}


def has_family_keys(arch: str, keys) -> bool:
  """Whether any of `keys` is of the kind only `arch`'s family's layout has."""
  pattern = _FAMILY_KEYS[family(arch)]
  return any(pattern.match(key) for key in keys)


def classifier_prefixes(arch: str) -> tuple[str, ...]:
  """The key prefixes of `arch`'s ImageNet classifier in its reference layout."""
  return _CLASSIFIERS[family(arch)]


def _drop_classifier(state: dict[str, Any], arch: str, ignored: dict[str, str]) -> dict[str, Any]:
  prefixes = classifier_prefixes(arch)
  kept = {}
  for key, value in state.items():
    if key.startswith(prefixes):
      ignored[key] = "ImageNet classifier, not part of the backbone"
    else:
      kept[key] = value
  return kept


def _split_backbone_head(state: dict[str, Any], backbone_prefix: str,
                         head_prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Entries under `head_prefix` -> head, the rest -> backbone, both without their prefix.

  An entry under neither prefix stays in the backbone as it is, so the strict loader names it.
  """
  backbone, head = {}, {}
  for key, value in state.items():
    if key.startswith(head_prefix):
      head[key[len(head_prefix):]] = value
    else:
      backbone[key.removeprefix(backbone_prefix)] = value
  return backbone, head


def split_torchvision(obj: Any, arch: str) -> SplitCheckpoint:
  ignored: dict[str, str] = {}
  state = _strip(_plain_state_dict(obj, "torchvision"), "module.")
  return SplitCheckpoint(_drop_classifier(state, arch, ignored), ignored=ignored)


def split_timm(obj: Any, arch: str) -> SplitCheckpoint:
  ignored: dict[str, str] = {}
  state = _strip(_plain_state_dict(obj, "timm"), "module.")
  kwargs = {}
  if family(arch) in ("efficientnet", "mobilenet_v3"):
    state, after_pool = timm_layout.timm_to_torchvision_keys(arch, state)
    for key in after_pool:
      ignored[key] = "timm classifier stage after the pool, not part of the backbone"
    kwargs = timm_layout.timm_backbone_kwargs(arch)  # e.g. timm's BN eps for MobileNetV3.
  return SplitCheckpoint(_drop_classifier(state, arch, ignored), kwargs, ignored=ignored)


def split_moco(obj: Any, arch: str) -> SplitCheckpoint:
  """MoCo v1/v2 (and DisCo release) training checkpoints: the query encoder and its head."""
  del arch
  if not isinstance(obj, Mapping) or not _is_tensor_dict(obj.get("state_dict")):
    entries = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointFormatError("not a MoCo training checkpoint: expected a 'state_dict' entry "
                                f"with keys 'module.encoder_q.*'; the file holds {entries}")
  state = _strip(dict(obj["state_dict"]), "module.")
  if not any(k.startswith("encoder_q.") for k in state):
    raise CheckpointFormatError("not a MoCo training checkpoint: no 'encoder_q.' keys; first "
                                f"keys: {sorted(state)[:10]}")
  ignored = {}
  for key in list(state):
    if key.startswith("encoder_k."):
      ignored[key] = "momentum (key) encoder: the query encoder is the model"
    elif key in ("queue", "queue_ptr"):
      ignored[key] = "MoCo's queue of keys, training state"
  backbone, head = _split_backbone_head(
      {k: v for k, v in state.items() if k not in ignored}, "encoder_q.", "encoder_q.fc.")
  if not head:
    raise CheckpointFormatError("MoCo checkpoint without a head ('encoder_q.fc.*')")
  linears = sorted({k.split(".")[0] for k in head if k.endswith(".weight")}, key=int) if all(
      k.split(".")[0].isdigit() for k in head) else None
  if linears is None:  # MoCo v1: a single Linear `fc`.
    head = {f"0.{k}": v for k, v in head.items()}
    linears = ["0"]
  dims = [int(head[f"{linears[0]}.weight"].shape[1])]
  dims += [int(head[f"{i}.weight"].shape[0]) for i in linears]
  return SplitCheckpoint(backbone, {}, head, "mlp", {"dims": dims}, ignored)


def _dino_head_kwargs(head: dict[str, Any], args: Any) -> dict[str, Any]:
  try:
    weight_v = head["last_layer.weight_v"]
    first = head["mlp.0.weight"] if "mlp.0.weight" in head else head["mlp.weight"]
  except KeyError as error:
    raise CheckpointFormatError(f"DINO head without {error.args[0]!r}; head keys: "
                                f"{sorted(head)[:20]}") from None
  # Linear layers are the 2-D weights of `mlp` (a BatchNorm's weight is 1-D).
  linears = sorted(int(k.split(".")[1]) for k, v in head.items()
                   if k.startswith("mlp.") and k.endswith(".weight") and k.count(".") == 2
                   and len(v.shape) == 2)
  last_hidden = head[f"mlp.{linears[-1]}.weight"] if linears else first
  norm_last_layer = getattr(args, "norm_last_layer", None)
  if norm_last_layer is None:  # DINO fixes g to 1 exactly when norm_last_layer is set.
    norm_last_layer = bool((head["last_layer.weight_g"] == 1).all())
  return {"in_features": int(first.shape[1]), "out_features": int(weight_v.shape[0]),
          "norm_last_layer": bool(norm_last_layer), "num_layers": max(len(linears), 1),
          "hidden_features": int(first.shape[0]),
          "bottleneck_features": int(last_hidden.shape[0]),
          "batch_norm": any(k.endswith("running_mean") for k in head)}


def split_dino(obj: Any, arch: str) -> SplitCheckpoint:
  """DINO backbone-only files, or full training checkpoints (the EMA teacher and its head)."""
  if not (isinstance(obj, Mapping) and "teacher" in obj):
    return split_torchvision(obj, arch) if family(arch) == "resnet" else SplitCheckpoint(
        _strip(_plain_state_dict(obj, "DINO backbone"), "module."))
  ignored = {key: "DINO training state; the converter takes the EMA teacher, as DINO's "
             "evaluation does" for key in obj if key != "teacher"}
  state = _strip(_plain_state_dict(obj["teacher"], "DINO teacher"), "module.")
  backbone, head = _split_backbone_head(state, "backbone.", "head.")
  if not head:
    raise CheckpointFormatError("DINO checkpoint's teacher has no 'head.*' entries")
  kwargs = _dino_head_kwargs(head, obj.get("args"))
  # A ViT trained at another size than 224 px (DINO's --global_crops_size) keeps its grid.
  backbone_kwargs = _vit_img_size(backbone) if family(arch) == "vit" else {}
  return SplitCheckpoint(backbone, backbone_kwargs, head, "dino", kwargs, ignored)


def split_swav(obj: Any, arch: str) -> SplitCheckpoint:
  """SwAV's released ResNets (facebookresearch/swav `src/resnet50.py`, `hubconf.py`).

  The released files (`swav_800ep_pretrain.pth.tar`, `swav_RN50w2_400ep_pretrain.pth.tar`,
  ...) are bare state dicts of the DistributedDataParallel model, every key under `module.`
  (main_swav.py's own checkpoints hold the same under 'state_dict'): the trunk in
  torchvision's ResNet names (SwAV's `padding` + conv1 padding 2 is our padding 3), the
  projection head `projection_head.0.*` Linear(2048, 2048), `.1.*` BatchNorm1d, `.3.*`
  Linear(2048, 128), and `prototypes.weight` (3,000 x 128, no bias). SwAV's other head forms
  (no hidden layer, several prototype sets) are refused, naming the key. SwAV's `widen` is
  our ResNet `width` (stem channels, read from conv1): recorded when it is not `arch`'s own.
  """
  state = _strip(_plain_state_dict(obj, "SwAV"), "module.")
  if "prototypes.weight" not in state:
    several = sorted(k for k in state if k.startswith("prototypes.prototypes"))
    raise CheckpointFormatError(
        f"several prototype sets ({several[0]}, ...) are not supported; RoB's SwAV teachers "
        "have one" if several else "no 'prototypes.weight' entry (a SwAV model trained "
        f"with --nmb_prototypes > 0 has one); first keys: {sorted(state)[:8]}")
  if "projection_head.0.weight" not in state:
    found = "'projection_head.weight' (a single Linear)" if (
        "projection_head.weight" in state) else "no 'projection_head.*' entries"
    raise CheckpointFormatError(f"no 'projection_head.0.weight' entry: a SwAV head with a "
                                f"hidden layer (--hidden_mlp > 0) is expected, the file has "
                                f"{found}")
  backbone, head = _split_backbone_head(
      {k: v for k, v in state.items() if not k.startswith("prototypes.")}, "",
      "projection_head.")
  head = {f"projection_head.{k}": v for k, v in head.items()}
  head["prototypes.weight"] = state["prototypes.weight"]
  linears = sorted(k for k, v in head.items()
                   if k.startswith("projection_head.") and len(v.shape) == 2)
  if linears[-1] != "projection_head.3.weight":
    raise CheckpointFormatError(f"expected SwAV's projection head Linear, BatchNorm1d, ReLU, "
                                f"Linear (last weight 'projection_head.3.weight'); the file's "
                                f"Linear weights are {linears}")
  first, prototypes = head["projection_head.0.weight"], head["prototypes.weight"]
  kwargs = {"in_features": int(first.shape[1]), "num_prototypes": int(prototypes.shape[0]),
            "hidden_features": int(first.shape[0]), "out_features": int(prototypes.shape[1]),
            "batch_norm": "projection_head.1.running_mean" in head}
  return SplitCheckpoint(backbone, _resnet_width(backbone, arch), head, "swav", kwargs)


def _resnet_width(backbone: dict[str, Any], arch: str) -> dict[str, Any]:
  """{'width': stem channels} where a ResNet file's conv1 differs from `arch`'s default."""
  conv1 = backbone.get("conv1.weight")
  default = 128 if arch == "resnet50x2" else 64
  if family(arch) != "resnet" or conv1 is None or int(conv1.shape[0]) == default:
    return {}
  return {"width": int(conv1.shape[0])}


# RoB's MSN teacher head (VISSL `teacher/msn_vit_{b16,b4,l16,l7}.yaml`, `msn_head`
# temperature): MSN's tau = 0.1 times its target sharpening T = 0.25. No MSN file records T.
MSN_TEACHER_TEMPERATURE = 0.025


def _msn_head_kwargs(head: dict[str, Any], where: str) -> dict[str, Any]:
  for key in ("fc.fc1.weight", "fc.fc3.weight", "prototypes"):
    if key not in head:
      raise CheckpointFormatError(f"no {where}{key}' entry (the MSN projection head and "
                                  f"prototypes); head entries: {sorted(head)[:12]}")
  return {"in_features": int(head["fc.fc1.weight"].shape[1]),
          "num_prototypes": int(head["prototypes"].shape[0]),
          "hidden_features": int(head["fc.fc1.weight"].shape[0]),
          "out_features": int(head["fc.fc3.weight"].shape[0]),
          "batch_norm": "fc.bn1.weight" in head, "temperature": MSN_TEACHER_TEMPERATURE}


def _split_msn_release(obj: Mapping[str, Any]) -> SplitCheckpoint:
  """facebookresearch/msn's checkpoints (`src/msn_train.py`: `save_checkpoint`, `init_model`):

    target_encoder  the EMA target network's state dict, saved from DistributedDataParallel:
                    `module.` + src/deit.py's VisionTransformer keys (cls_token, pos_embed,
                    patch_embed.proj.*, blocks.i.*, norm.*) + `module.fc.{fc1, bn1, fc2, bn2,
                    fc3}.*`, the projection head `init_model` puts in the encoder's `fc`
    prototypes      the (K, out) prototype matrix, K = 1,024
    encoder, opt, epoch, loss, batch_size, world_size, lr, temperature: training state

  The teacher is the target encoder and the prototypes: MSN computes its targets with them
  (`msn_train.py`) and its linear evaluation reads `target_encoder` (`linear_eval.py`).
  """
  if "prototypes" not in obj:
    raise CheckpointFormatError("no 'prototypes' entry (MSN's (K, D) prototype matrix, beside "
                                f"'target_encoder'); the file holds {list(obj)[:10]}")
  state = _strip(_plain_state_dict(obj["target_encoder"], "MSN 'target_encoder'"), "module.")
  backbone, head = _split_backbone_head(state, "", "fc.")
  head = {f"fc.{k}": v for k, v in head.items()}
  head["prototypes"] = obj["prototypes"]
  ignored = {key: "MSN training state; the teacher is the target encoder and its prototypes"
             for key in obj if key not in ("target_encoder", "prototypes")}
  kwargs = _msn_head_kwargs(head, "'target_encoder' 'module.")
  return SplitCheckpoint(backbone, {}, head, "msn", kwargs, ignored)


_VISSL_MODEL = ("classy_state_dict", "base_model", "model")


def _split_vissl_msn(obj: Mapping[str, Any]) -> SplitCheckpoint:
  """VISSL's checkpoints (vissl/models/base_ssl_model.py `get_classy_state`; read back by
  vissl/utils/checkpoint.py `get_checkpoint_model_state_dict`, as RoB's teachers are):

    classy_state_dict.base_model.model.trunk  the `vision_transformer` trunk's state dict,
        vissl/models/trunks/vision_transformer.py: the timm layout (a feature-extraction
        run's `base_model.` prefix is dropped, as VISSL does)
    classy_state_dict.base_model.model.heads  the heads' nn.ModuleList: `0.` + `msn_head`'s
        (vissl/models/heads/msn_head.py) fc.{fc1, bn1, fc2, bn2, fc3}.* and prototypes
    the rest (base_model.meta, optimizer, phase and iteration counters): training state

  The model is `base_model`, what VISSL's loader and so RoB's teacher hook
  (vissl/hooks/distillation_hooks.py) read; a VISSL MSN training run keeps its EMA target
  network in `classy_state_dict.loss.teacher` (vissl/losses/msn_loss.py), which they do not.
  FSDP-sharded checkpoints (flat parameters) do not load: consolidate them with VISSL first.
  """
  node: Any = obj
  for depth, name in enumerate(_VISSL_MODEL):
    if not isinstance(node, Mapping) or name not in node:
      raise CheckpointFormatError(f"no '{'.'.join(_VISSL_MODEL[:depth + 1])}' entry (a VISSL "
                                  f"checkpoint holds {'.'.join(_VISSL_MODEL)}.trunk and .heads)")
    node = node[name]
  for part in ("trunk", "heads"):
    if not _is_tensor_dict(node.get(part)):
      raise CheckpointFormatError(f"no state dict at '{'.'.join(_VISSL_MODEL)}.{part}'")
  trunk = {k.removeprefix("base_model."): v for k, v in node["trunk"].items()}
  # Entries of any other head keep their prefix, so the strict loader names them.
  head = {k.removeprefix("0."): v for k, v in node["heads"].items()}
  classy = obj["classy_state_dict"]
  ignored = {key: "VISSL training state" for key in obj if key != "classy_state_dict"}
  ignored.update({f"classy_state_dict.{key}": "VISSL training state" for key in classy
                  if key != "base_model"})
  ignored.update({f"classy_state_dict.base_model.{key}": "VISSL model metadata"
                  for key in classy["base_model"] if key != "model"})
  kwargs = _msn_head_kwargs(head, f"'{'.'.join(_VISSL_MODEL)}.heads' '0.")
  return SplitCheckpoint(trunk, {}, head, "msn", kwargs, ignored)


def split_msn(obj: Any, arch: str) -> SplitCheckpoint:
  """MSN teachers, the ViT with its projection head and prototypes, from MSN's released files
  ('target_encoder' + 'prototypes') or VISSL's ('classy_state_dict'), told apart by those
  top-level entries. The head becomes VISSL's `msn_head` at RoB's teacher temperature."""
  if family(arch) != "vit":
    raise CheckpointFormatError(f"MSN checkpoints hold Vision Transformers and --arch {arch} is "
                                "not one (e.g. vit_large_patch16)")
  if isinstance(obj, Mapping) and "target_encoder" in obj:
    return _split_msn_release(obj)
  if isinstance(obj, Mapping) and "classy_state_dict" in obj:
    return _split_vissl_msn(obj)
  entries = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
  raise CheckpointFormatError("no 'target_encoder' entry (facebookresearch/msn) nor "
                              f"'classy_state_dict' (VISSL); the file holds {entries}")


def _vit_img_size(backbone: dict[str, Any]) -> dict[str, Any]:
  """{'img_size': side} when the file's position embedding is for another grid than 224 px."""
  if "pos_embed" not in backbone or "patch_embed.proj.weight" not in backbone:
    return {}  # the strict loader names what is missing
  grid = math.isqrt(int(backbone["pos_embed"].shape[1]) - 1)
  side = grid * int(backbone["patch_embed.proj.weight"].shape[-1])
  return {} if side == 224 else {"img_size": side}


def split_ibot(obj: Any, arch: str) -> SplitCheckpoint:
  """iBOT's full checkpoints (bytedance/ibot `main_ibot.py`, the "full ckpt" downloads).

    teacher    the EMA teacher, `utils.MultiCropWrapper(backbone, iBOTHead)` (no `module.`:
               a ViT teacher is not wrapped in DDP): `backbone.` + models/vision_transformer.py
               (the timm layout: cls_token, pos_embed, patch_embed.proj, blocks.i.*, norm),
               `head.` + models/head.py `iBOTHead`: mlp.{0, 2, 4}.* (GELU between, no norm by
               default), last_layer.weight_{g, v} (weight-normed, 8,192 prototypes) and, with
               `--shared_head_teacher` (default True), last_layer2.* holding the same tensors
    student, optimizer, epoch, args, ibot_loss (the centres), fp16_scaler: training state

  The head becomes a DINO head applied to every token (iBOTHead is DINO's with a second
  last layer for the patches); a teacher whose patch prototypes differ from its class-token
  prototypes is refused. The backbone-only downloads (`checkpoint_teacher.pth`) have no head:
  convert them with --format timm.
  """
  if family(arch) != "vit":
    raise CheckpointFormatError(f"iBOT checkpoints hold Vision Transformers and --arch {arch} "
                                "is not one (e.g. vit_base_patch16)")
  if not (isinstance(obj, Mapping) and "teacher" in obj):
    entries = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointFormatError(
        "no 'teacher' entry (iBOT's full checkpoint.pth holds 'teacher' with 'backbone.*' and "
        f"'head.*'; a backbone-only file converts with --format timm); the file holds {entries}")
  ignored = {key: "iBOT training state; the converter takes the EMA teacher and its head"
             for key in obj if key != "teacher"}
  state = _strip(_plain_state_dict(obj["teacher"], "iBOT teacher"), "module.")
  backbone, head = _split_backbone_head(state, "backbone.", "head.")
  if not head:
    raise CheckpointFormatError("the iBOT teacher has no 'head.*' entries")
  if "masked_embed" in backbone:  # only a student-built backbone has it
    backbone.pop("masked_embed")
    ignored["teacher.backbone.masked_embed"] = "iBOT's mask token; the teacher is never masked"
  for leaf in ("weight_g", "weight_v"):
    key = f"last_layer2.{leaf}"
    if key in head:
      shared = head.get(f"last_layer.{leaf}")
      if shared is None or tuple(shared.shape) != tuple(head[key].shape) or not bool(
          (shared == head[key]).all()):
        raise CheckpointFormatError(
            f"'teacher' 'head.{key}' differs from 'head.last_layer.{leaf}': a teacher head with "
            "separate patch prototypes (--shared_head_teacher false) is not supported")
      head.pop(key)
      ignored[f"teacher.head.{key}"] = "the patch prototypes, shared with head.last_layer"
  kwargs = _dino_head_kwargs(head, None)
  return SplitCheckpoint(backbone, _vit_img_size(backbone), head, "dino", kwargs, ignored)


FORMATS: dict[str, Callable[[Any, str], SplitCheckpoint]] = {
    "torchvision": split_torchvision,
    "timm": split_timm,
    "moco": split_moco,
    "dino": split_dino,
    "msn": split_msn,
    "swav": split_swav,
    "ibot": split_ibot,
}

# Pickled objects besides tensors that the formats above legitimately contain (DINO stores its
# argparse flags); torch.load's safe unpickler must be told about them.
SAFE_GLOBALS = (argparse.Namespace,)

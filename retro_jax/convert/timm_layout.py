"""timm's EfficientNet and MobileNetV3 state-dict keys -> our (torchvision-layout) names.

timm's `efficientnet_b0/b1` and `mobilenetv3_large_100/small_100` are the networks of
`retro_jax.models.efficientnet` / `.mobilenetv3` under other module names (`conv_stem`,
`bn1`, `blocks.S.B.conv_dw`, `se.conv_reduce`, `conv_head`, ...). The renaming below is
derived from our block tables, block by block, never from parameter order.

What was checked to be equal (timm 1.0.x against torchvision 0.29): symmetric padding
`(k - 1) // 2` (timm's non-`tf_` models), activations, channel widths, SE widths and
activations (EfficientNet: SiLU, sigmoid, reduce = block input / 4; MobileNetV3: ReLU,
hard-sigmoid, `make_divisible(expanded / 4)`), residual placement, depth scaling of B1.

What differs:
  * EfficientNet: nothing but names. timm's `classifier` is the head.
  * MobileNetV3: BatchNorm eps 1e-5 and momentum 0.1 in timm, 1e-3 and 0.01 in torchvision:
    build the backbone with `timm_backbone_kwargs(arch)`. timm's `conv_head` (1x1 conv with
    bias, 960->1280 / 576->1024) and `act2` (Hardswish) come *after* the global pool; they
    compute torchvision's `classifier.0` (Linear) + `classifier.1` on the pooled feature,
    so they belong to the head, with timm's `classifier` (torchvision's `classifier.3`).
    Our backbone's feature map is timm's `forward_features` output (960 / 576 channels) and
    its pooled feature is timm's `global_pool` output, before `conv_head`.
"""

from __future__ import annotations

from collections.abc import Mapping
import itertools
from typing import Any, NamedTuple

from retro_jax.models import efficientnet
from retro_jax.models import mobilenetv3

# timm model name -> our registered backbone name; our names are accepted as they are.
TIMM_ARCHS: dict[str, str] = {
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_b1": "efficientnet_b1",
    "mobilenetv3_large_100": "mobilenet_v3_large",
    "mobilenetv3_small_100": "mobilenet_v3_small",
}

# timm's module names of one block, by role. timm builds a block that does not widen its
# input (the first stage; arch string "ds_...") as DepthwiseSeparableConv, every other one
# as InvertedResidual ("ir_..."); `conv_pw` and `bn1`/`bn2` mean different layers in the two.
_INVERTED_RESIDUAL = {"expand": ("conv_pw", "bn1"), "depthwise": ("conv_dw", "bn2"),
                      "project": ("conv_pwl", "bn3")}
_DEPTHWISE_SEPARABLE = {"depthwise": ("conv_dw", "bn1"), "project": ("conv_pw", "bn2")}


class TimmRenamed(NamedTuple):
  """A timm state dict split at the end of our backbone.

  backbone: entries renamed to our torchvision-layout keys, plus every key that no rule
    recognises, unchanged, so that strict loading reports it as unexpected.
  head: timm's entries after our backbone, under their timm names (`classifier.*`; for
    MobileNetV3 also `conv_head.*`).
  """

  backbone: dict[str, Any]
  head: dict[str, Any]


def backbone_name(arch: str) -> str:
  """Our backbone name for a timm model name or one of our names."""
  if arch in TIMM_ARCHS:
    return TIMM_ARCHS[arch]
  if arch in TIMM_ARCHS.values():
    return arch
  raise ValueError(f"no timm layout for architecture {arch!r}; known: "
                   f"{', '.join(sorted(set(TIMM_ARCHS) | set(TIMM_ARCHS.values())))}")


def timm_backbone_kwargs(arch: str) -> dict[str, Any]:
  """Constructor arguments making our backbone compute what the timm model computes."""
  if backbone_name(arch).startswith("mobilenet_v3"):
    return {"bn_eps": 1e-5, "bn_momentum": 0.1}
  return {}


def _block_modules(timm_block: str, ours: str, *, expands: bool,
                   has_se: bool) -> dict[str, str]:
  names = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
  roles = ["expand"] * expands + ["depthwise"] + ["se"] * has_se + ["project"]
  modules = {}
  for index, role in enumerate(roles):
    layer = f"{ours}.block.{index}"
    if role == "se":
      modules[f"{timm_block}.se.conv_reduce"] = f"{layer}.fc1"
      modules[f"{timm_block}.se.conv_expand"] = f"{layer}.fc2"
    else:
      conv, bn = names[role]
      modules[f"{timm_block}.{conv}"] = f"{layer}.0"
      modules[f"{timm_block}.{bn}"] = f"{layer}.1"
  return modules


def _efficientnet_modules(name: str) -> tuple[dict[str, str], tuple[str, ...]]:
  stages = efficientnet.stage_configs(*efficientnet.SCALING[name])
  modules = {"conv_stem": "features.0.0", "bn1": "features.0.1"}
  for s, stage in enumerate(stages):
    for b in range(stage.num_layers):
      in_channels = stage.in_channels if b == 0 else stage.out_channels
      expands = efficientnet.make_divisible(in_channels * stage.expand_ratio) != in_channels
      # timm's stage s is our features.(s + 1); block indices agree within a stage.
      modules.update(_block_modules(f"blocks.{s}.{b}", f"features.{s + 1}.{b}",
                                    expands=expands, has_se=True))
  last = f"features.{len(stages) + 1}"
  modules.update({"conv_head": f"{last}.0", "bn2": f"{last}.1"})
  return modules, ("classifier",)


def _mobilenetv3_modules(name: str) -> tuple[dict[str, str], tuple[str, ...]]:
  blocks = mobilenetv3.BLOCKS[name.removeprefix("mobilenet_v3_")]
  modules = {"conv_stem": "features.0.0", "bn1": "features.0.1"}
  # torchvision numbers the blocks flat (features.1..N); timm groups consecutive blocks of
  # one output width into a stage (blocks.s.b).
  stage_sizes = [len(list(run)) for _, run in itertools.groupby(blocks, lambda c: c.out_channels)]
  flat = 0
  for s, size in enumerate(stage_sizes):
    for b in range(size):
      config = blocks[flat]
      flat += 1
      modules.update(_block_modules(
          f"blocks.{s}.{b}", f"features.{flat}",
          expands=config.expanded_channels != config.in_channels, has_se=config.use_se))
  # timm's last "stage" is one ConvBnAct: the 1x1 conv to 6x width, before the pool.
  last_timm, last_ours = f"blocks.{len(stage_sizes)}.0", f"features.{len(blocks) + 1}"
  modules.update({f"{last_timm}.conv": f"{last_ours}.0", f"{last_timm}.bn1": f"{last_ours}.1"})
  return modules, ("conv_head", "classifier")


def timm_module_map(arch: str) -> tuple[dict[str, str], tuple[str, ...]]:
  """timm module -> our module for the backbone, and timm's head modules, for `arch`."""
  name = backbone_name(arch)
  if name.startswith("efficientnet"):
    return _efficientnet_modules(name)
  return _mobilenetv3_modules(name)


def timm_to_torchvision_keys(arch: str, state_dict: Mapping[str, Any]) -> TimmRenamed:
  """Renames a timm state dict to our torchvision-layout keys, split at the backbone's end.

  Args:
    arch: a timm model name (`efficientnet_b0`, `mobilenetv3_large_100`, ...) or our
      backbone name.
    state_dict: timm key -> tensor or array; values are passed through untouched.

  Returns:
    `TimmRenamed(backbone, head)`; load `backbone` with
    `retro_jax.convert.state_dict.load_state_dict` into
    `create_backbone(backbone_name(arch), **timm_backbone_kwargs(arch), rngs=...)`.
  """
  modules, head_modules = timm_module_map(arch)
  backbone, head = {}, {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition(".")
    if module in modules:
      backbone[f"{modules[module]}.{leaf}"] = value
    elif module.split(".", 1)[0] in head_modules:
      head[key] = value
    else:
      backbone[key] = value
  return TimmRenamed(backbone, head)

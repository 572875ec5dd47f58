"""iBOT's own torch code, transcribed for the parity tests of `convert --format ibot`.

From bytedance/ibot (commit da316d8): `models/vision_transformer.py` (Mlp, Attention, Block,
PatchEmbed, VisionTransformer with `prepare_tokens`, `interpolate_pos_encoding` and
`return_all_tokens=True`, as main_ibot.py builds the teacher), `models/head.py` (`DINOHead`
and `iBOTHead` with `shared_head=True`, main_ibot.py's `--shared_head_teacher` default) and
main_ibot.py's checkpoint dictionary. Only what a frozen teacher computes is kept: no dropout
(rates 0), no drop-path (eval), no layer scale (`init_values=0`), no mean pooling.

`save_ibot_checkpoint` writes a teacher in iBOT's full-checkpoint layout (see
`retro_jax.convert.formats.split_ibot`).
"""

from __future__ import annotations

import argparse
from functools import partial
import math
import pathlib

import torch
from torch import nn

# iBOT's Mlp, Attention and Block are DINO's (and timm's) line for line, as MSN's src/deit.py
# copied them too; iBOT's Attention also returns the attention map, which Block drops.
from msn_reference import Block


class PatchEmbed(nn.Module):
  def __init__(self, img_size, patch_size, in_chans, embed_dim):
    super().__init__()
    self.num_patches = (img_size // patch_size) * (img_size // patch_size)
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x)


class VisionTransformer(nn.Module):
  """iBOT's VisionTransformer (return_all_tokens=True, no masked image modelling)."""

  def __init__(self, img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3,
               mlp_ratio=4.0, qkv_bias=True):
    super().__init__()
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    self.embed_dim = embed_dim
    self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
    num_patches = self.patch_embed.num_patches
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer)
                                 for _ in range(depth)])
    self.norm = norm_layer(embed_dim)
    self.head = nn.Identity()
    nn.init.trunc_normal_(self.pos_embed, std=0.02)
    nn.init.trunc_normal_(self.cls_token, std=0.02)

  def interpolate_pos_encoding(self, x, w, h):
    npatch = x.shape[1] - 1
    N = self.pos_embed.shape[1] - 1  # pylint: disable=invalid-name
    if npatch == N and w == h:
      return self.pos_embed
    class_pos_embed = self.pos_embed[:, 0]
    patch_pos_embed = self.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // self.patch_embed.patch_size + 0.1, h // self.patch_embed.patch_size + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

  def prepare_tokens(self, x):
    B, _, w, h = x.shape  # pylint: disable=invalid-name
    x = self.patch_embed(x).flatten(2).transpose(1, 2)
    x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
    return x + self.interpolate_pos_encoding(x, w, h)

  def forward(self, x):
    x = self.prepare_tokens(x)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)  # all tokens (return_all_tokens=True)


class IBOTHead(nn.Module):
  """iBOT's `iBOTHead` with shared_head=True: DINOHead's mlp and last_layer, last_layer2 the
  same module; `forward` on (B, 1 + N, D) tokens returns (class logits, patch logits)."""

  def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                             nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                             nn.Linear(hidden_dim, bottleneck_dim))
    for m in self.mlp:
      if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.constant_(m.bias, 0)
    self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    self.last_layer.weight_g.data.fill_(1)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False
    self.last_layer2 = self.last_layer
    self.last_norm = self.last_norm2 = None

  def forward(self, x):
    x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
    return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


class IBOTNetwork(nn.Module):
  """main_ibot.py's `utils.MultiCropWrapper(backbone, head)` for one crop size."""

  def __init__(self, *, img_size=224, embed_dim=192, depth=12, num_heads=3, out_dim=8192,
               hidden_dim=2048, bottleneck_dim=256):
    super().__init__()
    self.backbone = VisionTransformer(img_size, 16, embed_dim, depth, num_heads)
    self.head = IBOTHead(embed_dim, out_dim, hidden_dim, bottleneck_dim)

  def forward(self, x):
    return self.head(self.backbone(x))


def randomise(network: IBOTNetwork, seed: int) -> IBOTNetwork:
  """Random LayerNorm affines (init leaves them at 1 / 0), random biases, a trained-looking
  weight-norm gain; in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in network.modules():
      if isinstance(module, nn.LayerNorm):
        module.weight.uniform_(0.5, 1.5, generator=gen)
        module.bias.normal_(0.0, 0.1, generator=gen)
      elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
        module.bias.normal_(0.0, 0.1, generator=gen)
    network.head.last_layer.weight_g.uniform_(0.5, 1.5, generator=gen)
  return network.eval()


def save_ibot_checkpoint(path: pathlib.Path, teacher: IBOTNetwork, **teacher_overrides) -> None:
  """main_ibot.py's `save_dict`: the teacher under 'teacher' (no `module.`), the student under
  'student' (DDP: `module.`), optimizer, epoch, args and the loss's centres."""
  state = dict(teacher.state_dict(), **teacher_overrides)
  out_dim = teacher.head.last_layer.weight_v.shape[0]
  args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=out_dim,
                            patch_out_dim=out_dim, shared_head=True, shared_head_teacher=True,
                            norm_last_layer=False, pred_ratio=[0.0, 0.3],
                            pred_ratio_var=[0.0, 0.2])
  torch.save({"student": {f"module.{k}": v.clone() for k, v in state.items()},
              "teacher": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
              "args": args, "ibot_loss": {"center": torch.zeros(1, out_dim),
                                          "center2": torch.zeros(1, 1, out_dim)}}, path)

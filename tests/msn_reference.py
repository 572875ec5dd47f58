"""MSN's own torch code, transcribed for the parity tests of `convert --format msn`.

From facebookresearch/msn: `src/deit.py` (the ViT: MLP, Attention, Block, PatchEmbed and
VisionTransformer's constructor, `forward_features` without patch dropping and
`interpolate_pos_encoding`), `src/msn_train.py` (`init_model`'s projection head `fc` and the
prototypes' initialisation) and `src/losses.py` (`snn` and `sharpen`, MSN's target
probabilities). And VISSL's `msn_head` forward (vissl/models/heads/msn_head.py, commit
04788de9), RoB's teacher head. Only what a frozen teacher computes is kept: no dropout (rates
0), no drop-path (eval), no ConvEmbed stem, no attention maps.

`msn_checkpoint` and `vissl_checkpoint` give a network in each codebase's file layout (see `retro_jax.convert.formats.split_msn`).
"""

from __future__ import annotations

import collections
import math

import torch
from torch import nn


class Mlp(nn.Module):
  def __init__(self, in_features, hidden_features):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
  def __init__(self, dim, num_heads, qkv_bias):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, norm_layer):
    super().__init__()
    self.norm1 = norm_layer(dim)
    self.attn = Attention(dim, num_heads, qkv_bias)
    self.norm2 = norm_layer(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, img_size, patch_size, in_chans, embed_dim):
    super().__init__()
    self.num_patches = (img_size // patch_size) * (img_size // patch_size)
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


def _trunc_normal(tensor, std=0.02):
  # src/utils.py trunc_normal_(std=.02) cuts at +-2 (absolute), as torch's does.
  return nn.init.trunc_normal_(tensor, std=std, a=-2.0, b=2.0)


def projection(in_dim, hidden_dim, output_dim, use_bn) -> nn.Sequential:
  """msn_train.py init_model's `encoder.fc`, which VISSL's msn_head builds the same way:
  Sequential(fc1, [bn1], gelu1, fc2, [bn2], gelu2, fc3)."""
  fc = collections.OrderedDict()
  fc["fc1"] = nn.Linear(in_dim, hidden_dim)
  if use_bn:
    fc["bn1"] = nn.BatchNorm1d(hidden_dim)
  fc["gelu1"] = nn.GELU()
  fc["fc2"] = nn.Linear(hidden_dim, hidden_dim)
  if use_bn:
    fc["bn2"] = nn.BatchNorm1d(hidden_dim)
  fc["gelu2"] = nn.GELU()
  fc["fc3"] = nn.Linear(hidden_dim, output_dim)
  return nn.Sequential(fc)


class VisionTransformer(nn.Module):
  """deit.py's VisionTransformer with the `fc` projection head `init_model` attaches."""

  def __init__(self, *, patch_size, embed_dim, depth, num_heads, img_size=224, mlp_ratio=4.0,
               qkv_bias=True, hidden_dim=2048, output_dim=256, use_bn=True):
    super().__init__()
    norm_layer = lambda dim: nn.LayerNorm(dim, eps=1e-6)  # deit_* pass eps 1e-6
    self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer)
                                 for _ in range(depth)])
    self.norm = norm_layer(embed_dim)
    _trunc_normal(self.pos_embed)
    _trunc_normal(self.cls_token)
    self.fc = projection(embed_dim, hidden_dim, output_dim, use_bn)
    for m in self.modules():
      if isinstance(m, nn.Linear):
        _trunc_normal(m.weight)
        nn.init.constant_(m.bias, 0)

  def trunk(self, x):
    """forward_features up to the final norm's class token (before `fc`)."""
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, self.pos_embed)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)[:, 0]

  def forward(self, x):
    """MSN's `forward_features`: the projection `fc(cls)` (h, the target representation)."""
    return self.fc(self.trunk(x))

  def interpolate_pos_encoding(self, x, pos_embed):
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N:
      return pos_embed
    class_emb = pos_embed[:, 0]
    pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    pos_embed = nn.functional.interpolate(
        pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=math.sqrt(npatch / N), mode="bicubic")
    pos_embed = pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_emb.unsqueeze(0), pos_embed), dim=1)


def deit(size: str, *, depth: int | None = None, **kwargs) -> VisionTransformer:
  """deit.py's deit_tiny / deit_small / deit_base / deit_large (patch 16); `depth` overrides."""
  embed_dim, default_depth, num_heads = {"tiny": (192, 12, 3), "small": (384, 12, 6),
                                         "base": (768, 12, 12), "large": (1024, 24, 16)}[size]
  return VisionTransformer(patch_size=kwargs.pop("patch_size", 16), embed_dim=embed_dim,
                           depth=depth or default_depth, num_heads=num_heads, **kwargs)


def prototypes(num_proto: int, output_dim: int, generator: torch.Generator) -> torch.Tensor:
  """msn_train.py: uniform in +-sqrt(1 / output_dim)."""
  bound = (1.0 / output_dim) ** 0.5
  return torch.empty(num_proto, output_dim).uniform_(-bound, bound, generator=generator)


def randomise(model: VisionTransformer, seed: int) -> VisionTransformer:
  """Every LayerNorm and BatchNorm affine and statistic, bias and token made non-trivial.

  LN/BN scales ~ U(0.5, 1.5), BN running variances ~ U(0.5, 1.5), every other 1-D entry
  (biases, BN running means) ~ N(0, 0.1^2), class token and positions ~ N(0, 0.5^2).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
        module.weight.uniform_(0.5, 1.5, generator=gen)
        module.bias.normal_(0.0, 0.1, generator=gen)
      if isinstance(module, nn.BatchNorm1d):
        module.running_mean.normal_(0.0, 0.1, generator=gen)
        module.running_var.uniform_(0.5, 1.5, generator=gen)
      elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
        module.bias.normal_(0.0, 0.1, generator=gen)
    model.cls_token.normal_(0.0, 0.5, generator=gen)
    model.pos_embed.normal_(0.0, 0.5, generator=gen)
  return model.eval()


def snn(query, supports, temp):
  """losses.py `snn` with one-hot prototype labels (label smoothing 0, MSN's setting)."""
  query = nn.functional.normalize(query)
  supports = nn.functional.normalize(supports)
  return torch.softmax(query @ supports.T / temp, dim=1)


def sharpen(p, T):
  """losses.py `sharpen`."""
  sharp_p = p ** (1.0 / T)
  return sharp_p / torch.sum(sharp_p, dim=1, keepdim=True)


def msn_targets(h, protos, tau=0.1, T=0.25):
  """MSN's target probabilities: sharpen(snn(h, prototypes), T) (msn_train.py, losses.py)."""
  return sharpen(snn(h, protos, tau), T)


def vissl_msn_head(h, protos, temperature=0.025):
  """VISSL's MSNHead.forward after `fc`: softmax(normalize(h) @ normalize(C).T / t) @ labels."""
  query = nn.functional.normalize(h, dim=-1, p=2)
  supports = nn.functional.normalize(protos)
  return torch.softmax(query @ supports.T / temperature, dim=1) @ torch.eye(len(protos))


def msn_checkpoint(model: VisionTransformer, protos: torch.Tensor) -> dict:
  """msn_train.py `save_checkpoint`'s dict, DDP's `module.` prefixes included.

  The online encoder and optimiser state are stand-ins of the right kind (MSN saves the
  encoder's and the optimiser's state dicts), which the converter must leave out.
  """
  state = {f"module.{k}": v for k, v in model.state_dict().items()}
  return {"encoder": {k: torch.zeros_like(v) for k, v in state.items()},
          "opt": {"state": {}, "param_groups": []}, "prototypes": protos,
          "target_encoder": state, "epoch": 600, "loss": 2.5, "batch_size": 64,
          "world_size": 32, "lr": 0.001, "temperature": 0.1}


def vissl_checkpoint(model: VisionTransformer, protos: torch.Tensor) -> dict:
  """The same network in VISSL's layout: the trunk (VISSL's vision_transformer has deit.py's
  keys) and head 0, an `msn_head` (`fc.*`, `prototypes`), under classy_state_dict."""
  state = model.state_dict()
  trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
  heads = {f"0.{k}": v for k, v in state.items() if k.startswith("fc.")}
  heads["0.prototypes"] = protos
  return {"phase_idx": 299, "iteration": 1000, "train_phase_idx": 149,
          "classy_state_dict": {
              "train": True, "loss": {}, "optimizer": {"state": {}, "param_groups": []},
              "base_model": {"model": {"trunk": trunk, "heads": heads},
                             "meta": {"trunk": {}, "heads": []}}}}

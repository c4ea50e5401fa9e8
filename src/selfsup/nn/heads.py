"""Heads put on top of a backbone during SSL training and discarded afterwards (cookbook §3.2).

- ``projector``: the MLP of SimCLR (Chen et al., 2020b): (Linear -> BN -> ReLU) x (num_layers - 1) -> Linear,
  with an optional final BatchNorm without affine parameters (Barlow Twins, Zbontar et al. 2021; SimCLR v2
  also ends its projector with BN). A Linear followed by BN has no bias by default: BN's shift makes it redundant.
- ``predictor``: BYOL's (Grill et al., 2020) Linear -> BN -> ReLU -> Linear, i.e. a 2-layer projector.
- ``DINOHead``: DINO's (Caron et al., 2021) 3-layer GELU MLP to a 256-d bottleneck, l2-normalisation, then a
  weight-normalised linear layer to K prototypes whose norm is frozen at 1 (``norm_last_layer``).
- ``IBOTHead``: iBOT's (Zhou et al., 2022) DINO head applied to the [CLS] token and to every patch token, with
  the patch tokens' prototypes shared with the [CLS] ones or separate.
- ``UpsamplingDecoder``: a pooled feature to an image-sized map (the inpainting context encoder's decoder, the
  colorization head), for pretext tasks that predict pixels from a backbone that only returns pooled features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Sequential):
    """An ``nn.Sequential`` that remembers its input and output widths."""

    def __init__(self, *layers: nn.Module, in_dim: int, out_dim: int):
        super().__init__(*layers)
        self.in_dim = in_dim
        self.out_dim = out_dim


def projector(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, bn: bool = True,
              last_bn: bool = False, bias: bool | None = None, act: str = "relu") -> MLP:
    """SimCLR-style MLP projector (cookbook §3.2).

    Typical sizes: SimCLR 2048-2048-128 (2 layers), VICReg / Barlow Twins 8192-8192-8192 (3 layers, last_bn
    for Barlow), BYOL 4096-256 (2 layers). ``bias=None`` puts a bias only on Linear layers not followed by BN;
    True/False forces it on every Linear.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=(not bn) if bias is None else bias))
        if bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(ACTIVATIONS[act]())
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=(not last_bn) if bias is None else bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return MLP(*layers, in_dim=in_dim, out_dim=out_dim)


def predictor(in_dim: int, hidden_dim: int, out_dim: int) -> MLP:
    """BYOL / SimSiam predictor: Linear(in, hidden) -> BN -> ReLU -> Linear(hidden, out) (Grill et al., 2020)."""
    return projector(in_dim, hidden_dim, out_dim, num_layers=2, bn=True, last_bn=False)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al., 2021; defaults from the official repo's DINOHead).

    mlp (GELU, no BN) -> l2-normalise the bottleneck -> linear layer with l2-normalised rows (weight norm) to
    ``out_dim`` prototypes. With ``norm_last_layer`` the row norm is fixed at 1 (no gain parameter), which the
    authors found stabilises training of ViT-S/16.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = projector(in_dim, hidden_dim, bottleneck_dim, num_layers, bn=use_bn, act="gelu",
                             bias=True)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.gain = None if norm_last_layer else nn.Parameter(torch.ones(out_dim))
        self.in_dim = in_dim
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        logits = F.linear(z, F.normalize(self.prototypes, dim=-1))
        return logits if self.gain is None else logits * self.gain


class IBOTHead(nn.Module):
    """iBOT's head (models/head.py ``iBOTHead``): one DINO MLP and bottleneck for all tokens, then the [CLS]
    prototypes for the [CLS] token and, for the patch tokens, the same prototypes (``shared=True``; iBOT's release
    runs: ``--shared_head true``) or their own ``patch_out_dim`` prototypes.

    ``forward(tokens)`` with tokens (B, 1+N, D), [CLS] first, returns ((B, K) [CLS] logits, (B, N, K') patch
    logits); a (B, D) input (a local crop's [CLS] only) returns the (B, K) logits alone. No BN: iBOT's ViT heads
    use none (``--norm_in_head None``), and a token axis would need a different one.
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, patch_out_dim: int = 8192, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, shared: bool = True):
        super().__init__()
        self.cls = DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        self.shared = shared
        if shared and patch_out_dim != out_dim:
            raise ValueError(f"a shared head has one set of prototypes: patch_out_dim={patch_out_dim} must equal "
                             f"out_dim={out_dim} (or use separate heads)")
        self.patch_prototypes = None if shared else nn.Parameter(torch.empty(patch_out_dim, bottleneck_dim))
        if self.patch_prototypes is not None:
            nn.init.trunc_normal_(self.patch_prototypes, std=0.02)
        self.patch_gain = None if shared or norm_last_layer else nn.Parameter(torch.ones(patch_out_dim))

    @property
    def last_layer(self) -> list[nn.Parameter]:
        """The prototype parameters iBOT freezes in its first epoch (``--freeze_last_layer``)."""
        return [p for p in (self.cls.prototypes, self.cls.gain, self.patch_prototypes, self.patch_gain)
                if p is not None]

    def forward(self, x: torch.Tensor):
        if x.ndim == 2:
            return self.cls(x)
        z = F.normalize(self.cls.mlp(x), dim=-1)
        cls_logits = F.linear(z[:, 0], F.normalize(self.cls.prototypes, dim=-1))
        if self.cls.gain is not None:
            cls_logits = cls_logits * self.cls.gain
        protos, gain = (self.cls.prototypes, self.cls.gain) if self.shared else (self.patch_prototypes, self.patch_gain)
        patch_logits = F.linear(z[:, 1:], F.normalize(protos, dim=-1))
        return cls_logits, patch_logits if gain is None else patch_logits * gain


class UpsamplingDecoder(nn.Module):
    """Pooled feature (B, D) -> (B, C, size, size): a linear bottleneck to a (channels, s, s) map, s = ceil(size / 8),
    then three (nearest x2, 3x3 conv, BN, ReLU) stages, a 3x3 conv to the image channels, resized to ``size``."""

    def __init__(self, dim: int, channels: int, out_channels: int, size: int):
        super().__init__()
        self.size, self.base, self.channels = size, math.ceil(size / 8), channels
        self.fc = nn.Linear(dim, channels * self.base ** 2)
        layers, c = [], channels
        for _ in range(3):
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(c, max(c // 2, 8), 3, padding=1, bias=False),
                       nn.BatchNorm2d(max(c // 2, 8)), nn.ReLU(inplace=True)]
            c = max(c // 2, 8)
        self.up = nn.Sequential(*layers, nn.Conv2d(c, out_channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.up(self.fc(z).view(-1, self.channels, self.base, self.base))
        return x if x.shape[-1] == self.size else F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                                 align_corners=False)

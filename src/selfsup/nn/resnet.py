"""ResNet backbones (He et al., 2016) in pure PyTorch, with the stems SSL papers use.

API (one for every backbone of the package): ``forward(x) -> (B, num_features)`` after global average pooling (no
fc), and ``forward_features(x) -> {"pooled": (B, C), "map": (B, C, h, w)}`` with the last feature map (dense
methods).

Stems:
  "imagenet"  7x7 conv stride 2 + 3x3 max-pool (torchvision; /4 before stage 1).
  "cifar"     3x3 conv stride 1, no max-pool (SimCLR appendix B.9 for CIFAR-10; keeps 32x32 into stage 1).
  "small"     3x3 conv stride 2, no max-pool (halves resolution once; a CPU-sized choice for 28x28 inputs).

Defaults follow torchvision's ResNet v1.5 (stride on the 3x3 conv of a Bottleneck, 1x1 conv + BN shortcut)
so parameter counts match torchvision's models without their fc layer. ``zero_init_residual`` zero-initialises
the last BN scale of each residual branch, so every block starts as the identity (Goyal et al., 2017, §5.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEMS = ("cifar", "imagenet", "small")
DEPTHS = {  # name -> (block kind, blocks per stage)
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity when shapes match, else 1x1 conv + BN (torchvision's 'option B')."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs; used by ResNet-10/18/34."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand x4; used by ResNet-50."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)


def _stem(kind: str, in_chans: int, width: int) -> nn.Sequential:
    if kind == "imagenet":
        conv = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                             nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    if kind in ("cifar", "small"):
        conv = _conv3x3(in_chans, width, stride=1 if kind == "cifar" else 2)
        return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(inplace=True))
    raise ValueError(f"unknown ResNet stem {kind!r}; choose one of {STEMS}")


class ResNet(nn.Module):
    """A ResNet trunk: stem, four stages of widths width*(1, 2, 4, 8), global average pool, no fc."""

    def __init__(self, block: str = "basic", layers: tuple[int, ...] = (2, 2, 2, 2), *, in_chans: int = 3,
                 stem: str = "imagenet", width: int = 64, zero_init_residual: bool = True):
        super().__init__()
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"unknown block {block!r}; choose 'basic' or 'bottleneck'")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {layers}")
        if width < 1 or in_chans < 1:
            raise ValueError(f"width and in_chans must be positive, got width={width}, in_chans={in_chans}")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        self.stem = _stem(stem, in_chans, width)
        in_ch = width
        for i, n_blocks in enumerate(layers):
            stage_width = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block_cls(in_ch, stage_width, stride if j == 0 else 1))
                in_ch = stage_width * block_cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = in_ch
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He et al. 2015, as torchvision
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (B, num_features, h, w)."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                         keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"pooled": (B, C), "map": (B, C, h, w)}``. ``masks`` / ``keep`` (patch-token masking) are for ViTs: a
        ConvNet sees masked images in pixel space instead, so passing them here is an error."""
        if masks is not None or keep is not None:
            raise ValueError("token masks (masks=, keep=) apply to ViT backbones; mask the image itself for a "
                             "ResNet, or use model.backbone=vit_tiny/vit_small")
        fmap = self.feature_map(x)
        return {"pooled": fmap.mean(dim=(2, 3)), "map": fmap}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))


def resnet(name: str, *, in_chans: int = 3, stem: str = "imagenet", width: int = 64,
           zero_init_residual: bool = True) -> ResNet:
    """Build "resnet10" (one BasicBlock per stage), "resnet18", "resnet34" or "resnet50"."""
    if name not in DEPTHS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(DEPTHS)}")
    block, layers = DEPTHS[name]
    return ResNet(block, layers, in_chans=in_chans, stem=stem, width=width, zero_init_residual=zero_init_residual)

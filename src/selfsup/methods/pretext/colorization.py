"""Colorful image colorization (Zhang et al. 2016; cookbook §2.1): the encoder sees only the lightness of an image
and predicts, for every pixel, a distribution over quantized colours. Choosing plausible colours (the sky is blue,
a tomato red) needs to know what is where, without labels.

Defaults are the paper's unless noted: CIE Lab colour space, the ab plane quantized in cells of 10 (the in-gamut
cells, :func:`selfsup.data.pretext.ab_bins`: 261 here, 313 in the paper's hull file), targets soft-encoded over the
5 nearest cells with a Gaussian of sigma 5, a per-pixel multinomial cross-entropy (eq. (2)) at a quarter of the
input resolution (``output_stride`` 4: 56 x 56 for 224-px inputs). Not implemented: the class rebalancing (it needs
the colour prior of the training set; ``colorization_loss`` takes weights when you have one).

The encoder is built for the data's 3 channels and is given the lightness as a grey RGB image (R = G = B = L/100,
then the dataset's normalization), so the exported backbone takes ordinary images; it never saw colour in training,
so evaluate it on greyscale images for the paper's protocol, or on colour ones knowing they shift its input. The
decoder (pooled feature -> per-pixel logits, :class:`selfsup.nn.heads.UpsamplingDecoder`) is not exported; the
backbones here return pooled features, so the colours are predicted from a global code (the paper's network is
fully convolutional). Only colour data: single-channel images have no colour to predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data.pretext import ab_bins, rgb_to_lab, soft_encode
from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView, crop_views
from selfsup.losses.pretext import colorization_loss
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone
from selfsup.nn.heads import UpsamplingDecoder


@dataclass
class ColorizationParams:
    bin_size: float = 10.0         # ab quantization grid (Zhang et al. §2.1)
    neighbours: int = 5            # soft encoding over the 5 nearest cells
    sigma: float = 5.0             # with a Gaussian kernel of sigma 5
    output_stride: int = 4         # predictions at 1/4 of the input resolution (56 x 56 for 224)
    decoder_channels: int = 128    # the decoder's first map; untuned
    crop_scale_min: float = 0.6    # random resized crop (0.6, 1) + flip; untuned (the paper: crops and flips)


class Colorization(Method):
    def __init__(self, encoder: nn.Module, decoder: UpsamplingDecoder, view_maker: MultiView, mean, std,
                 p: ColorizationParams):
        super().__init__()
        self.encoder, self.decoder, self.view_maker, self.p = encoder, decoder, view_maker, p
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("bins", ab_bins(p.bin_size), persistent=False)

    def forward(self, views: Views, progress: Progress) -> dict:
        rgb = (views.crops[0].float() * self.std + self.mean).clamp(0, 1)  # undo the view's normalization
        lab = rgb_to_lab(rgb)
        grey = ((lab[:, :1] / 100).expand_as(rgb) - self.mean) / self.std
        feats = self.encoder(grey.to(views.crops[0].dtype))
        ab = lab[:, 1:]
        if self.p.output_stride > 1:
            ab = F.avg_pool2d(ab, self.p.output_stride)
        target = soft_encode(ab, self.bins, self.p.neighbours, self.p.sigma)
        return {"loss": colorization_loss(self.decoder(feats), target), "features": feats}

    @property
    def guillotine_head(self) -> None:
        return None  # the decoder predicts colours: not a projector


@register("colorization", ColorizationParams, family="pretext task", cookbook="§2.1 colorization",
          summary="from the lightness alone, predict each pixel's colour among ~300 ab cells (colour data only)")
def build(cfg, data: DataInfo) -> Colorization:
    p = cfg.params
    if data.channels != 3:
        raise ValueError(f"colorization predicts colour from lightness, so it needs colour (3-channel RGB) images; "
                         f"{cfg.data.name} has {data.channels} channel(s). Use a colour data set (data=cifar10, "
                         f"data=stl10, data=folder of colour images) or another pretext task (rotnet, jigsaw, "
                         f"inpainting)")
    size = cfg.views.size
    if p.output_stride < 1 or size % p.output_stride:
        raise ValueError(f"colorization.output_stride={p.output_stride} must divide the view size {size}")
    encoder = make_backbone(cfg, data)
    q = ab_bins(p.bin_size).shape[0]
    decoder = UpsamplingDecoder(encoder.num_features, p.decoder_channels, q, size // p.output_stride)
    only = crop_views(size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0))
    return Colorization(encoder, decoder, only, data.mean, data.std, p)

"""Inpainting with a context encoder (Pathak et al. 2016; cookbook §2.1): a square region of each image is blanked,
and an encoder-decoder must paint it back from the surrounding context. Filling a hole plausibly needs to know what
the object is and how its parts continue.

The encoder is the backbone (exported); the decoder (not exported) maps its pooled feature to a small feature map
(the paper's "channel-wise fully connected" bottleneck) and upsamples it with three (nearest x2, 3x3 conv, BN,
ReLU) stages to the view size. Defaults: the hole is one random square of half the view's side (the paper's
central region is half the side of its 128-px images; its random-block and random-region masks gave better
features, §3.3), filled with the dataset mean (0 after normalization, as the paper fills with the mean pixel), an
L2 loss on the hole only (eq. (1); the paper's adversarial term and its 10x weight on a 4-px overlap band are not
implemented). Augmentation: random resized crop + flip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.pretext import square_holes
from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView, crop_views
from selfsup.losses.pretext import inpainting_loss
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone
from selfsup.nn.heads import UpsamplingDecoder


@dataclass
class InpaintingParams:
    hole_fraction: float = 0.5     # hole side / view side: the paper's central 64 px of 128
    decoder_channels: int = 64     # width of the decoder's first map (halved at each upsampling); untuned
    crop_scale_min: float = 0.6    # random resized crop (0.6, 1) + flip; untuned


class HoleViews:
    """A view maker plus one square hole per image, from the step's generator: ``masks["hole"]`` (B, H, W) bool."""

    def __init__(self, inner: MultiView, size: int, side: int):
        self.inner, self.size, self.side = inner, size, side
        self.n_global = inner.n_global

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        views = self.inner(batch, generator)
        views.masks["hole"] = square_holes(batch.shape[0], self.size, self.side, generator).to(views.crops[0].device)
        return views

    def describe(self) -> list[dict]:
        return [{**d, "hole": f"one random {self.side}x{self.side} square"} for d in self.inner.describe()]

    def global_views(self) -> MultiView:
        return self.inner.global_views()


class Inpainting(Method):
    def __init__(self, encoder: nn.Module, decoder: UpsamplingDecoder, view_maker: HoleViews):
        super().__init__()
        self.encoder, self.decoder, self.view_maker = encoder, decoder, view_maker

    def forward(self, views: Views, progress: Progress) -> dict:
        x, hole = views.crops[0], views.masks["hole"]
        context = x.masked_fill(hole.unsqueeze(1), 0.0)  # the dataset mean, after normalization
        feats = self.encoder(context)
        return {"loss": inpainting_loss(self.decoder(feats), x, hole), "features": feats}

    @property
    def guillotine_head(self) -> None:
        return None  # the decoder paints pixels: not a projector


@register("inpainting", InpaintingParams, family="pretext task", cookbook="§2.1 inpainting",
          summary="blank a random square, an encoder-decoder paints it back (L2 on the hole)")
def build(cfg, data: DataInfo) -> Inpainting:
    p = cfg.params
    size = cfg.views.size
    side = round(size * p.hole_fraction)
    if not 1 <= side < size:
        raise ValueError(f"inpainting.hole_fraction={p.hole_fraction} gives a {side}-px hole in a {size}-px view: "
                         "choose a fraction in (0, 1) that leaves context around the hole")
    encoder = make_backbone(cfg, data)
    only = crop_views(size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0))
    return Inpainting(encoder, UpsamplingDecoder(encoder.num_features, p.decoder_channels, data.channels, size),
                      HoleViews(only, size, side))

"""SimMIM (Xie et al. 2022; cookbook §2.5, §3.6): the ViT encoder sees every patch, the masked ones replaced by a
learned mask token; a linear head predicts each masked patch's raw pixels, with an l1 loss on the masked patches only.

Unlike MAE there is no decoder and no token dropping: the encoder does the reconstruction itself, and the head is one
linear layer per token (the reference's 1x1 convolution + pixel shuffle, which is the same map). Defaults are the
paper's: masks of random 32-pixel units (``mask_group`` patches a side; 2 for a ViT-B/16) at ratio 0.6, random
resized crop (scale 0.67-1, aspect 3/4-4/3) + flip as the only augmentation (``data_simmim.py``). The head is not
exported.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from selfsup.data.masking import SIMMIM_MASK_RATIO
from selfsup.data.types import DataInfo
from selfsup.data.views import GroupMaskViews, crop_views
from selfsup.losses.masked_modeling import patchify, simmim_loss
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone
from selfsup.nn.vit import VisionTransformer


@dataclass
class SimMIMParams:
    mask_ratio: float = SIMMIM_MASK_RATIO  # 0.6 (Xie et al. 2022, Table 1; configs MASK_RATIO)
    mask_group: int = 2                    # mask unit side in patches: MASK_PATCH_SIZE 32 / patch 16 (ViT-B)
    crop_scale_min: float = 0.67           # RandomResizedCrop(scale=(0.67, 1.)), data_simmim.py


class SimMIM(Method):
    def __init__(self, encoder: VisionTransformer, head: nn.Linear, view_maker, p: SimMIMParams):
        super().__init__()
        self.encoder, self.head, self.view_maker, self.p = encoder, head, view_maker, p

    def forward(self, views: Views, progress: Progress) -> dict:
        x, mask = views.crops[0], views.masks["mask"]
        out = self.encoder.forward_features(x, masks=mask)
        loss = simmim_loss(self.head(out["tokens"]), patchify(x, self.encoder.patch_size), mask)
        return {"loss": loss, "features": out["pooled"]}

    @property
    def guillotine_head(self) -> None:
        return None  # no projector: the representation is the encoder's


@register("simmim", SimMIMParams, family="masked image modeling", cookbook="§2.5; §3.6",
          summary="ViT with mask tokens on 60% of the patches; a linear head regresses their pixels (l1)")
def build(cfg, data: DataInfo) -> SimMIM:
    p = cfg.params
    if not 0.0 < p.mask_ratio < 1.0:
        raise ValueError(f"simmim.mask_ratio={p.mask_ratio} must be in (0, 1); SimMIM's default is 0.6")
    if p.mask_group < 1:
        raise ValueError(f"simmim.mask_group={p.mask_group} must be >= 1 patch (SimMIM: 32 px / patch size)")
    encoder = make_backbone(cfg, data, mask_token=True)
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"SimMIM replaces patches by a mask token, so it needs a ViT: set model.backbone=vit_tiny "
                         f"(or vit_small), not {cfg.model.backbone!r}")
    size = cfg.views.size
    grid = (size // encoder.patch_size, size // encoder.patch_size)
    head = nn.Linear(encoder.embed_dim, encoder.patch_size ** 2 * data.channels)  # the 1x1 conv + pixel shuffle
    only = crop_views(size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0))
    views = GroupMaskViews(only, grid, p.mask_group, p.mask_ratio)
    return SimMIM(encoder, head, views, p)

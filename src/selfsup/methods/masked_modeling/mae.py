"""MAE (He et al. 2022; cookbook §2.5, §3.6, §3.8.3): a ViT encoder sees only the visible 25% of the patches, a
light decoder with mask tokens and its own position embeddings reconstructs the pixels of the masked ones.

Defaults are the paper's unless a recipe says otherwise: mask ratio 0.75, per-patch normalized pixel targets
(`norm_pix`), random resized crop (scale 0.2-1) + flip as the only augmentation. The decoder is smaller than the
paper's (8 blocks of 512-d) so that it stays light next to a ViT-tiny; it is not exported (``exports()`` holds the
encoder only). Token dropping is what makes MAE cheap: the encoder's cost scales with the visible tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.types import DataInfo
from selfsup.data.views import RandomMaskViews, crop_views
from selfsup.losses.masked_modeling import mae_loss, patchify
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone
from selfsup.nn.vit import Block, VisionTransformer


@dataclass
class MAEParams:
    mask_ratio: float = 0.75     # He et al. 2022, masking-ratio ablation
    norm_pix: bool = True        # per-patch normalized targets ("w/ norm"), --norm_pix_loss
    decoder_dim: int = 128       # paper: 512 (ViT-L); light next to a ViT-tiny encoder
    decoder_depth: int = 2       # paper: 8; 1-2 blocks already work for linear probing (paper Table 1a)
    decoder_heads: int = 4
    crop_scale_min: float = 0.2  # RandomResizedCrop(scale=(0.2, 1.0)), the only augmentation besides the flip


def sincos_pos_embed(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1, h*w, dim), half the channels per axis (MAE's decoder)."""
    if dim % 4:
        raise ValueError(f"decoder_dim={dim} must be a multiple of 4 for the 2-D sine-cosine embedding")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    parts = [f(a.flatten()[:, None] * omega[None]) for a in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float().unsqueeze(0)


class MAEDecoder(nn.Module):
    """Linear embed -> mask tokens for the hidden patches -> raster order -> + fixed position -> blocks -> pixels."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int], patch_pixels: int):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_pos_embed(dim, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward(self, cls: torch.Tensor, visible: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """cls (B, D), visible (B, K, D) encoder tokens in `keep` order, restore (B, N) -> (B, N, patch_pixels)."""
        x = self.embed(visible)
        B, K, d = x.shape
        N = restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, N - K, d)], dim=1)  # [visible, masked]
        x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, d)) + self.pos.to(x.dtype)  # raster order
        x = torch.cat([self.embed(cls).unsqueeze(1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x)[:, 1:])


class MAE(Method):
    def __init__(self, encoder: VisionTransformer, decoder: MAEDecoder, view_maker, p: MAEParams):
        super().__init__()
        self.encoder, self.decoder, self.view_maker, self.p = encoder, decoder, view_maker, p

    def forward(self, views: Views, progress: Progress) -> dict:
        x = views.crops[0]
        keep, mask, restore = views.masks["keep"], views.masks["mask"], views.masks["restore"]
        out = self.encoder.forward_features(x, keep=keep)
        pred = self.decoder(out["cls"], out["tokens"], restore)
        loss = mae_loss(pred, patchify(x, self.encoder.patch_size), mask, self.p.norm_pix)
        return {"loss": loss, "features": out["pooled"]}

    @property
    def guillotine_head(self) -> None:
        return None  # no projector: MAE's representation is the encoder's


@register("mae", MAEParams, family="masked image modeling", cookbook="§2.5; §3.6; §3.8.3 token dropping",
          summary="ViT on the visible 25% of patches; a light decoder reconstructs the masked pixels")
def build(cfg, data: DataInfo) -> MAE:
    p = cfg.params
    encoder = make_backbone(cfg, data)
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"MAE drops tokens, so it needs a ViT: set model.backbone=vit_tiny (or vit_small), not "
                         f"{cfg.model.backbone!r}")
    size = cfg.views.size
    grid = (size // encoder.patch_size, size // encoder.patch_size)
    decoder = MAEDecoder(encoder.embed_dim, p.decoder_dim, p.decoder_depth, p.decoder_heads, grid,
                         encoder.patch_size ** 2 * data.channels)
    # crop + flip only (He et al. 2022, appendix A.1): no colour jitter, blur, grayscale or solarization
    only = crop_views(size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0))
    views = RandomMaskViews(only, math.prod(grid), p.mask_ratio)
    return MAE(encoder, decoder, views, p)

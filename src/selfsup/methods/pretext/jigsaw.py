"""Jigsaw puzzles (Noroozi & Favaro 2016; cookbook §2.1): an image is cut into 3 x 3 tiles, the tiles are shuffled
by one of P fixed permutations, and a network that sees each tile through the same encoder (a siamese "context-free
network") must tell which permutation was used. Solving it needs the tiles' content and their spatial relations.

Defaults are the paper's unless noted: 3 x 3 tiles, each taken at a random offset inside its cell (64 px of a 75-px
cell: the gap stops the network from matching edges), every tile normalized on its own (no low-level statistics
shortcut), the permutation set of maximal Hamming distance (:func:`selfsup.data.pretext.hamming_permutations`).
P = 100 here (the paper's Table 2 trades 100-1000; 1000 is its best on ImageNet) and the heads are narrower than
its fc6 512 / fc7 4096, for the CPU recipes. The encoder is exported; the heads are not. The online probe reads
the mean of the nine tile features: the encoder never sees a whole image during training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.data.pretext import hamming_permutations, jigsaw_tiles
from selfsup.data.types import DataInfo
from selfsup.data.views import MultiView, crop_views
from selfsup.losses.pretext import jigsaw_loss
from selfsup.methods.base import Method, Progress, Views, register
from selfsup.methods.common import make_backbone


@dataclass
class JigsawParams:
    permutations: int = 100        # P; the paper's Table 2 compares 100, 1000 (best on ImageNet) and more
    grid: int = 3                  # 3 x 3 tiles
    tile_fraction: float = 0.853   # tile / cell: 64 / 75 px in the paper
    tile_dim: int = 128            # per-tile fc (the paper's fc6: 512); untuned
    hidden: int = 512              # fc on the concatenated tiles (fc7: 4096); untuned
    crop_scale_min: float = 0.6    # random resized crop (0.6, 1) + flip: untuned (the paper: a 225-px random crop)
    seed: int = 0                  # seed of the permutation set (part of the method: keep it for a resume)


class JigsawViews:
    """A view maker plus the puzzle's random draws, from the step's generator: ``masks["jigsaw_perm"]`` (B,) the
    permutation class of each image, ``masks["jigsaw_offsets"]`` (B, grid², 2) each tile's offset in its cell."""

    def __init__(self, inner: MultiView, grid: int, cell: int, tile: int, permutations: int):
        self.inner, self.grid, self.cell, self.tile, self.permutations = inner, grid, cell, tile, permutations
        self.n_global = inner.n_global

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> Views:
        views = self.inner(batch, generator)
        b, dev = batch.shape[0], generator.device if generator is not None else torch.device("cpu")
        perm = torch.randint(self.permutations, (b,), generator=generator, device=dev)
        offsets = torch.randint(self.cell - self.tile + 1, (b, self.grid ** 2, 2), generator=generator, device=dev)
        device = views.crops[0].device
        views.masks.update(jigsaw_perm=perm.to(device), jigsaw_offsets=offsets.to(device))
        return views

    def describe(self) -> list[dict]:
        return [{**d, "jigsaw": f"{self.grid}x{self.grid} tiles of {self.tile} px in {self.cell}-px cells, "
                 f"{self.permutations} permutations"} for d in self.inner.describe()]

    def global_views(self) -> MultiView:
        return self.inner.global_views()


class Jigsaw(Method):
    def __init__(self, encoder: nn.Module, tile_head: nn.Module, head: nn.Module, view_maker: JigsawViews,
                 permutations: torch.Tensor, p: JigsawParams):
        super().__init__()
        self.encoder, self.tile_head, self.head, self.view_maker, self.p = encoder, tile_head, head, view_maker, p
        self.register_buffer("permutation_set", permutations, persistent=False)

    def forward(self, views: Views, progress: Progress) -> dict:
        x, perm = views.crops[0], views.masks["jigsaw_perm"]
        tiles = jigsaw_tiles(x, self.p.grid, self.view_maker.tile, views.masks["jigsaw_offsets"],
                             self.permutation_set[perm])
        b, n = tiles.shape[:2]
        feats = self.encoder(tiles.flatten(0, 1))                        # one siamese pass over all B x 9 tiles
        logits = self.head(self.tile_head(feats).view(b, -1))            # concatenated in the shuffled order
        acc = (logits.argmax(1) == perm).float().mean()
        return {"loss": jigsaw_loss(logits, perm), "features": feats.view(b, n, -1).mean(1),
                "jigsaw_acc": acc.detach()}

    @property
    def guillotine_head(self) -> None:
        return None  # the heads classify permutations: not a projector


@register("jigsaw", JigsawParams, family="pretext task", cookbook="§2.1 jigsaw puzzles",
          summary="classify which of P permutations shuffled the 3x3 tiles; a siamese encoder sees each tile")
def build(cfg, data: DataInfo) -> Jigsaw:
    p = cfg.params
    if p.grid < 2 or p.grid > 3:
        raise ValueError(f"jigsaw.grid={p.grid}: 2 or 3 tiles a side (the permutation set enumerates grid²! orders)")
    cell = cfg.views.size // p.grid
    tile = round(cell * p.tile_fraction)
    if not 0.0 < p.tile_fraction <= 1.0 or tile < 4:
        raise ValueError(f"jigsaw: a {cfg.views.size}-px view in {p.grid}x{p.grid} cells gives {tile}-px tiles "
                         f"(tile_fraction={p.tile_fraction}); use tile_fraction in (0, 1] and views of at least "
                         f"{4 * p.grid} px")
    encoder = make_backbone(cfg, data)
    d = encoder.num_features
    tile_head = nn.Sequential(nn.Linear(d, p.tile_dim), nn.ReLU(inplace=True))
    head = nn.Sequential(nn.Linear(p.grid ** 2 * p.tile_dim, p.hidden), nn.ReLU(inplace=True),
                         nn.Linear(p.hidden, p.permutations))
    only = crop_views(cfg.views.size, data.mean, data.std, data.channels, (p.crop_scale_min, 1.0))
    views = JigsawViews(only, p.grid, cell, tile, p.permutations)
    return Jigsaw(encoder, tile_head, head, views, hamming_permutations(p.permutations, p.grid ** 2, p.seed), p)

"""SimCLR (Chen et al. 2020; cookbook §2.2, eq. (6), Fig. 3): two augmented views, a projector, NT-Xent."""

from __future__ import annotations

from dataclasses import dataclass

from selfsup.data.types import DataInfo
from selfsup.losses.metric_learning import multi_view_nt_xent
from selfsup.methods.base import Method, Progress, Views, forward_views, register
from selfsup.methods.common import make_backbone, make_projector, make_views


@dataclass
class SimCLRParams:
    temperature: float = 0.1      # SimCLR Table 5 / §B.9 (ImageNet); small-data recipes raise it


class SimCLR(Method):
    def __init__(self, encoder, projector, view_maker, temperature: float):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.view_maker = view_maker
        self.temperature = temperature

    def forward(self, views: Views, progress: Progress) -> dict:
        feats = forward_views(self.encoder, views.crops)
        zs = forward_views(self.projector, feats)
        loss = multi_view_nt_xent(zs, n_global=views.n_global, temperature=self.temperature)
        return {"loss": loss, "features": feats[0], "embedding": zs[0]}


@register("simclr", SimCLRParams, family="deep metric learning", cookbook="§2.2, eq. (6), Fig. 3; §3.8.1 Alg. 1",
          summary="NT-Xent between two views; negatives are the rest of the (gathered) batch")
def build(cfg, data: DataInfo) -> SimCLR:
    encoder = make_backbone(cfg, data)
    return SimCLR(encoder, make_projector(cfg, encoder.num_features), make_views(cfg, "simclr", data),
                  cfg.params.temperature)
